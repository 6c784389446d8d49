"""How the energy-based density models (DKEF, NICE, the energy MLP) are trained and judged, as the paper's
density-estimation experiments report them (sections 4.2 and 4.3).

- :func:`energy_objective`: any registered score-matching loss on the model's energy (its forward), or
  ``mle`` (maximum likelihood) for a normalised model.
- :func:`evaluate_density`: test losses and the test log-likelihood — exact for a normalised model (NICE,
  plus bits/dim), else mean(−E) − log Ẑ with log Z importance-sampled (from a defensive KDE of the training
  rows, :func:`data_proposal`, or the paper's N(0, s² I)) and flagged unreliable below an effective-sample
  floor — and, when the true density is known (generated data), the Fisher divergence. Options:
  :class:`DensityEvalOptions`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
from pydantic import Field
from torch import nn

from deqsm.losses import LossOutput, get_loss
from deqsm.metrics.density import (bits_per_dim, fisher_divergence, importance_log_normaliser, pilot_bandwidth,
                                   true_score_function)
from deqsm.metrics.proposals import DefensiveKDEProposal, GaussianProposal, kde_centres
from deqsm.models.family import EvalOptions
from deqsm.train import Objective, mean_loss

Tensor = torch.Tensor


class DensityEvalOptions(EvalOptions):
    """Evaluation knobs of the density models."""

    is_samples: int = Field(100_000, ge=100, description="importance samples for log Z (paper: 10⁶)")
    is_scale: float = Field(2.0, gt=0, description="proposal N(0, is_scale² I); 2 → N(0, 4I) as in the paper")
    is_batch_size: int = Field(4096, ge=1, description="proposal samples per batch (bounds memory)")
    is_proposal: Literal["data", "gaussian"] = Field(
        "data", description="importance proposal for log Z: 'data' = (1 − is_defensive_weight) · a Gaussian KDE "
                            "of the training rows + is_defensive_weight · N(0, is_scale² I); 'gaussian' = "
                            "N(0, is_scale² I) alone (the paper's)")
    is_defensive_weight: float = Field(0.1, gt=0, lt=1, description="weight of the broad N(0, is_scale² I) in the "
                                       "'data' proposal: importance weights stay within 1/weight of the broad one's")
    is_kde_rows: int = Field(2000, ge=2, description="training rows (a seeded random subset) that centre the 'data' "
                                                     "proposal's kernels; its cost grows with them")
    is_kde_bandwidth: float | None = Field(
        None, gt=0, description="the 'data' proposal's kernel bandwidth factor h (kernel covariance h² × the rows' "
                                "covariance); null: the one of Scott's factor × (1/16 … 4) with the largest "
                                "pilot-estimated ESS under the model")
    is_pilot_samples: int = Field(2000, ge=1, description="draws per candidate bandwidth of the pooled pilot that "
                                                          "chooses it (7 candidates; only with is_kde_bandwidth null)")
    is_ess_floor: float = Field(500, ge=0, description="effective importance samples (a count, not a fraction) "
                                "below which test_loglik is flagged unreliable (test_loglik_reliable = 0); 500 "
                                "keeps se(log Ẑ) ≈ 1/√ESS under 0.05 nats")
    sm_max_dim: int = Field(128, ge=0, description="exact SM loss only up to this data dimension (d backward passes)")
    logit_alpha: float | None = Field(None, ge=0, lt=0.5, description="the data's logit squeeze α (NICE bits/dim)")
    pixel_levels: int = Field(256, ge=2, description="pixel levels behind the dequantised data (NICE bits/dim)")


def energy_objective(name: str, options: dict[str, Any] | None = None, train: Tensor | None = None) -> Objective:
    """``(model, batch) -> LossOutput`` for a model whose forward is its energy (``mle``: normalised)."""
    if name == "mle":
        def mle(model: nn.Module, batch: Tensor) -> LossOutput:
            nll = model(batch).mean()  # normalised energy = −log p
            return LossOutput(nll, {"nll": nll.detach()})
        return mle
    loss_fn = get_loss(name, **(options or {}))
    return lambda model, batch: loss_fn(model, batch)


def _batched_mean(fn: Callable[[Tensor], Tensor], data: Tensor, batch_size: int) -> tuple[float, float]:
    """Mean and standard error over rows of the per-row values ``fn(batch)``."""
    values = torch.cat([fn(data[i:i + batch_size]).detach().double().cpu() for i in range(0, data.shape[0], batch_size)])
    se = float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else float("nan")
    return float(values.mean()), se


def data_proposal(model: nn.Module, splits: dict[str, Tensor], opts: DensityEvalOptions,
                  **sampling: Any) -> tuple[DefensiveKDEProposal, dict[str, float]]:
    """The 'data' proposal, in the space of the rows the model sees (the splits as given: whitened data stay
    whitened): kernels on ``splits["train"]`` (the model was fit to them), bandwidth ``is_kde_bandwidth`` or
    the pilot's choice (:func:`pilot_bandwidth`, drawing from ``sampling["generator"]``); and its figures."""
    if "train" not in splits:
        raise ValueError("is_proposal 'data' fits the proposal to the training rows, but splits has no 'train' "
                         f"(keys: {sorted(splits)}); pass them or use is_proposal 'gaussian'")
    centres = kde_centres(splits["train"], opts.is_kde_rows, opts.seed)
    bandwidth = opts.is_kde_bandwidth
    if bandwidth is None:
        bandwidth, _ = pilot_bandwidth(lambda x: -model(x), centres, n_pilot=opts.is_pilot_samples,
                                       scale=opts.is_scale, defensive_weight=opts.is_defensive_weight, **sampling)
    proposal = DefensiveKDEProposal(centres, bandwidth, scale=opts.is_scale, defensive_weight=opts.is_defensive_weight)
    return proposal, {"test_is_kde_bandwidth": bandwidth}


