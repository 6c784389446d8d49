"""The bridge the pipeline calls: one experiment = a spec (model, variant, loss, DEQ settings), trained by
:func:`deqsm.train.fit`, finalised, and evaluated as the paper's density-estimation experiments report
(sections 4.2 and 4.3: test log-likelihood — exact for NICE, importance-sampled log Z for DKEF —, test
SSM / SM losses, parameters, memory, time per step, solver steps).

    spec = ExperimentSpec(name="dkef-gaussian-deq-ssm", model="dkef", variant="deq", loss={"name": "ssm"})
    metrics = run(spec, {"train": ..., "val": ..., "test": ...}, TrainSettings(steps=500))

No ray / mlflow / dvc here: progress goes to ``deqsm.train`` callbacks.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from deqsm.config import DEQSettings, LossSettings, known_name
from deqsm.losses import LossOutput, get_loss
from deqsm.metrics.density import (bits_per_dim, fisher_divergence, importance_log_normaliser,
                                   true_score_function)
from deqsm.models import MODELS, ModelBuilder
from deqsm.models.blocks import count_parameters
from deqsm.train import Callback, FitResult, Objective, TrainSettings, fit
from deqsm.train import evaluate as evaluate_objective

Tensor = torch.Tensor
SPLITS = ("train", "val", "test")


class ExperimentSpec(BaseModel):
    """One trainable variant: what the pipeline's params.yaml says about a model (unknown keys rejected)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    model: str = Field(description="MODELS registry name: dkef | nice | energy_mlp | vae | ncsn")
    variant: Literal["deq", "explicit"]
    depth: int = Field(2, ge=1, description="hidden layers of an explicit net (ignored by deq)")
    width: int = Field(64, ge=1, description="hidden width (DKEF feature net, NICE coupling nets, energy MLP)")
    model_options: dict[str, Any] = Field(default_factory=dict, description="model-specific knobs, checked by name")
    loss: LossSettings
    deq: DEQSettings = Field(default_factory=DEQSettings)

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return known_name(v, MODELS)

    @model_validator(mode="after")
    def _consistent(self) -> "ExperimentSpec":
        entry = MODELS.get(self.model)
        entry.check_options(self.model_options)
        if self.loss.name == "mle":
            if not entry.normalised:
                raise ValueError(f"loss 'mle' needs a model with an exact log-likelihood; {self.model!r} is "
                                 f"unnormalised (normalised models: {', '.join(n for n in MODELS if MODELS.get(n).normalised)})")
            if self.loss.options:
                raise ValueError(f"loss 'mle' takes no options, got {sorted(self.loss.options)}")
        else:
            try:
                get_loss(self.loss.name, **self.loss.options)
            except TypeError as err:  # unknown option names: a config error
                raise ValueError(str(err)) from None
        return self


