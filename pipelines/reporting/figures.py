"""The report's figures (PNG, matplotlib's Agg backend) and their data as CSV for ``dvc plots``: memory vs
depth and vs solver iterations (bench stage), training curves and solver residuals per experiment (train
stage), the tune trials' metric against the searched values (tune stage), phantom-vs-exact gradient fidelity
(fidelity stage)."""
from __future__ import annotations

import json
from pathlib import Path

from pipelines.artifacts import Artifacts
from pipelines.reporting.inputs import MIB, ExperimentData, MemoryBench, number
from pipelines.reporting.tables import loss_label, write_csv


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def wide_csv(path: Path, x_name: str, series: dict[str, tuple[list[float], list[float]]]) -> Path:
    """Series → one CSV: an x column and one column per series (blank where a series has no point)."""
    xs = sorted({x for s in series.values() for x in s[0]})
    lookup = {name: dict(zip(*s)) for name, s in series.items()}
    plain = lambda v: int(v) if isinstance(v, float) and v.is_integer() else v  # noqa: E731 — steps, depths
    rows = [{x_name: plain(x), **{name: lookup[name].get(x) for name in series}} for x in xs]
    write_csv(path, rows, [x_name, *series])
    return path


def memory_figures(artifacts: Artifacts, bench: MemoryBench) -> list[Path]:
    plt = _pyplot()
    explicit, deq = bench.explicit(), bench.deq()
    kind = bench.memory_kind
    paths = []

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if explicit:
        ax.plot([d for d, _ in explicit], [r["peak_bytes"] / MIB for _, r in explicit], "o-", label="explicit, depth L")
    for backward, runs in sorted(deq.items()):
        if backward == "unroll":
            continue  # unrolled backward grows with iterations: shown in memory_iters.png
        peak = max(r["peak_bytes"] for r in runs) / MIB
        iters = f"{runs[0]['solver_iters']}–{runs[-1]['solver_iters']}" if len(runs) > 1 else f"{runs[0]['solver_iters']}"
        ax.axhline(peak, ls="--", color="C1" if backward == "phantom" else "C2",
                   label=f"DEQ, {backward} backward ({iters} solver iterations)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("explicit depth L")
    ax.set_ylabel(f"peak memory (MiB, {kind})")
    ax.set_title(f"SSM step memory vs depth ({bench.device})")
    ax.legend(fontsize=8)
    paths.append(_save(fig, artifacts.figures / "memory_depth.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for backward, runs in sorted(deq.items()):
        ax.plot([r["solver_iters"] for r in runs], [r["peak_bytes"] / MIB for r in runs], "o-", label=f"DEQ, {backward}")
    if explicit:
        d, r = explicit[-1]
        ax.axhline(r["peak_bytes"] / MIB, ls=":", color="gray", label=f"explicit, depth {d}")
    ax.set_xlabel("DEQ solver iterations")
    ax.set_ylabel(f"peak memory (MiB, {kind})")
    ax.set_title(f"SSM step memory vs solver iterations ({bench.device})")
    ax.legend(fontsize=8)
    paths.append(_save(fig, artifacts.figures / "memory_iters.png"))

    depths = [float(d) for d, _ in explicit]
    series = {"explicit_bytes": (depths, [float(r["peak_bytes"]) for _, r in explicit])}
    for backward, runs in sorted(deq.items()):
        if backward != "unroll":
            series[f"deq_{backward}_bytes"] = (depths, [float(max(r["peak_bytes"] for r in runs))] * len(depths))
    wide_csv(artifacts.plots / "memory_depth.csv", "depth", series)
    wide_csv(artifacts.plots / "memory_iters.csv", "solver_iters",
             {f"deq_{b}_bytes": ([float(r["solver_iters"]) for r in runs], [float(r["peak_bytes"]) for r in runs])
              for b, runs in sorted(deq.items())})
    (artifacts.plots / "memory_depth.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench.rows))
    return paths


def experiment_figures(artifacts: Artifacts, data: ExperimentData, deq_tol: float) -> list[Path]:
    plt = _pyplot()
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    train_series, val_series = {}, {}
    for i, variant in enumerate(data.variants()):
        curve = data.curves.get(variant)
        if curve is None:
            continue
        steps, loss = curve.series(curve.loss_key)
        vsteps, vloss = curve.series("val_loss")
        if steps:
            ax.plot(steps, loss, color=f"C{i % 10}", lw=1.2, label=f"{variant} train")
            train_series[variant] = (steps, loss)
        if vsteps:
            ax.plot(vsteps, vloss, "o--", color=f"C{i % 10}", ms=3, lw=1, label=f"{variant} val")
            val_series[variant] = (vsteps, vloss)
        for other in list(data.seed_curves.get(variant, {}).values())[1:]:  # the other seeds' validation, fainter
            ax.plot(*other.series("val_loss"), "--", color=f"C{i % 10}", lw=0.8, alpha=0.45)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{loss_label(data.spec)} loss")
    n_seeds = max((len(c) for c in data.seed_curves.values()), default=1)
    ax.set_title(f"{data.name}: training curves" + (f" (first seed; faint: the other {n_seeds - 1} seeds' validation)"
                                                    if n_seeds > 1 else ""), fontsize=9)
    if train_series or val_series:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no curve has a loss column", ha="center", transform=ax.transAxes)
    paths.append(_save(fig, artifacts.figures / f"training_{data.name}.png"))
    wide_csv(artifacts.plots / f"{data.name}_train_loss.csv", "step", train_series)
    wide_csv(artifacts.plots / f"{data.name}_val_loss.csv", "step", val_series)

    fig, (ax_r, ax_n) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    res_series = {}
    for i, variant in enumerate(data.variants()):
        curve = data.curves.get(variant)
        if curve is None:
            continue
        steps, res = curve.residuals()
        nsteps, n = curve.nsteps()
        if steps:
            ax_r.plot(steps, res, color=f"C{i % 10}", lw=1.2, label=variant)
            res_series[variant] = (steps, res)
        if nsteps:
            ax_n.plot(nsteps, n, color=f"C{i % 10}", lw=1.2, label=variant)
    if res_series:
        ax_r.axhline(deq_tol, ls=":", color="gray", label=f"deq.tol = {deq_tol:g}")
        ax_r.set_yscale("log")
        ax_r.legend(fontsize=8)
    else:
        ax_r.text(0.5, 0.5, "no DEQ variant: no solver residuals", ha="center", transform=ax_r.transAxes)
    ax_r.set_ylabel("max |f(z) − z| (abs residual)")
    ax_r.set_title(f"{data.name}: DEQ solver over training")
    ax_n.set_ylabel("solver iterations")
    ax_n.set_xlabel("training step")
    paths.append(_save(fig, artifacts.figures / f"residual_{data.name}.png"))
    wide_csv(artifacts.plots / f"{data.name}_residual.csv", "step", res_series)
    return paths


def _numeric(value) -> bool:
    """A finite number (a diverged trial's inf loss is left out of the plot)."""
    return number(value) is not None


def tuning_figure(artifacts: Artifacts, data: ExperimentData, metric: str) -> Path | None:
    """The tune stage's trials (``best.json``'s ``results``): ``metric`` against each numeric search dimension,
    one colour per variant, hollow markers for trials ASHA stopped early, a star on each variant's best; a log
    x axis where the values searched are positive and span a decade or more (learning rates). None when the
    search recorded no numeric dimension."""
    results = [r for r in (data.tune or {}).get("results") or [] if _numeric(r.get(metric))]
    keys = sorted({k for r in results for k, v in (r.get("sample") or {}).items() if _numeric(v)})
    if not keys:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(6.4 * len(keys), 4.2), squeeze=False)
    best = (data.tune or {}).get("best") or {}
    for ax, key in zip(axes[0], keys):
        for i, variant in enumerate(sorted({r["variant"] for r in results})):
            rows = [r for r in results if r["variant"] == variant and _numeric(r["sample"].get(key))]
            for stopped in (False, True):
                pts = [(r["sample"][key], r[metric]) for r in rows if bool(r.get("stopped_early")) == stopped]
                if pts:
                    ax.scatter(*zip(*pts), s=28, color=f"C{i % 10}", facecolors="none" if stopped else f"C{i % 10}",
                               label=f"{variant}" + (" (stopped early)" if stopped else ""))
            chosen = (best.get(variant) or {}).get("sample", {}).get(key)
            value = ((best.get(variant) or {}).get("metrics") or {}).get(metric)
            if _numeric(chosen) and _numeric(value):
                ax.scatter([chosen], [value], marker="*", s=160, color=f"C{i % 10}", edgecolors="black", zorder=3)
        xs = [r["sample"][key] for r in results if _numeric(r["sample"].get(key))]
        if min(xs) > 0 and max(xs) >= 10 * min(xs):
            ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1.0)  # a diverged trial's loss can be 1000x the others'
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
    fig.suptitle(f"{data.name}: tune trials (star: each variant's best; hollow: stopped early by ASHA)", fontsize=9)
    return _save(fig, artifacts.figures / f"tuning_{data.name}.png")


def fidelity_figure(artifacts: Artifacts, fidelity: dict[str, dict]) -> Path:
    plt = _pyplot()
    fig, (ax_c, ax_e) = plt.subplots(1, 2, figsize=(10, 4))
    cos_series = {}
    for exp, by_variant in fidelity.items():
        for variant, entry in by_variant.items():
            ks = [float(r["k"]) for r in entry["results"]]
            cos = [r["grad_cosine"] for r in entry["results"]]
            ax_c.plot(ks, cos, "o-", label=f"{exp}/{variant}")
            ax_e.plot(ks, [r["grad_rel_error"] for r in entry["results"]], "o-", label=f"{exp}/{variant} gradient")
            if all("score_rel_error" in r for r in entry["results"]):
                ax_e.plot(ks, [max(r["score_rel_error"], 1e-16) for r in entry["results"]], "s:",
                          label=f"{exp}/{variant} score")
            cos_series[f"{exp}/{variant}"] = (ks, cos)
    if cos_series:
        for ax in (ax_c, ax_e):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("phantom steps K")
            ax.legend(fontsize=7)
        ax_e.set_yscale("log")
    else:
        ax_c.text(0.5, 0.5, "no DEQ variant", ha="center", transform=ax_c.transAxes)
    ax_c.set_ylabel("cos(phantom gradient, exact gradient)")
    ax_e.set_ylabel("relative error vs exact")
    fig.suptitle("Phantom vs exact implicit gradients of the trained DEQs")
    wide_csv(artifacts.plots / "fidelity_cosine.csv", "k", cos_series)
    return _save(fig, artifacts.figures / "fidelity.png")

