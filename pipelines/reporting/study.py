"""The depth study of one experiment: which DEQ configuration (a search over ``deq.*`` values, e.g.
profiles/depth-study.yaml) the tune stage's trials favour on validation, how deep each one was in effect, and what
it cost against the explicit baselines ("Depth study" in REPORT.md, ``tables/<experiment>_study.csv`` and
``figures/study_<experiment>.png``).

It reads only best.json's ``results`` (every finished trial: its search values, its validation metric, and, per
trial, ``best_deq_contraction`` / ``best_deq_iterations`` / ``best_deq_depth_gain`` at its best validation step,
``peak_bytes`` and ``degenerate``; :mod:`pipelines.ray_search`). So every figure here is on validation data, where
the selection happens; the test-data verdict on the selected configuration is the experiment's table. Shown only
when the DEQ variants were searched over two or more deq configurations.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipelines.artifacts import Artifacts
from pipelines.reporting.figures import _pyplot, _save
from pipelines.reporting.inputs import ExperimentData, number
from pipelines.reporting.tables import md_table
from pipelines.trials import deq_only

STUDY_COLUMNS = ["experiment", "variant", "kind", "configuration", "metric", "value", "train.lr", "contraction",
                 "iterations", "depth_gain", "peak_mib", "trials", "degenerate", "selected"]
MIB = 2.0 ** 20


def deq_values(sample: dict[str, Any]) -> dict[str, Any]:
    """The deq settings a trial's search values set (a bundle's keys, then single ``deq.<key>`` values)."""
    out: dict[str, Any] = {}
    for key, value in sorted(sample.items()):
        if not deq_only(key):
            continue
        if isinstance(value, dict):
            out.update({f"{key[4:] + '.' if key != 'deq' else ''}{k}": v for k, v in value.items()})
        else:
            out[key[4:]] = value
    return out


# the order a configuration's settings are named in (others follow by name)
LABEL_ORDER = ("norm", "lam", "gain", "backward", "k", "tau", "solver", "tol", "max_iter")


def configuration_label(values: dict[str, Any]) -> str:
    """``norm=spectral lam=1.01 gain=learned backward=implicit`` (a phantom K only where the backward is phantom)."""
    rank = {k: i for i, k in enumerate(LABEL_ORDER)}
    shown = {k: values[k] for k in sorted(values, key=lambda k: (rank.get(k, len(rank)), k))
             if not (k == "k" and values.get("backward", "phantom") != "phantom")}
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()) or "(defaults)"


def _better(a: float, b: float, mode: str) -> bool:
    return a < b if mode == "min" else a > b


def study_rows(data: ExperimentData, metric: str, mode: str = "min") -> list[dict[str, Any]]:
    """One row per DEQ configuration (its best non-degenerate trial over the other search values) and one per
    explicit variant (its best trial); [] unless some DEQ variant was searched over two or more configurations."""
    results = [r for r in (data.tune or {}).get("results") or [] if number(r.get(metric)) is not None]
    deq_kinds = set(data.deq_variants())
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        values = deq_values(r.get("sample") or {}) if r["variant"] in deq_kinds else {}
        groups.setdefault((r["variant"], json.dumps(values, sort_keys=True, default=str)), []).append(r)
    if not any(sum(1 for v, _ in groups if v == variant) >= 2 for variant in deq_kinds):
        return []
    chosen = {v: json.dumps(deq_values(b.get("sample") or {}), sort_keys=True, default=str)
              for v, b in ((data.tune or {}).get("best") or {}).items() if v in deq_kinds}
    rows = []
    for (variant, key), trials in groups.items():
        kept = [t for t in trials if not t.get("degenerate")]
        best = None
        for t in kept:
            if best is None or _better(t[metric], best[metric], mode):
                best = t
        values = deq_values(trials[0].get("sample") or {}) if variant in deq_kinds else {}
        peak = number((best or {}).get("peak_bytes"))
        rows.append({
            "experiment": data.name, "variant": variant, "kind": "deq" if variant in deq_kinds else "explicit",
            "configuration": configuration_label(values) if variant in deq_kinds else f"depth {data.depth(variant)}",
            "metric": metric, "value": None if best is None else best[metric],
            "train.lr": (best or {}).get("sample", {}).get("train.lr"),
            "contraction": number((best or {}).get("best_deq_contraction")),
            "iterations": number((best or {}).get("best_deq_iterations")),
            "depth_gain": number((best or {}).get("best_deq_depth_gain")),
            "peak_mib": None if peak is None else peak / MIB,
            "trials": len(trials), "degenerate": len(trials) - len(kept),
            "selected": variant in deq_kinds and chosen.get(variant) == key})
    # the DEQ configurations from shallow to deep (by contraction), then the explicit baselines by depth
    return sorted(rows, key=lambda r: (r["kind"] != "deq", r["variant"] if r["kind"] == "deq" else "",
                                       math.inf if r["contraction"] is None else r["contraction"],
                                       data.depth(r["variant"]) or 0, r["variant"]))


def _cell(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def study_sentence(rows: list[dict[str, Any]], mode: str) -> str:
    """Which DEQ configuration the search selected on validation and why, against the others and the explicit
    baselines at their memory."""
    deq = [r for r in rows if r["kind"] == "deq" and r["value"] is not None]
    explicit = [r for r in rows if r["kind"] == "explicit" and r["value"] is not None]
    if not deq:
        return "No DEQ configuration finished a non-degenerate trial: nothing to select."
    sel = next((r for r in deq if r["selected"]), None) or min(deq, key=lambda r: r["value"] * (1 if mode == "min"
                                                                                                   else -1))
    word = "lowest" if mode == "min" else "highest"
    parts = [f"Selected on validation: `{sel['variant']}` with {sel['configuration']} ({sel['metric']} "
             f"{sel['value']:.4g}, the {word} of {len(deq)} configurations"
             + (f"; contraction {sel['contraction']:.3f}" if sel["contraction"] is not None else "")
             + (f", {sel['iterations']:.1f} iterations" if sel["iterations"] is not None else "")
             + (f", depth gain {sel['depth_gain']:.3f}" if sel["depth_gain"] is not None else "") + ")."]
    shallow = min((r for r in deq if r["contraction"] is not None), key=lambda r: r["contraction"], default=None)
    if shallow is not None and shallow is not sel:
        parts.append(f"The shallowest configuration ({shallow['configuration']}, contraction "
                     f"{shallow['contraction']:.3f}) reached {shallow['value']:.4g}: depth "
                     f"{'paid' if _better(sel['value'], shallow['value'], mode) else 'did not pay'} on validation.")
    elif shallow is sel:
        parts.append("It is the shallowest configuration searched: depth did not pay on validation.")
    if explicit:
        best_e = min(explicit, key=lambda r: r["value"] * (1 if mode == "min" else -1))
        mem = ("" if sel["peak_mib"] is None or best_e["peak_mib"] is None else
               f" at {sel['peak_mib'] / best_e['peak_mib']:.2f}x its memory")
        parts.append(f"The best explicit baseline, `{best_e['variant']}`, reached {best_e['value']:.4g}: the selected "
                     f"DEQ is {'better' if _better(sel['value'], best_e['value'], mode) else 'not better'}{mem} "
                     "(one trial each, validation: the seeds' verdict on test data is the table above).")
    degenerate = sum(r["degenerate"] for r in deq)
    if degenerate:
        parts.append(f"{degenerate} DEQ trial(s) fell below the data's score-matching floor (degenerate) and were "
                     "not selected.")
    return " ".join(parts)


def study_md(artifacts: Artifacts, data: ExperimentData, rows: list[dict[str, Any]], mode: str,
             figures: list[Path]) -> list[str]:
    """REPORT.md's "Depth study" part of one experiment; empty without a search over deq configurations."""
    if not rows:
        return []
    body = [[r["variant"], r["configuration"] + (" **(selected)**" if r["selected"] else ""),
             _cell(r["value"], ".4g"), _cell(r["train.lr"], "g"), _cell(r["contraction"], ".3f"),
             _cell(r["iterations"], ".1f"), _cell(r["depth_gain"], ".3f"), _cell(r["peak_mib"], ".2f"),
             f"{r['trials']}" + (f" ({r['degenerate']} degenerate)" if r["degenerate"] else "")] for r in rows]
    path = study_figure_path(artifacts, data)
    return ["### Depth study (validation)\n",
            f"Also as [CSV]({artifacts.rel(artifacts.tables / f'{data.name}_study.csv')}). Each row: the best trial "
            f"of a configuration over the other search values, by the search metric `{rows[0]['metric']}` "
            "(validation); "
            "contraction, iterations and depth gain of the DEQ at that trial's best step; peak memory of one training "
            "step.\n",
            md_table(["variant", "configuration", rows[0]["metric"], "lr", "contraction", "iterations", "depth gain",
                      "peak MiB", "trials"], body) + "\n",
            f"{study_sentence(rows, mode)}\n",
            *([f"![depth study]({artifacts.rel(path)})\n"] if path in figures else [])]