class EvalOptions(BaseModel):
    """Evaluation knobs (params.yaml's ``eval`` section merged with an experiment's ``eval_options``)."""

    model_config = ConfigDict(extra="forbid")

    is_samples: int = Field(100_000, ge=2, description="importance samples for log Z (paper: 10⁶)")
    is_scale: float = Field(2.0, gt=0, description="proposal N(0, is_scale² I); 2 → N(0, 4I) as in the paper")
    is_batch_size: int = Field(4096, ge=1, description="proposal samples per batch (bounds memory)")
    batch_size: int = Field(500, ge=1, description="test rows per batch for losses and log-likelihoods")
    sm_max_dim: int = Field(128, ge=0, description="exact SM loss only up to this data dimension (d backward passes)")
    logit_alpha: float | None = Field(None, ge=0, lt=0.5, description="the data's logit squeeze α (NICE bits/dim)")
    pixel_levels: int = Field(256, ge=2, description="pixel levels behind the dequantised data (NICE bits/dim)")
    seed: int = 0
    # generative models (VAE: ELBO; NCSN: Langevin samples and their Fréchet distance)
    elbo_centres: int = Field(512, ge=2, description="VAE: encoder samples per test x for the KDE of q(z|x)")
    elbo_eval: int = Field(128, ge=1, description="VAE: samples per test x for the bandwidth choice and the estimate")
    iw_samples: int = Field(0, ge=0, description="VAE: draws for the importance-weighted bound (0: off)")
    memory_batch: int = Field(64, ge=1, description="VAE: batch of the measured score-network step")
    fd_extractor: Literal["auto", "inception", "digits_cnn"] = Field(
        "auto", description="NCSN: FD features (auto: Inception when its weights are on disk, else the digits CNN)")
    inception_weights: str | None = Field(None, description="NCSN: Inception-v3 weights file (never downloaded)")
    fd_samples: int | None = Field(None, ge=2, description="NCSN: samples for the FD (null: the test-set size)")
    langevin_steps: int = Field(20, ge=1, description="NCSN: annealed Langevin steps per noise level")
    langevin_lr: float = Field(5e-5, gt=0, description="NCSN: Langevin step size at the smallest σ")
    classifier_epochs: int = Field(15, ge=1, description="NCSN: epochs of the digits CNN behind fd_digits_cnn")
    pixel_range: Literal["unit", "symmetric"] = Field("unit", description="NCSN: data range [0, 1] or [−1, 1]")


def _energy_objective(name: str, options: dict[str, Any] | None = None) -> Objective:
    """``(model, batch) -> LossOutput`` for a model whose forward is its energy (``mle``: normalised)."""
    if name == "mle":
        def mle(model: nn.Module, batch: Tensor) -> LossOutput:
            nll = model(batch).mean()  # normalised energy = −log p
            return LossOutput(nll, {"nll": nll.detach()})
        return mle
    loss_fn = get_loss(name, **(options or {}))
    return lambda model, batch: loss_fn(model, batch)


def _entry(spec: ExperimentSpec) -> ModelBuilder:
    return MODELS.get(spec.model)


def make_objective(spec: ExperimentSpec, train: Tensor) -> Objective:
    """The training objective ``(model, batch) -> LossOutput`` of ``spec``."""
    entry = _entry(spec)
    if entry.objective is not None:
        return entry.objective(spec.loss.name, spec.loss.options, train)
    return _energy_objective(spec.loss.name, spec.loss.options)


def build(spec: ExperimentSpec, train: Tensor) -> tuple[nn.Module, Objective]:
    """The model of ``spec`` (sized by ``train``'s rows; DKEF also places its inducing points there) and
    its training objective."""
    if not torch.is_tensor(train) or not train.is_floating_point() or train.dim() < 2 or train.shape[0] == 0:
        raise ValueError("train must be a non-empty floating-point tensor with rows as samples, shape (N, ...)")
    model = _entry(spec)(train[0].numel(), variant=spec.variant, width=spec.width, depth=spec.depth,
                         deq=spec.deq, train=train, **spec.model_options)
    return model, make_objective(spec, train)


def finalize(spec: ExperimentSpec, model: nn.Module, train: Tensor) -> None:
    """The model's step after training (DKEF: α solved on the whole training set)."""
    entry = _entry(spec)
    if entry.finalize is not None:
        device = next(model.parameters()).device
        entry.finalize(model, spec.loss.name, spec.loss.options, train.to(device))


def _check_splits(splits: dict[str, Tensor], needed: tuple[str, ...]) -> None:
    missing = [k for k in needed if k not in splits]
    if missing:
        raise ValueError(f"splits lack {missing}; expected keys {list(SPLITS)}")
    shapes = {k: tuple(splits[k].shape[1:]) for k in needed}
    for k in needed:
        t = splits[k]
        if not torch.is_tensor(t) or not t.is_floating_point() or t.dim() < 2:
            raise ValueError(f"split {k!r} must be a floating-point tensor with rows as samples")
    if len(set(shapes.values())) > 1:
        raise ValueError(f"splits disagree on the sample shape: {shapes}")


