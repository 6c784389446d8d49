"""One training loop for every experiment: ``fit(model, objective, train, val, settings, callbacks)``.

It knows nothing of Ray or MLflow: per-step and per-evaluation metrics go to callbacks, which the
pipeline turns into Ray Tune reports and MLflow metrics. What it does:

- optimiser and learning-rate schedule from :class:`TrainSettings`, gradient clipping, seeds;
- evaluation every ``eval_every`` steps on the validation set (the same random draws each time:
  :func:`validation_loss`), early stopping on its loss, and the best weights restored at the end; a model with
  DEQ layers also reports their contraction, iterations and depth gain at each evaluation
  (:func:`deqsm.depth.depth_probe` on one validation batch: ``deq_*`` keys beside ``val_*``);
- a convergence rule: training stops when ``patience`` evaluations in a row bring no improvement larger
  than ``min_delta`` (relative to the last loss that counted), or at the step cap ``steps``; ``FitResult.converged``
  says which (True: the plateau rule fired);
- per-step metrics: the loss and its terms, the DEQ solver stats (steps, residuals), step time and the
  memory of the step (:mod:`deqsm.metrics.memory`);
- checkpoints (atomic writes; resumed with ``torch.load(weights_only=True)``);
- a clear error for a non-finite loss or a DEQ solver that keeps failing to converge.
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from deqsm.schema import Strict
from deqsm.deq import DEQ
from deqsm.depth import deq_layers, depth_probe, grad_cosine
from deqsm.losses import LossOutput
from deqsm.metrics.memory import measure_step
from deqsm.registry import Registry

Tensor = torch.Tensor
Objective = Callable[[nn.Module, Tensor], LossOutput]

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")
OPTIMIZERS.register("adam")(torch.optim.Adam)
OPTIMIZERS.register("adamw")(torch.optim.AdamW)
OPTIMIZERS.register("sgd")(torch.optim.SGD)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, a solver that keeps failing); the message says why."""


class TrainSettings(Strict):
    """The ``train`` section of params.yaml."""

    steps: int = Field(1000, ge=1, description="optimisation steps")
    batch_size: int = Field(128, ge=1)
    optimizer: str = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float | None = Field(10.0, gt=0, description="max global gradient norm; null: no clipping")
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(4, ge=1, description="validation batches per evaluation")
    patience: int | None = Field(None, ge=1, description="evaluations without improvement before stopping")
    min_delta: float = Field(
        0.0, ge=0, description="relative improvement an evaluation needs to reset the patience count: "
        "val_loss < best - min_delta * |best| (the best weights are still those of the lowest val_loss)")
    checkpoint_every: int | None = Field(None, ge=1, description="steps between checkpoints (default: eval_every)")
    max_nonconverged_steps: int | None = Field(
        None, ge=1, description="consecutive steps whose DEQ solve missed tol before training stops")
    grad_cosine_min: float | None = Field(0.99, ge=-1, le=1, description=(
        "a DEQ model measures, once trained, the cosine of its trained backward's gradient with the exact "
        "implicit one (train_grad_cosine); below this it warns in the log (train_grad_cosine_low; null: not "
        "measured)"))
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, v: str) -> str:
        OPTIMIZERS.get(v)  # an unknown name raises, listing the known ones
        return v


