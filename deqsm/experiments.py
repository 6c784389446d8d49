"""The bridge the pipeline calls: one variant = a spec (model, variant, loss, DEQ settings), built by its
model family (:data:`deqsm.models.MODELS`), trained by :func:`deqsm.train.fit`, finalised, and evaluated by
the family's own evaluation (density models: test log-likelihood and losses; the VAE: its ELBO; NCSN: the
Fréchet distance of its samples), plus parameters, memory, time per step and solver steps.

    spec = VariantSpec(name="dkef-gaussian-deq-ssm", model="dkef", variant="deq", loss={"name": "ssm"})
    metrics = run(spec, {"train": ..., "val": ..., "test": ...}, TrainSettings(steps=500))

No ray / mlflow / dvc here: progress goes to ``deqsm.train`` callbacks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, Field, model_validator
from torch import nn

from deqsm.config import DEQSettings, LossSettings
from deqsm.depth import deq_layers, effective_depth
from deqsm.floor import FLOOR_LOSSES, DegenerateLossGuard
from deqsm.losses import get_loss
from deqsm.models import MODELS, EvalOptions, ModelFamily
from deqsm.models.blocks import VARIANTS, count_parameters
from deqsm.schema import Strict, known_name
from deqsm.train import Callback, FitResult, Objective, TrainSettings, fit

Tensor = torch.Tensor
SPLITS = ("train", "val", "test")
DEPTH_ROWS = 256  # test rows the effective depth of a DEQ is measured on (its gradient cosine: the first 64)


# The fields a variant's spec shares with params.yaml's experiment sections (pipelines.settings), defined once.
ModelName = Annotated[str, AfterValidator(lambda v: known_name(v, MODELS)),
                      Field(description="model family (deqsm.models.MODELS): dkef | nice | energy_mlp | vae | ncsn")]
VariantName = Annotated[str, AfterValidator(lambda v: known_name(v, VARIANTS)),
                        Field(description="network variant (deqsm.models.blocks.VARIANTS): deq | explicit")]
Depth = Annotated[int, Field(ge=1, description="hidden layers of an explicit net (ignored by deq)")]
Width = Annotated[int, Field(ge=1, description="hidden width (DKEF feature net, NICE coupling nets, score net; "
                                               "NCSN channels)")]


class VariantSpec(Strict):
    """One trainable variant (a row of a results table): its model family, network variant, loss and DEQ
    settings (unknown keys rejected)."""

    name: str
    model: ModelName
    variant: VariantName
    depth: Depth = 2
    width: Width = 64
    model_options: dict[str, Any] = Field(default_factory=dict, description="model-specific knobs, checked by name")
    loss: LossSettings
    deq: DEQSettings = Field(default_factory=DEQSettings)

    @model_validator(mode="after")
    def _consistent(self) -> "VariantSpec":
        entry = self.family
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

    @property
    def family(self) -> ModelFamily:
        return MODELS.get(self.model)


# Evaluation options that are facts about the prepared data, and where its manifest records them ("info"):
# NICE's bits/dim needs the pixel levels and the logit squeeze, NCSN's sampler the pixel range.
DATA_FACTS = {"pixel_levels": "pixel_levels", "logit_alpha": "logit_alpha", "pixel_range": "scale"}


def with_data_facts(family: ModelFamily, options: dict[str, Any], manifest_info: dict[str, Any],
                    dataset: str) -> dict[str, Any]:
    """``options`` with the data facts (:data:`DATA_FACTS`) the family's evaluation uses taken from the prepared
    dataset's manifest: one source, so they cannot disagree with how the data were made. A setting that names
    a fact differently from the manifest is refused, naming both values."""
    out = dict(options)
    known = family.eval_options.model_fields
    for option, info_key in DATA_FACTS.items():
        if option not in known or info_key not in manifest_info:
            continue
        value = manifest_info[info_key]
        if option == "pixel_range" and value not in ("unit", "symmetric"):
            continue  # raw pixels: the family's check says what it needs
        if option in out and out[option] != value:
            raise ValueError(f"eval_options.{option} = {out[option]!r} conflicts with the prepared dataset "
                             f"{dataset!r}, whose manifest records {info_key} = {value!r}: remove "
                             f"eval_options.{option} (evaluation reads it from the manifest)")
        out[option] = value
    return out


def check_eval_options(spec: VariantSpec, options: dict[str, Any] | None = None) -> EvalOptions:
    """``options`` validated as the evaluation options of ``spec``'s family (unknown keys rejected)."""
    return spec.family.eval_options(**(options or {}))


def make_objective(spec: VariantSpec, train: Tensor) -> Objective:
    """The training objective ``(model, batch) -> LossOutput`` of ``spec``."""
    return spec.family.objective(spec.loss.name, spec.loss.options, train)


def build(spec: VariantSpec, train: Tensor) -> tuple[nn.Module, Objective]:
    """The model of ``spec`` (sized by ``train``'s rows; DKEF also places its inducing points there) and
    its training objective."""
    if not torch.is_tensor(train) or not train.is_floating_point() or train.dim() < 2 or train.shape[0] == 0:
        raise ValueError("train must be a non-empty floating-point tensor with rows as samples, shape (N, ...)")
    model = spec.family(train[0].numel(), variant=spec.variant, width=spec.width, depth=spec.depth,
                        deq=spec.deq, train=train, **spec.model_options)
    return model, make_objective(spec, train)