def train_model(spec: ExperimentSpec, splits: dict[str, Tensor], train_settings: TrainSettings,
                callbacks: list[Callback] | None = None,
                checkpoint_dir: Path | str | None = None) -> tuple[nn.Module, FitResult]:
    """Build (seeded by ``train_settings.seed``), fit and finalise; returns the model and the fit result."""
    _check_splits(splits, ("train",))
    torch.manual_seed(train_settings.seed)
    model, objective = build(spec, splits["train"])
    result = fit(model, objective, splits["train"], splits.get("val"), train_settings, callbacks, checkpoint_dir)
    finalize(spec, model, splits["train"])
    return model, result


def _batched_mean(fn, data: Tensor, batch_size: int) -> tuple[float, float]:
    """Mean and standard error over rows of the per-row values ``fn(batch)``."""
    values = torch.cat([fn(data[i:i + batch_size]).detach().double().cpu() for i in range(0, data.shape[0], batch_size)])
    se = float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else float("nan")
    return float(values.mean()), se


def evaluate(spec: ExperimentSpec, model: nn.Module, splits: dict[str, Tensor], eval_options: dict | None = None,
             true_density: Any = None, labels: dict[str, Tensor] | None = None) -> dict[str, float]:
    """Test metrics of a trained (finalised) model (:func:`evaluate_with_samples` without the samples)."""
    return evaluate_with_samples(spec, model, splits, eval_options, true_density, labels)[0]


def evaluate_with_samples(spec: ExperimentSpec, model: nn.Module, splits: dict[str, Tensor],
                          eval_options: dict | None = None, true_density: Any = None,
                          labels: dict[str, Tensor] | None = None) -> tuple[dict[str, float], Tensor | None]:
    """Test metrics of a trained (finalised) model, and samples (images in [0, 1]) when the model makes them.

    A model with its own evaluation (``MODELS`` entry ``evaluate``: the VAE's ELBO, NCSN's Fréchet
    distance of Langevin samples, see :mod:`deqsm.models.generative`) is evaluated by it, plus ``params``;
    ``labels`` (per split, when the data have them) reach it. Energy models get:

    - ``params``; ``test_loss`` (the spec's loss) and its terms; ``test_ssm_loss``; ``test_sm_loss``
      (when the dimension is at most ``sm_max_dim``);
    - ``test_loglik`` (nats per sample) with ``test_loglik_sample_se`` (over test rows): exact for
      normalised models (NICE, plus ``test_bpd`` when ``logit_alpha`` is given), otherwise
      mean(−E) − log Ẑ by importance sampling with ``test_log_z``, ``test_loglik_se`` (the Monte-Carlo
      error of log Ẑ, delta method) and ``test_is_ess``;
    - with ``true_density`` (an object with ``score`` or ``log_prob``, or a score callable):
      ``fisher_divergence`` on the test rows, and ``true_test_loglik`` when it has ``log_prob``.
    """
    opts = EvalOptions(**(eval_options or {}))
    _check_splits(splits, ("test",))
    entry = _entry(spec)
    if entry.evaluate is not None:
        torch.manual_seed(opts.seed)
        metrics, images = entry.evaluate(model, splits, opts, spec, labels)
        return {"params": float(count_parameters(model)), **metrics}, images
    device = next(model.parameters()).device
    test = splits["test"].to(device)
    dim = test[0].numel()
    gen = lambda dev="cpu": torch.Generator(device=dev).manual_seed(opts.seed)  # noqa: E731 — same draws for every model
    was_training = model.training
    model.eval()
    torch.manual_seed(opts.seed)  # the losses' own draws (dsm noise): reproducible across models
    out: dict[str, float] = {"params": float(count_parameters(model))}

    # DKEF's own objective would refit α; evaluation uses the finalised α (the model's forward).
    loss_terms = evaluate_objective(model, _energy_objective(spec.loss.name, spec.loss.options), test, opts.batch_size)
    out.update({f"test_{k}": v for k, v in loss_terms.items()})
    out["test_ssm_loss"] = evaluate_objective(model, _energy_objective("ssm", {"generator": gen(device)}), test,
                                              opts.batch_size)["loss"]
    if dim <= opts.sm_max_dim:
        out["test_sm_loss"] = evaluate_objective(model, _energy_objective("sm"), test, opts.batch_size)["loss"]

    if _entry(spec).normalised:
        with torch.no_grad():
            out["test_loglik"], out["test_loglik_sample_se"] = _batched_mean(model.log_prob, test, opts.batch_size)
            if opts.logit_alpha is not None:
                out["test_bpd"], _ = _batched_mean(
                    lambda x: bits_per_dim(model.log_prob(x), x, alpha=opts.logit_alpha, levels=opts.pixel_levels),
                    test, opts.batch_size)
    else:
        with torch.no_grad():
            mean_log_p, sample_se = _batched_mean(lambda x: -model(x), test, opts.batch_size)
        log_z = importance_log_normaliser(lambda x: -model(x), dim, n_samples=opts.is_samples, scale=opts.is_scale,
                                          batch_size=opts.is_batch_size, generator=gen(), device=device,
                                          dtype=test.dtype)
        out.update(test_loglik=mean_log_p - log_z.log_z, test_loglik_se=log_z.se, test_log_z=log_z.log_z,
                   test_is_ess=log_z.ess, test_loglik_sample_se=sample_se)

    if true_density is not None:
        out["fisher_divergence"] = fisher_divergence(model, true_score_function(true_density), test, opts.batch_size)
        if hasattr(true_density, "log_prob"):
            with torch.no_grad():
                lp = true_density.log_prob(test.cpu())
            out["true_test_loglik"] = float((lp.flatten(1).sum(1) if lp.dim() > 1 else lp).double().mean())
    model.train(was_training)
    return out, None


