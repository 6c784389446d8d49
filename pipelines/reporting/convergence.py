"""Whether each variant trained until trained: the training loop's plateau rule, and the shape of the curve's end.

The rule (:func:`deqsm.train.fit`): training stops when ``train.patience`` evaluations in a row bring no
validation-loss improvement of more than ``train.min_delta`` (relative to the reference loss), or at the step
cap (``experiments.<exp>.train.steps``, else ``train.steps``). A run *converged* when the rule fired (its
summary's ``converged`` flag). A run that hit the cap may still have levelled off: its curve is *flat* when the
mean validation loss of the last quarter of the evaluations differs from the quarter before it by at most
``flat_tol`` (default 5%) of the curve's whole range.

Per variant (the runs are its seeds) the verdict is "converged" when every run converged by the rule, "flat at
the cap" when none did but every run's curve is flat, "not converged" otherwise (a run still moving at the cap,
or a mix), and "unknown" when nothing is known. The table's columns: the verdict, the runs that converged by the
rule and those whose curve is flat (k/n), the steps trained (mean [min, max]), and the largest |change| of the
validation loss over the last quarter (% of the curve's range). Pure functions: the caller reads the curves and summaries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipelines.reporting.inputs import ExperimentData, number
from pipelines.reporting.tables import DASH, md_table

FLAT_TOL = 0.05


@dataclass(frozen=True)
class Convergence:
    """One run: the rule's flag (None: unknown), steps trained, best step, and its curve's last-quarter change."""

    converged: bool | None
    steps: float | None
    best_step: float | None
    final_change: float | None  # (mean last quarter − mean quarter before) / (max − min of the curve)
    flat: bool | None  # |final_change| <= flat_tol; None when final_change is
    degenerate: bool | None = None  # its loss fell below the data's floor (deqsm.floor); None: not watched


def final_change(val_losses: list[float]) -> float | None:
    """The change of the mean loss from the second-last quarter of the evaluations to the last one, as a fraction
    of the curve's whole range (max − min): scale-free, and not blown up by a loss that crosses zero."""
    q = len(val_losses) // 4
    if q == 0:
        return None
    before = sum(val_losses[-2 * q:-q]) / q
    last = sum(val_losses[-q:]) / q
    return (last - before) / max(max(val_losses) - min(val_losses), 1e-12)