class Callback:
    """Receives metrics as training runs; override what you need."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, step: int, path: Path) -> None: ...


@dataclass
class FitResult:
    steps: int
    best_val_loss: float
    best_step: int
    stopped_early: bool  # the plateau rule fired (kept for compatibility; the same as ``converged``)
    step_ms_median: float
    peak_bytes: int
    memory_kind: str
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per evaluation
    clipped_fraction: float = 0.0  # of the steps whose gradient norm train.grad_clip cut down
    # True when training stopped because `patience` evaluations passed without an improvement of more than
    # min_delta (the plateau rule fired, also when at the last evaluation); False when it ran to the step cap
    # or no patience was set.
    converged: bool = False
    # a DEQ model's trained-backward gradient cosine with the exact one, at the end (deqsm.depth.grad_cosine), and
    # whether it fell below train.grad_cosine_min; None: not measured
    grad_cosine: float | None = None
    grad_cosine_low: bool | None = None
    # figures added after fit (deqsm.experiments.train_model): what the finalise step chose (final_*: DKEF's λ) and
    # the degenerate-loss guard's verdict (loss_*: deqsm.floor)
    extra: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float | str]:
        gradient = ({} if self.grad_cosine is None else
                    {"train_grad_cosine": self.grad_cosine, "train_grad_cosine_low": float(bool(self.grad_cosine_low))})
        return {**gradient, **self.extra,
            "steps": float(self.steps), "best_val_loss": self.best_val_loss, "best_step": float(self.best_step),
            "stopped_early": float(self.stopped_early), "step_ms_median": self.step_ms_median,
            "peak_bytes": float(self.peak_bytes), "memory_kind": self.memory_kind,
            "clipped_fraction": self.clipped_fraction, "converged": float(self.converged),
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def deq_stats(model: nn.Module) -> dict[str, float]:
    """Solver metrics of every DEQ layer in ``model`` after its last forward (prefix per layer when several)."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, DEQ) and m.last_stats is not None]
    out: dict[str, float] = {}
    for name, m in layers:
        prefix = "solver" if len(layers) == 1 else f"solver.{name}"
        out.update(m.last_stats.summary(prefix))
    return out


def mean_loss(model: nn.Module, objective: Objective, data: Tensor, batch_size: int, max_batches: int | None = None) -> dict[str, float]:
    """Mean loss and terms over ``data`` (gradients w.r.t. x are still taken: score losses need them)."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    n = 0
    for i, start in enumerate(range(0, data.shape[0], batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        batch = data[start:start + batch_size]
        out = objective(model, batch)
        for k, v in out.scalars().items():
            totals[k] = totals.get(k, 0.0) + v * batch.shape[0]
        n += batch.shape[0]
    model.train(was_training)
    return {k: v / max(n, 1) for k, v in totals.items()}


# The validation estimate's own draws (SSM projections, DSM noise and σ, importance samples) come from this seed
# offset: see validation_loss.
VAL_SEED_OFFSET = 7919


def validation_loss(model: nn.Module, objective: Objective, data: Tensor, batch_size: int,
                    max_batches: int | None, seed: int) -> dict[str, float]:
    """:func:`mean_loss` with the estimator's random draws fixed by ``seed``: every evaluation of a run uses the
    same draws (common random numbers), so two evaluations differ only as the model does. With fresh draws
    the estimate's own spread (measured on trained models of the default experiments, 8 draws: about 6% of the
    loss for DKEF and NCSN, 21% for NICE's SSM, 0.6% for the VAE's bound) swamps the plateau rule's min_delta.
    The training stream's random state is left as it was, so training does not depend on when it evaluates."""
    devices = [data.device] if data.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return mean_loss(model, objective, data, batch_size, max_batches)


def improves(value: float, best: float, min_delta: float) -> bool:
    """Whether ``value`` counts as an improvement on ``best`` for the patience rule: lower than
    ``best - min_delta * |best|`` (relative threshold; any finite value improves on ``best = inf``)."""
    if math.isinf(best) and best > 0:
        return math.isfinite(value)
    return value < best - min_delta * abs(best)


