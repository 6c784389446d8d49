"""Models: energy networks (explicit and DEQ) and the paper's experiment models.

``MODELS`` maps a model name (params.yaml's ``model``) to a :class:`ModelBuilder`: calling it builds the
model, ``builder(dim, variant=..., width=..., depth=..., deq=DEQSettings, train=rows, **model_options)``;
its ``objective`` / ``finalize`` hooks say how the model is trained and finished when a generic energy
objective does not do (DKEF solves α per batch and on the whole training set at the end), and ``evaluate``
how a model that is not an energy is evaluated (the VAE: ELBO; NCSN: samples and their Fréchet distance).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from deqsm.config import DEQSettings
from deqsm.models.dkef import build_dkef, dkef_objective, finalize_dkef
from deqsm.models.energy_mlp import DEQEnergyMLP, ExplicitEnergyMLP
from deqsm.models.generative import (build_ncsn, build_vae, evaluate_ncsn, evaluate_vae, ncsn_headline, ncsn_objective,
                                     vae_objective)
from deqsm.models.nice import build_nice
from deqsm.registry import Registry

Tensor = torch.Tensor
STANDARD_ARGS = ("dim", "variant", "width", "depth", "deq", "train")


@dataclass(frozen=True)
class Headline:
    """The number a model family's experiments are judged by (the first column of its report table)."""

    key: str  # the metric's key in metrics.json
    label: str  # the table's column header
    higher_is_better: bool
    unit: str  # words after a value in the findings ("" for none)


TEST_LOGLIK = Headline("test_loglik", "test log-lik (nats) ± se", True, "nats")


@dataclass(frozen=True)
class ModelBuilder:
    """How to build one kind of model.

    Attributes:
        build: ``build(dim, *, variant, width, depth, deq, train, **model_options) -> nn.Module``.
        normalised: the model has an exact ``log_prob`` (maximum likelihood applies; no log Z estimate).
        objective: ``objective(loss, options, train) -> (model, batch) -> LossOutput``, or None for the
            generic energy objective.
        finalize: ``finalize(model, loss, options, train)`` after training, or None.
        evaluate: ``evaluate(model, splits, eval_options, spec, labels) -> (metrics, images or None)`` for a
            model that is not an energy (replaces the energy evaluation: losses, log-likelihood), or None.
        headline: what the family is judged by: a :class:`Headline`, or ``headline(metric_keys) -> Headline``
            when its key depends on the evaluation (NCSN's Fréchet distance names its feature extractor).
    """

    build: Callable[..., nn.Module]
    normalised: bool = False
    objective: Callable[..., Callable] | None = None
    finalize: Callable[..., None] | None = None
    evaluate: Callable[..., tuple[dict[str, float], Any]] | None = None
    headline: Headline | Callable[[Iterable[str]], Headline] = TEST_LOGLIK

    def headline_of(self, metric_keys: Iterable[str]) -> Headline:
        """The headline metric of a run whose metrics.json holds ``metric_keys``."""
        return self.headline if isinstance(self.headline, Headline) else self.headline(metric_keys)

    def options(self) -> list[str]:
        """The model-specific keyword options (``model_options``) of :attr:`build`."""
        return [p for p in inspect.signature(self.build).parameters if p not in STANDARD_ARGS]

    def check_options(self, model_options: dict[str, Any]) -> None:
        unknown = sorted(set(model_options) - set(self.options()))
        if unknown:
            raise ValueError(f"unknown model_options {unknown}; this model's options: {self.options() or 'none'}")

    def __call__(self, dim: int, *, variant: str, width: int, depth: int, deq: DEQSettings, train: Tensor,
                 **model_options: Any) -> nn.Module:
        self.check_options(model_options)
        return self.build(dim, variant=variant, width=width, depth=depth, deq=deq, train=train, **model_options)


def build_energy_mlp(dim: int, *, variant: str, width: int, depth: int, deq: DEQSettings, train: Tensor) -> nn.Module:
    """The benchmark energy MLPs of :mod:`deqsm.models.energy_mlp` (unnormalised)."""
    if variant == "explicit":
        return ExplicitEnergyMLP(dim, width, depth)
    if variant == "deq":
        return DEQEnergyMLP(dim, width, lam=deq.lam, norm=deq.norm, **deq.layer_options())
    raise ValueError(f"unknown network variant {variant!r}; known: deq, explicit")


MODELS: Registry[ModelBuilder] = Registry("model")
MODELS.register("dkef")(ModelBuilder(build_dkef, objective=dkef_objective, finalize=finalize_dkef))
MODELS.register("nice")(ModelBuilder(build_nice, normalised=True))
MODELS.register("energy_mlp")(ModelBuilder(build_energy_mlp))
MODELS.register("vae")(ModelBuilder(build_vae, objective=vae_objective, evaluate=evaluate_vae,
                                    headline=Headline("test_elbo", "test ELBO (nats)", True, "nats")))
MODELS.register("ncsn")(ModelBuilder(build_ncsn, objective=ncsn_objective, evaluate=evaluate_ncsn,
                                     headline=ncsn_headline))