def study_figure_path(artifacts: Artifacts, data: ExperimentData) -> Path:
    return artifacts.figures / f"study_{data.name}.png"


def pareto(points: list[tuple[float, float]], mode: str) -> list[tuple[float, float]]:
    """The points no other point beats on both memory (x, lower) and the metric (y, ``mode``), by memory."""
    front, best = [], math.inf
    for x, y in sorted(points, key=lambda p: (p[0], p[1] if mode == "min" else -p[1])):
        score = y if mode == "min" else -y
        if score < best:
            front.append((x, y))
            best = score
    return front


def study_figure(artifacts: Artifacts, data: ExperimentData, metric: str, mode: str) -> Path | None:
    """Two panels of the search's trials: the metric against the DEQ's contraction (a colour per configuration;
    x: degenerate) and against peak memory, with the explicit baselines' trials as squares and the Pareto front
    (memory against metric) over all of them. None without a search over deq configurations."""
    rows = study_rows(data, metric, mode)
    if not rows:
        return None
    deq_kinds = set(data.deq_variants())
    results = [r for r in data.tune["results"] if number(r.get(metric)) is not None]
    labels = [r["configuration"] for r in rows if r["kind"] == "deq"]
    plt = _pyplot()
    fig, (ax_c, ax_m) = plt.subplots(1, 2, figsize=(13, 4.6))
    front_pts = []
    for r in results:
        y = r[metric]
        mib = None if number(r.get("peak_bytes")) is None else r["peak_bytes"] / MIB
        if r["variant"] in deq_kinds:
            i = labels.index(configuration_label(deq_values(r.get("sample") or {})))
            style = dict(color=f"C{i % 10}", marker="x" if r.get("degenerate") else "o", s=30)
            if number(r.get("best_deq_contraction")) is not None:
                ax_c.scatter(r["best_deq_contraction"], y, **style)
            if mib is not None:
                ax_m.scatter(mib, y, **style)
        elif mib is not None:
            ax_m.scatter(mib, y, marker="s", s=40, color="black", facecolors="none")
            ax_m.annotate(r["variant"], (mib, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if mib is not None and not r.get("degenerate"):
            front_pts.append((mib, y))
    for i, label in enumerate(labels):
        ax_c.scatter([], [], color=f"C{i % 10}", label=label)
    ax_m.scatter([], [], marker="s", color="black", facecolors="none", label="explicit baselines")
    if len(front := pareto(front_pts, mode)) > 1:
        ax_m.step(*zip(*front), where="post", color="gray", lw=1, ls="--", label="Pareto front")
    ys = sorted(abs(r[metric]) for r in results)
    for ax in (ax_c, ax_m):
        if ys[-1] > 50 * max(ys[len(ys) // 2], 1e-12):  # a diverged trial's loss far off the others: a log scale
            ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylabel(f"validation {metric} ({'lower' if mode == 'min' else 'higher'} is better)")
    ax_c.axvline(1.0, ls=":", color="gray", lw=1)
    ax_c.set_xlabel("DEQ contraction at the best step (x: degenerate, below the data's floor)")
    ax_m.set_xlabel("peak memory of one training step (MiB)")
    ax_c.legend(fontsize=6)
    ax_m.legend(fontsize=6)
    fig.suptitle(f"{data.name}: depth study, every tune trial (validation)", fontsize=9)
    return _save(fig, study_figure_path(artifacts, data))
