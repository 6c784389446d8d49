"""How deep each DEQ of an experiment is in effect: the "Effective depth" table (Markdown and CSV), the sentence
judging it, and the figure of the headline metric against the contraction (evaluate stage's ``deq_*`` metrics).

Per DEQ variant, metrics.json holds (mean over seeds ``<key>_mean``, error ``<key>_se_seeds``; each seed's value
in seeds.json):

- ``deq_contraction``: the local Lipschitz constant of the cell f(·, x) at its fixed point z* (power iteration on
  the Jacobian), mean over test rows and DEQ layers; below 1 a contraction, near 0 the DEQ is in effect one layer;
- ``deq_weight_norm``: the spectral norm ‖Ŵ‖₂ of the normalised weight (a convolution's operator norm), mean over
  DEQ layers;
- ``deq_iterations``: mean forward solver iterations to tolerance at evaluation;
- ``deq_depth_gain``: ‖z* − f(z₀, x)‖ / ‖z*‖, how far the equilibrium is from one application of the cell;
- ``deq_grad_cosine``: cosine of the trained backward mode's parameter gradient with the exact implicit one.

Explicit variants have none of them; results from before these metrics have no table and no figure.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from deqsm.depth import DEPTH_KEYS
from pipelines.artifacts import Artifacts
from pipelines.reporting.figures import _pyplot, _save
from pipelines.reporting.inputs import ExperimentData, number
from pipelines.reporting.tables import md_table
from pipelines.reporting.verdicts import Estimate, estimate

DEPTH_COLUMNS = ["experiment", "variant", "n_seeds", *(f"{k}{s}" for k in DEPTH_KEYS for s in ("", "_se"))]
# Below either threshold a DEQ is judged close to one layer: a cell that contracts this hard, or a fixed point
# this close to one application of the cell, leaves little for the further iterations to add.
ONE_LAYER_CONTRACTION = 0.3
ONE_LAYER_GAIN = 0.05
# column header, metrics key, format
DEPTH_CELLS = [("contraction ± se", "deq_contraction", ".3f"), ("‖Ŵ‖₂ ± se", "deq_weight_norm", ".3f"),
               ("iterations at evaluation ± se", "deq_iterations", ".1f"),
               ("depth gain ± se", "deq_depth_gain", ".3f"),
               ("gradient cosine (trained vs exact) ± se", "deq_grad_cosine", ".4f")]


def depth_variants(data: ExperimentData) -> list[str]:
    """The variants (in the report's order) whose metrics.json entry has ``deq_contraction_mean``."""
    return [v for v in data.variants()
            if number((data.metrics.get(v) or {}).get("deq_contraction_mean")) is not None]


def depth_rows(data: ExperimentData) -> list[dict[str, Any]]:
    """One row per variant with a contraction: each ``deq_*`` key's mean over seeds and its standard error across
    them (None where unknown or with one seed)."""
    rows = []
    for variant in depth_variants(data):
        m = data.metrics[variant]
        n = number(m.get("n_seeds"))
        row: dict[str, Any] = {"experiment": data.name, "variant": variant,
                               "n_seeds": int(n) if n is not None else None}
        for key in DEPTH_KEYS:
            est = estimate(m, key)
            row[key], row[f"{key}_se"] = est.value, est.se
        rows.append(row)
    return rows


def one_layer(row: dict[str, Any]) -> bool:
    """Whether the DEQ of ``row`` is close to a one-layer network (a threshold of either measure)."""
    c, gain = row["deq_contraction"], row["deq_depth_gain"]
    return (c is not None and c < ONE_LAYER_CONTRACTION) or (gain is not None and gain < ONE_LAYER_GAIN)


def depth_sentence(row: dict[str, Any]) -> str:
    """The verdict on one DEQ variant's effective depth, with the numbers behind it."""
    c, gain, iters = row["deq_contraction"], row["deq_depth_gain"], row["deq_iterations"]
    near = one_layer(row)
    where = ("no depth gain measured" if gain is None else
             f"its fixed point {'within ' if near else ''}{100 * gain:.1f}% {'of' if near else 'from'} one cell "
             "application")
    shown = f"contraction {c:.3f}, {where}" + (f", {iters:.1f} solver iterations" if iters is not None else "")
    if near:
        return (f"`{row['variant']}` is close to a one-layer network ({shown}; thresholds: contraction < "
                f"{ONE_LAYER_CONTRACTION:g} or depth gain < {ONE_LAYER_GAIN:g}).")
    tail = "; the cell is not a contraction at z*" if c >= 1 else ""
    return (f"`{row['variant']}` is deeper than one layer ({shown}{tail}): the iterations beyond the first move the "
            "equilibrium.")


def depth_table_md(rows: list[dict[str, Any]]) -> str:
    """The "Effective depth" table with its footnotes and verdicts; "" when no variant has the metrics."""
    if not rows:
        return ""
    body = [[r["variant"], *(Estimate(r[k], r[f"{k}_se"]).cell(spec) for _, k, spec in DEPTH_CELLS)] for r in rows]
    notes = ["Contraction: the local Lipschitz constant of the DEQ cell f(·, x) at its fixed point z* (power "
             "iteration on the Jacobian), mean over test rows and DEQ layers; below 1 a contraction, near 0 the DEQ "
             "is in effect one layer.",
             "‖Ŵ‖₂: the spectral norm of the normalised weight (a convolution's operator norm), mean over DEQ layers.",
             "Iterations at evaluation: mean forward solver iterations to tolerance on the test rows.",
             "Depth gain: ‖z* − f(z₀, x)‖ / ‖z*‖, how far the equilibrium is from one application of the cell "
             "(0: the DEQ is one layer).",
             "Gradient cosine: of the trained backward mode's parameter gradient with the exact implicit one (1: "
             "exact).",
             "Each value: the mean over the variant's training seeds ± the standard error across them."]
    return (md_table(["variant", *(h for h, _, _ in DEPTH_CELLS)], body) + "\n\n"
            + "\n".join(f"- {n}" for n in notes) + "\n\n" + "\n".join(f"- {depth_sentence(r)}" for r in rows) + "\n")


def depth_section_md(artifacts: Artifacts, data: ExperimentData, figures: list[Path]) -> list[str]:
    """REPORT.md's "Effective depth" part of one experiment (table, verdicts, figure); empty without the metrics."""
    table = depth_table_md(depth_rows(data))
    if not table:
        return []
    path = depth_figure_path(artifacts, data)
    return ["### Effective depth\n", f"Also as [CSV]({artifacts.rel(artifacts.tables / f'{data.name}_depth.csv')}).\n",
            table, *([f"![quality against contraction]({artifacts.rel(path)})\n"] if path in figures else [])]


def depth_figure_path(artifacts: Artifacts, data: ExperimentData) -> Path:
    return artifacts.figures / f"depth_{data.name}.png"


def seed_points(data: ExperimentData, variant: str, key: str) -> list[tuple[float, float]]:
    """(contraction, ``key``) of each seed of ``variant`` that has both (seeds.json); the means when none has."""
    pts = [(c, y) for m in data.seed_metrics.get(variant, {}).values()
           if (c := number(m.get("deq_contraction"))) is not None and (y := number(m.get(key))) is not None]
    if pts:
        return pts
    m = data.metrics.get(variant) or {}
    c, y = number(m.get("deq_contraction")), number(m.get(key))
    return [(c, y)] if c is not None and y is not None else []


def depth_figure(artifacts: Artifacts, data: ExperimentData) -> Path | None:
    """The headline metric against the contraction: a point per seed of each DEQ variant, each explicit variant
    as a horizontal line at its mean with a shaded ±1 standard error band. None when no DEQ has a contraction."""
    main = data.headline()
    points = {v: pts for v in depth_variants(data) if (pts := seed_points(data, v, main.key))}
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (variant, pts) in enumerate(points.items()):
        ax.scatter(*zip(*pts), s=36, color=f"C{i % 10}", label=f"{variant} (DEQ, {len(pts)} seed(s))", zorder=3)
    for j, variant in enumerate(data.explicit_variants(), start=len(points)):
        est = estimate(data.metrics.get(variant), main.key)
        if est.value is None:
            continue
        color = f"C{j % 10}"
        ax.axhline(est.value, ls="--", lw=1.2, color=color, label=f"{variant} (explicit, depth {data.depth(variant)})")
        if est.se is not None:
            ax.axhspan(est.value - est.se, est.value + est.se, color=color, alpha=0.15, lw=0)
    ax.axvline(1.0, ls=":", color="gray", lw=1)
    ax.set_xlabel("contraction of the DEQ cell at its fixed point (local Lipschitz constant)")
    label = main.label.removesuffix(" ± se")
    direction = "higher" if main.higher_is_better else "lower"
    ax.set_ylabel(label if "is better" in label else f"{label} ({direction} is better)")
    ax.set_title(f"{data.name}: quality against contraction (band: ±1 se of the explicit mean)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, depth_figure_path(artifacts, data))