def finalize(spec: VariantSpec, model: nn.Module, train: Tensor, val: Tensor | None = None) -> dict[str, float]:
    """The model's step after training (DKEF: its ridge λ fitted on ``val``, α solved on the whole training set);
    returns what it chose (empty for a family without one)."""
    family = spec.family
    if family.finalize is None:
        return {}
    device = next(model.parameters()).device
    return family.finalize(model, spec.loss.name, spec.loss.options, train.to(device),
                           None if val is None else val.to(device)) or {}


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


def degenerate_loss_guard(spec: VariantSpec, floor: tuple[float, float] | None) -> DegenerateLossGuard | None:
    """The guard of :mod:`deqsm.floor` for a density model trained by a score-matching loss on data whose ``floor``
    (value, standard error: :func:`deqsm.floor.data_floor`) is known; None otherwise."""
    if floor is None or not spec.family.loss_on_data or spec.loss.name not in FLOOR_LOSSES:
        return None
    return DegenerateLossGuard(*floor)


def train_model(spec: VariantSpec, splits: dict[str, Tensor], train_settings: TrainSettings,
                callbacks: list[Callback] | None = None, checkpoint_dir: Path | str | None = None,
                loss_floor: tuple[float, float] | None = None) -> tuple[nn.Module, FitResult]:
    """Build (seeded by ``train_settings.seed``), fit and finalise; returns the model and the fit result. With the
    data's ``loss_floor`` (generated data: :func:`deqsm.floor.data_floor`), a score-matching loss below it flags the
    run as degenerate (:mod:`deqsm.floor`; ``loss_degenerate`` in the result's summary)."""
    _check_splits(splits, ("train",))
    torch.manual_seed(train_settings.seed)
    model, objective = build(spec, splits["train"])
    guard = degenerate_loss_guard(spec, loss_floor)
    result = fit(model, objective, splits["train"], splits.get("val"), train_settings,
                 [*(callbacks or []), *([guard] if guard else [])], checkpoint_dir)
    chosen = finalize(spec, model, splits["train"], splits.get("val"))
    result.extra.update({f"final_{k}": float(v) for k, v in chosen.items()})
    if guard is not None:
        result.extra.update(guard.summary())
    return model, result


def evaluate_variant(spec: VariantSpec, model: nn.Module, splits: dict[str, Tensor], eval_options: dict | None = None,
                     true_density: Any = None, labels: dict[str, Tensor] | None = None
                     ) -> tuple[dict[str, float], Tensor | None]:
    """Test metrics of a trained (finalised) model by its family's evaluation, plus ``params``; and samples
    (images in [0, 1]) when the model makes them.

    ``eval_options``: the family's evaluation options (:func:`check_eval_options`). ``true_density`` (generated data:
    an object with ``score`` or ``log_prob``) and ``labels`` (per split, when the data have them) reach the
    family's evaluation; density models use the first (Fisher divergence), NCSN the second (its FD
    classifier). See :func:`deqsm.models.density.evaluate_density`, :func:`deqsm.models.vae.evaluate_vae`,
    :func:`deqsm.models.ncsn.evaluate_ncsn`.
    """
    opts = check_eval_options(spec, eval_options)
    _check_splits(splits, ("test",))
    torch.manual_seed(opts.seed)
    metrics, images = spec.family.evaluate(model, splits, opts, spec, true_density=true_density, labels=labels)
    if deq_layers(model):  # how deep the DEQ is at its test-time fixed points (deqsm.depth)
        device = next(model.parameters()).device
        metrics.update(effective_depth(model, make_objective(spec, splits["train"]),
                                       splits["test"][:DEPTH_ROWS].to(device), seed=opts.seed))
    return {"params": float(count_parameters(model)), **metrics}, images


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


def run(spec: VariantSpec, splits: dict[str, Tensor], train_settings: TrainSettings,
        callbacks: list[Callback] | None = None, checkpoint_dir: Path | str | None = None,
        eval_options: dict | None = None, true_density: Any = None) -> dict[str, float | str]:
    """Build, train (:func:`deqsm.train.fit`), finalise and evaluate on the test split.

    Returns flat metrics: everything of :func:`evaluate_variant`, plus ``peak_bytes`` and ``memory_kind`` (a
    string: what the bytes count), ``step_ms_median``, ``best_val_loss``, ``best_step``, ``train_steps``,
    ``stopped_early`` and, for DEQ models, ``solver_nstep_mean`` / ``solver_residual_max`` over the
    training steps.
    """
    check_eval_options(spec, eval_options)  # reject bad evaluation options before training
    _check_splits(splits, SPLITS)
    recorder = SolverRecorder()
    model, result = train_model(spec, splits, train_settings, [*(callbacks or []), recorder], checkpoint_dir)
    metrics: dict[str, float | str] = {
        "peak_bytes": float(result.peak_bytes), "memory_kind": result.memory_kind,
        "step_ms_median": result.step_ms_median, "best_val_loss": result.best_val_loss,
        "best_step": float(result.best_step), "train_steps": float(result.steps),
        "stopped_early": float(result.stopped_early), **recorder.summary(),
    }
    metrics.update(evaluate_variant(spec, model, splits, eval_options, true_density)[0])
    return metrics
