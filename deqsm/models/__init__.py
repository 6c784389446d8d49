"""Models: the paper's experiment models and the networks they are made of.

``MODELS`` maps a model name (params.yaml's ``model``) to its :class:`~deqsm.models.family.ModelFamily`,
defined in the model's own file: how it is built from a variant's spec, trained, finished, evaluated and
judged. Every network comes in the variants of :data:`deqsm.models.blocks.VARIANTS` (``deq``, ``explicit``).

- ``dkef`` (:mod:`deqsm.models.dkef`): deep kernel exponential family; α solved per batch and at the end.
- ``nice`` (:mod:`deqsm.models.nice`): additive coupling flow with an exact log-likelihood.
- ``energy_mlp`` (:mod:`deqsm.models.energy_mlp`): the benchmarks' MLP energy.
- ``vae`` (:mod:`deqsm.models.vae`): implicit-encoder VAE; the variant is its latent score network.
- ``ncsn`` (:mod:`deqsm.models.ncsn`): noise-conditional score network with a DEQ or explicit core.
"""
from __future__ import annotations

from deqsm.models import dkef, energy_mlp, ncsn, nice, vae
from deqsm.models.family import EvalOptions, Headline, ModelFamily
from deqsm.registry import Registry

MODELS: Registry[ModelFamily] = Registry("model")
for _family in (dkef.FAMILY, nice.FAMILY, energy_mlp.FAMILY, vae.FAMILY, ncsn.FAMILY):
    MODELS.register(_family.name)(_family)

__all__ = ["MODELS", "EvalOptions", "Headline", "ModelFamily"]
