"""What a model family is: everything the pipeline needs to know about one ``model:`` of params.yaml.

A :class:`ModelFamily` lives in its model's own file (``deqsm/models/<model>.py``) and carries how the model
is built from a variant's spec, trained (its objective, and a finishing step), evaluated (with its own
evaluation options) and judged (its headline metric, the first column of its report table). Adding a model
is its file plus one line in :data:`deqsm.models.MODELS`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from pydantic import Field
from torch import nn

from deqsm.config import DEQSettings
from deqsm.schema import Strict

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


class EvalOptions(Strict):
    """Evaluation knobs every family has (params.yaml's ``eval`` section merged with an experiment's
    ``eval_options``); each family extends it with its own."""

    batch_size: int = Field(500, ge=1, description="test rows per batch for losses and log-likelihoods")
    seed: int = Field(0, description="seed of the evaluation's random draws (the same for every variant)")


@dataclass(frozen=True)
class ModelFamily:
    """One kind of model (params.yaml's ``model``).

    Attributes:
        name: the name params.yaml uses.
        build: ``build(dim, *, variant, width, depth, deq, train, **model_options) -> nn.Module``; its other
            keyword arguments are the family's ``model_options``.
        objective: ``objective(loss, loss_options, train) -> (model, batch) -> LossOutput``, the training loss.
        evaluate: ``evaluate(model, splits, opts, spec, *, true_density, labels) -> (metrics, images or None)``:
            test metrics (``params`` is added by the caller) and, for a model that samples, images in [0, 1].
        eval_options: the pydantic class of its evaluation options (a subclass of :class:`EvalOptions`).
        headline: what it is judged by: a :class:`Headline`, or ``headline(metric_keys) -> Headline`` when
            the key depends on the evaluation (NCSN's Fréchet distance names its feature extractor).
        finalize: ``finalize(model, loss, loss_options, train, val) -> dict`` after training (DKEF fits its ridge λ
            on ``val`` and solves α on ``train``; the dict: what it chose, for the run's summary), or None.
        normalised: the model has an exact ``log_prob`` (maximum likelihood applies; no log Z estimate).
        loss_on_data: its score-matching loss is that of the model's density on the data rows, so on data with a
            known score it has a floor (:mod:`deqsm.floor`). Not so for the VAE (a latent score) or NCSN (noised).
    """

    name: str
    build: Callable[..., nn.Module]
    objective: Callable[[str, dict[str, Any], Tensor], Callable]
    evaluate: Callable[..., tuple[dict[str, float], Tensor | None]]
    eval_options: type[EvalOptions]
    headline: Headline | Callable[[Iterable[str]], Headline] = TEST_LOGLIK
    finalize: Callable[..., None] | None = None
    normalised: bool = False
    loss_on_data: bool = False

    def options(self) -> list[str]:
        """The model-specific keyword options (``model_options``) of :attr:`build`."""
        return [p for p in inspect.signature(self.build).parameters if p not in STANDARD_ARGS]

    def check_options(self, model_options: dict[str, Any]) -> None:
        unknown = sorted(set(model_options) - set(self.options()))
        if unknown:
            raise ValueError(f"unknown model_options {unknown}; this model's options: {self.options() or 'none'}")

    def headline_of(self, metric_keys: Iterable[str]) -> Headline:
        """The headline metric of a run whose metrics.json holds ``metric_keys``."""
        return self.headline if isinstance(self.headline, Headline) else self.headline(metric_keys)

    def __call__(self, dim: int, *, variant: str, width: int, depth: int, deq: DEQSettings, train: Tensor,
                 **model_options: Any) -> nn.Module:
        self.check_options(model_options)
        return self.build(dim, variant=variant, width=width, depth=depth, deq=deq, train=train, **model_options)