def _flag(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    v = number(value)
    return None if v is None else v != 0.0


def _first(summary: dict, *keys: str) -> float | None:
    return next((v for v in (number(summary.get(k)) for k in keys) if v is not None), None)


def convergence(val_steps: list[float], val_losses: list[float], summary: dict,
                flat_tol: float = FLAT_TOL) -> Convergence:
    """One run's convergence from its validation curve (steps and losses of each evaluation) and its training
    summary (``converged``, ``steps``/``train_steps``, ``best_step``/``train_best_step``; missing: None).
    Evaluations with a missing or non-finite loss are left out; the rest are taken in step order."""
    if len(val_steps) != len(val_losses):
        raise ValueError(f"{len(val_steps)} validation steps but {len(val_losses)} losses")
    curve = sorted((s, v) for s, v in zip(val_steps, (number(x) for x in val_losses)) if v is not None)
    change = final_change([v for _, v in curve])
    return Convergence(
        converged=_flag(summary.get("converged")),
        steps=_first(summary, "steps", "train_steps"),
        best_step=_first(summary, "best_step", "train_best_step"),
        final_change=change,
        flat=None if change is None else abs(change) <= flat_tol,
        degenerate=_flag(summary.get("loss_degenerate")),
    )


def summarize(runs: list[Convergence]) -> dict[str, Any]:
    """Several seeds of one variant: counts, steps, the largest last-quarter change and the verdict."""
    steps = [r.steps for r in runs if r.steps is not None]
    changes = [abs(r.final_change) for r in runs if r.final_change is not None]
    known = any(r.converged is not None or r.flat is not None for r in runs)
    if any(r.degenerate is True for r in runs):
        verdict = "degenerate"
    elif not known:
        verdict = "unknown"
    elif all(r.converged is True for r in runs):
        verdict = "converged"
    elif not any(r.converged is True for r in runs) and all(r.flat is True for r in runs):
        verdict = "flat at the cap"
    else:
        verdict = "not converged"
    return {
        "n": len(runs),
        "n_converged": sum(r.converged is True for r in runs),
        "n_flat": sum(r.flat is True for r in runs),
        "steps_mean": sum(steps) / len(steps) if steps else None,
        "steps_min": min(steps) if steps else None,
        "steps_max": max(steps) if steps else None,
        "final_change_max_abs": max(changes) if changes else None,
        "n_degenerate": sum(r.degenerate is True for r in runs),
        "n_watched": sum(r.degenerate is not None for r in runs),
        "verdict": verdict,
    }


def _steps_cell(s: dict) -> str:
    mean, low, high = (number(s.get(k)) for k in ("steps_mean", "steps_min", "steps_max"))
    if mean is None:
        return DASH
    if low is None or high is None or math.isclose(low, high):
        return f"{mean:,.0f}"
    return f"{mean:,.0f} [{low:,.0f}, {high:,.0f}]"


def convergence_table_md(rows: list[tuple[str, dict]], flat_tol: float = FLAT_TOL) -> str:
    """A Markdown table, one row per variant (``(name, summarize(...))``), and footnotes on its columns."""
    header = ["variant", "verdict", "converged (plateau rule)", "flat at the end", "steps",
              "last-quarter change", "degenerate"]
    body = []
    for name, s in rows:
        n = int(s.get("n") or 0)
        count = (lambda k: f"{int(s.get(k) or 0)}/{n}" if n else DASH)  # noqa: E731
        change = number(s.get("final_change_max_abs"))
        watched = int(s.get("n_watched") or 0)
        body.append([name, str(s.get("verdict", "unknown")), count("n_converged"), count("n_flat"), _steps_cell(s),
                     DASH if change is None else f"{100 * change:.2f}%",
                     f"{int(s.get('n_degenerate') or 0)}/{watched}" if watched else DASH])
    notes = [
        "- Converged (plateau rule): runs (k of n seeds) whose training stopped because `train.patience` "
        "evaluations brought no validation-loss improvement of more than `train.min_delta` (relative), rather than at "
        "the step cap (`experiments.<exp>.train.steps`, else `train.steps`); verdict \"converged\": all of them, "
        "\"flat at the cap\": none, but every curve is flat, \"not converged\": any other mix.",
        f"- Flat at the end: runs whose mean validation loss over the last quarter of the evaluations moved from the "
        f"quarter before by at most {100 * flat_tol:g}% of the curve's whole range (max − min); last-quarter change: "
        "the largest such |change| (in % of the range) over the "
        f"runs; steps: mean [min, max] over the runs. {DASH}: not known (fewer than 4 evaluations, no summary).",
        "- Degenerate: runs on data with a known score whose score-matching loss fell below the data's floor "
        "−½E‖∇log p‖² (`deqsm.floor`; the MLflow tag `deqsm.degenerate_loss`): a loss without a lower bound, not a "
        f"better fit. Verdict \"degenerate\" when any run is. {DASH}: no floor known (real data, DSM).",
    ]
    return md_table(header, body) + "\n\n" + "\n".join(notes)



def experiment_convergence(data: ExperimentData) -> list[tuple[str, dict]]:
    """``(variant, summarize(...))`` per variant with metrics: its seeds' validation curves (train stage) and
    training summaries (seeds.json, evaluate stage)."""
    rows = []
    for variant in data.variants():
        curves = data.seed_curves.get(variant, {})
        if variant not in data.metrics or not curves:
            continue
        summaries = data.seed_metrics.get(variant, {})
        rows.append((variant, summarize([convergence(*curve.series("val_loss"), summaries.get(seed, {}))
                                         for seed, curve in sorted(curves.items())])))
    return rows