def _atomic_save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path | str) -> dict:
    """Load a training checkpoint safely (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — re-raised with the file's name
        raise TrainingError(f"cannot load checkpoint {path}: {err}") from err


def fit(
    model: nn.Module,
    objective: Objective,
    train: Tensor,
    val: Tensor | None,
    settings: TrainSettings,
    callbacks: list[Callback] | None = None,
    checkpoint_dir: Path | str | None = None,
) -> FitResult:
    """Train ``model`` to minimise ``objective(model, batch).loss`` on ``train`` (rows are samples).

    With ``checkpoint_dir``, the state is saved there every ``checkpoint_every`` steps (``last.pt``) and
    training resumes from it when it exists. Early stopping watches the validation loss.

    Two "best" losses are tracked: ``best_val`` (the lowest val_loss seen; its weights are restored at the end)
    and ``plateau_ref`` (the loss of the last evaluation that counted as an improvement for the patience rule:
    lower than ``plateau_ref - min_delta * |plateau_ref|``). With ``min_delta=0`` they are the same. A small
    improvement below the threshold updates the restored weights but not the patience count.
    """
    callbacks = callbacks or []
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    model.to(device)
    train = train.to(device)
    val = val.to(device) if val is not None else None
    if train.shape[0] == 0:
        raise TrainingError("the training set is empty")
    opt = OPTIMIZERS.get(settings.optimizer)(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.steps)
             if settings.schedule == "cosine" else None)
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None
    ckpt_every = settings.checkpoint_every or settings.eval_every

    step = 0
    perm = torch.randperm(train.shape[0], generator=gen)
    cursor = 0
    best_val, best_step, best_state = math.inf, 0, None
    history: list[dict[str, float]] = []
    evals_without_improvement = 0
    plateau_ref = math.inf  # the loss the patience rule compares against (see the docstring)
    # Timings, peak memory and clipped steps cover every step, also across a resume (saved with the checkpoint).
    step_times: list[float] = []
    peak, memory_kind, clipped_steps = 0, "autograd_saved_bytes", 0
    if ckpt_path is not None and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None and "scheduler" in state:
            sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step, best_val, best_step = int(state["step"]), float(state["best_val"]), int(state["best_step"])
        best_state = state.get("best_model")
        history = list(state.get("history", []))
        evals_without_improvement = int(state.get("evals_without_improvement", 0))
        plateau_ref = float(state.get("plateau_ref", best_val))  # older checkpoints: min_delta was 0
        perm, cursor = state["perm"], int(state["cursor"])
        step_times = [float(t) for t in state.get("step_seconds", [])]
        peak, memory_kind = int(state.get("peak_bytes", 0)), str(state.get("memory_kind", memory_kind))
        clipped_steps = int(state.get("clipped_steps", 0))

    def save_checkpoint() -> None:
        if ckpt_path is None:
            return
        _atomic_save({
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            **({"scheduler": sched.state_dict()} if sched is not None else {}),
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step,
            "best_val": best_val, "best_step": best_step, "best_model": best_state, "history": history,
            "evals_without_improvement": evals_without_improvement, "plateau_ref": plateau_ref,
            "perm": perm, "cursor": cursor,
            "step_seconds": torch.tensor(step_times, dtype=torch.float64), "peak_bytes": peak,
            "memory_kind": memory_kind, "clipped_steps": clipped_steps,
        }, ckpt_path)
        for cb in callbacks:
            cb.on_checkpoint(step, ckpt_path)

    params = [p for p in model.parameters() if p.requires_grad]
    nonconverged_run = 0
    # A checkpoint written when early stopping fired resumes as stopped, not as more training.
    stopped_early = settings.patience is not None and evals_without_improvement >= settings.patience
    bar = None
    if settings.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.steps, initial=step, desc="train", dynamic_ncols=True, leave=False)
    model.train()
    try:
        while step < settings.steps and not stopped_early:
            if cursor + settings.batch_size > train.shape[0]:
                perm, cursor = torch.randperm(train.shape[0], generator=gen), 0
            idx = perm[cursor:cursor + settings.batch_size].to(device)
            cursor += settings.batch_size
            batch = train[idx]
            opt.zero_grad(set_to_none=True)
            holder: dict[str, LossOutput] = {}

            def closure() -> Tensor:
                holder["out"] = objective(model, batch)
                return holder["out"].loss

            loss, mem = measure_step(closure, params, device)
            out = holder["out"]
            if not bool(torch.isfinite(loss)):
                raise TrainingError(f"non-finite loss ({float(loss)}) at step {step + 1}; terms: "
                                    f"{ {k: round(v, 6) for k, v in out.scalars().items()} }")
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, settings.grad_clip) if settings.grad_clip
                         else torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in params if p.grad is not None)))
            if not bool(torch.isfinite(torch.as_tensor(grad_norm))):
                raise TrainingError(f"non-finite gradient norm at step {step + 1} (loss {float(loss):.4g})")
            clipped = bool(settings.grad_clip) and float(grad_norm) > settings.grad_clip
            clipped_steps += clipped
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            step_times.append(mem.step_seconds)
            peak, memory_kind = max(peak, mem.peak_bytes), mem.memory_kind
            metrics = {**{f"train_{k}": v for k, v in out.scalars().items()}, **deq_stats(model),
                       "grad_norm": float(grad_norm), "grad_clipped": float(clipped), "lr": opt.param_groups[0]["lr"],
                       "step_ms": 1000 * mem.step_seconds, "peak_bytes": float(mem.peak_bytes)}
            if settings.max_nonconverged_steps is not None and "solver_converged" in metrics:
                nonconverged_run = 0 if metrics["solver_converged"] else nonconverged_run + 1
                if nonconverged_run >= settings.max_nonconverged_steps:
                    raise TrainingError(
                        f"the DEQ solver missed its tolerance for {nonconverged_run} consecutive steps "
                        f"(last residual {metrics['solver_abs_residual_max']:.3g} after "
                        f"{int(metrics['solver_nstep'])} iterations) at step {step}")
            for cb in callbacks:
                cb.on_step(step, metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.4g}",  # solver iterations for DEQ models only
                                **({"nstep": int(metrics["solver_nstep"])} if "solver_nstep" in metrics else {}),
                                **({"plateau": f"{evals_without_improvement}/{settings.patience}"}
                                   if settings.patience is not None else {}))
            if step % settings.eval_every == 0 or step == settings.steps:
                data = val if val is not None else train
                ev = {f"val_{k}": v for k, v in validation_loss(model, objective, data, settings.batch_size,
                                                               settings.eval_batches,
                                                               settings.seed + VAL_SEED_OFFSET).items()}
                # a DEQ's contraction, iterations and depth gain now (deqsm.depth; nothing for an explicit model)
                ev.update(depth_probe(model, objective, data[:settings.batch_size],
                                      seed=settings.seed + VAL_SEED_OFFSET))
                ev["step"] = float(step)
                history.append(ev)
                if ev["val_loss"] < best_val:  # the weights to restore: the lowest loss, however small the gain
                    best_val, best_step = ev["val_loss"], step
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                # The patience count: only a gain of more than min_delta (relative) resets it.
                if improves(ev["val_loss"], plateau_ref, settings.min_delta):
                    plateau_ref, evals_without_improvement = ev["val_loss"], 0
                else:
                    evals_without_improvement += 1
                for cb in callbacks:
                    cb.on_eval(step, ev)
                if settings.patience is not None and evals_without_improvement >= settings.patience:
                    stopped_early = True
            if step % ckpt_every == 0 or stopped_early or step == settings.steps:
                save_checkpoint()
            if stopped_early:
                break
    finally:
        if bar is not None:
            bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    cosine = low = None
    if settings.grad_cosine_min is not None and deq_layers(model):
        data = val if val is not None else train
        cosine = grad_cosine(model, objective, data[:settings.batch_size], seed=settings.seed + VAL_SEED_OFFSET)
        low = cosine < settings.grad_cosine_min
        if low:
            print(f"warning: train_grad_cosine {cosine:.4f} < train.grad_cosine_min {settings.grad_cosine_min:g}: "
                  "the DEQ trained on an inexact gradient (its backward against the exact implicit one); raise "
                  "deq.k or use deq.backward: implicit", flush=True)
    warm = step_times[1:] or step_times
    return FitResult(step, best_val, best_step, stopped_early, 1000 * statistics.median(warm) if warm else 0.0,
                     peak, memory_kind, history, clipped_steps / step if step else 0.0, converged=stopped_early,
                     grad_cosine=cosine, grad_cosine_low=low)