def evaluate_density(model: nn.Module, splits: dict[str, Tensor], opts: DensityEvalOptions, spec: Any, *,
                     normalised: bool = False, true_density: Any = None,
                     labels: dict[str, Tensor] | None = None) -> tuple[dict[str, float], None]:
    """Test metrics of a trained (finalised) energy model; no samples.

    - ``test_loss`` (the spec's loss) and its terms; ``test_ssm_loss``; ``test_sm_loss`` (when the
      dimension is at most ``sm_max_dim``);
    - ``test_loglik`` (nats per sample) with ``test_loglik_sample_se`` (over test rows): exact when
      ``normalised`` (plus ``test_bpd`` when ``logit_alpha`` is given), otherwise mean(−E) − log Ẑ by
      importance sampling (proposal ``is_proposal``; 'data': :func:`data_proposal`, with
      ``test_is_kde_bandwidth``, its kernel bandwidth factor) with ``test_log_z``, ``test_loglik_se`` (the
      Monte-Carlo error of log Ẑ, delta method), ``test_is_ess`` (effective samples), ``test_is_ess_fraction``
      (of ``is_samples``) and ``test_is_max_weight`` (the largest normalised weight);
    - ``test_loglik_reliable``: 1.0, or 0.0 when log Ẑ rests on fewer than ``is_ess_floor`` effective
      samples — a ``test_loglik`` that is then a number, not a measurement (its se is computed from the same
      collapsed weights and does not show it). Always 1.0 for a normalised model (no importance sampling);
    - with ``true_density`` (an object with ``score`` or ``log_prob``, or a score callable):
      ``fisher_divergence`` on the test rows, and ``true_test_loglik`` when it has ``log_prob``.
    """
    device = next(model.parameters()).device
    test = splits["test"].to(device)
    dim = test[0].numel()
    gen = lambda dev="cpu": torch.Generator(device=dev).manual_seed(opts.seed)  # noqa: E731 — same draws for every model
    was_training = model.training
    model.eval()
    torch.manual_seed(opts.seed)  # the losses' own draws (dsm noise): reproducible across models
    out: dict[str, float] = {}

    # DKEF's own objective would refit α; evaluation uses the finalised α (the model's forward).
    loss_terms = mean_loss(model, energy_objective(spec.loss.name, spec.loss.options), test, opts.batch_size)
    out.update({f"test_{k}": v for k, v in loss_terms.items()})
    out["test_ssm_loss"] = mean_loss(model, energy_objective("ssm", {"generator": gen(device)}), test,
                                     opts.batch_size)["loss"]
    if dim <= opts.sm_max_dim:
        out["test_sm_loss"] = mean_loss(model, energy_objective("sm"), test, opts.batch_size)["loss"]

    if normalised:
        with torch.no_grad():
            out["test_loglik"], out["test_loglik_sample_se"] = _batched_mean(model.log_prob, test, opts.batch_size)
            if opts.logit_alpha is not None:
                out["test_bpd"], _ = _batched_mean(
                    lambda x: bits_per_dim(model.log_prob(x), x, alpha=opts.logit_alpha, levels=opts.pixel_levels),
                    test, opts.batch_size)
    else:
        with torch.no_grad():
            mean_log_p, sample_se = _batched_mean(lambda x: -model(x), test, opts.batch_size)
        sampling = dict(batch_size=opts.is_batch_size, generator=gen(), device=device, dtype=test.dtype)
        if opts.is_proposal == "data":
            proposal, figures = data_proposal(model, splits, opts, **sampling)
            out.update(figures)
        else:
            proposal = GaussianProposal(dim, opts.is_scale)
        log_z = importance_log_normaliser(lambda x: -model(x), proposal, n_samples=opts.is_samples, **sampling)
        out.update(test_loglik=mean_log_p - log_z.log_z, test_loglik_se=log_z.se, test_log_z=log_z.log_z,
                   test_is_ess=log_z.ess, test_is_ess_fraction=log_z.ess / log_z.n_samples,
                   test_is_max_weight=log_z.max_weight, test_loglik_sample_se=sample_se)
    out["test_loglik_reliable"] = float(normalised or out["test_is_ess"] >= opts.is_ess_floor)

    if true_density is not None:
        out["fisher_divergence"] = fisher_divergence(model, true_score_function(true_density), test, opts.batch_size)
        if hasattr(true_density, "log_prob"):
            with torch.no_grad():
                lp = true_density.log_prob(test.cpu())
            out["true_test_loglik"] = float((lp.flatten(1).sum(1) if lp.dim() > 1 else lp).double().mean())
    model.train(was_training)
    return out, None