class SolverRecorder(Callback):
    """Collects the DEQ solver metrics of every training step (all DEQ layers of the model)."""

    def __init__(self) -> None:
        self.nsteps: list[float] = []
        self.residual_max = 0.0

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        nsteps = [v for k, v in metrics.items() if k.startswith("solver") and k.endswith("_nstep")]
        if nsteps:
            self.nsteps.append(sum(nsteps) / len(nsteps))
        for k, v in metrics.items():
            if k.startswith("solver") and k.endswith("_abs_residual_max"):
                self.residual_max = max(self.residual_max, v)

    def summary(self) -> dict[str, float]:
        if not self.nsteps:
            return {}
        return {"solver_nstep_mean": sum(self.nsteps) / len(self.nsteps), "solver_residual_max": self.residual_max}


def run(spec: ExperimentSpec, splits: dict[str, Tensor], train_settings: TrainSettings,
        callbacks: list[Callback] | None = None, checkpoint_dir: Path | str | None = None,
        eval_options: dict | None = None, true_density: Any = None) -> dict[str, float | str]:
    """Build, train (:func:`deqsm.train.fit`), finalise and evaluate on the test split.

    Returns flat metrics: everything of :func:`evaluate`, plus ``peak_bytes`` and ``memory_kind`` (a
    string: what the bytes count), ``step_ms_median``, ``best_val_loss``, ``best_step``, ``train_steps``,
    ``stopped_early`` and, for DEQ models, ``solver_nstep_mean`` / ``solver_residual_max`` over the
    training steps.
    """
    EvalOptions(**(eval_options or {}))  # reject bad evaluation options before training
    _check_splits(splits, SPLITS)
    recorder = SolverRecorder()
    model, result = train_model(spec, splits, train_settings, [*(callbacks or []), recorder], checkpoint_dir)
    metrics: dict[str, float | str] = {
        "peak_bytes": float(result.peak_bytes), "memory_kind": result.memory_kind,
        "step_ms_median": result.step_ms_median, "best_val_loss": result.best_val_loss,
        "best_step": float(result.best_step), "train_steps": float(result.steps),
        "stopped_early": float(result.stopped_early), **recorder.summary(),
    }
    metrics.update(evaluate(spec, model, splits, eval_options, true_density))
    return metrics
