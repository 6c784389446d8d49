"""REPORT.md: the findings, each experiment's table, figures, samples and tuning summary, the memory
benchmark and the gradient fidelity, with links to every file (relative to the report's folder)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipelines.artifacts import Artifacts, write_atomic
from pipelines.reporting.depth import depth_section_md
from pipelines.reporting.study import study_md, study_rows
from pipelines.reporting.inputs import MEMORY_KINDS, MIB, ExperimentData, MemoryBench
from pipelines.reporting.tables import DASH, fmt, loss_label, md_table
from pipelines.reporting.convergence import convergence_table_md, experiment_convergence
from pipelines.settings import Settings, SpaceEntry


def at_edge(entry: SpaceEntry, value: Any) -> str | None:
    """"lowest" / "highest" when ``value`` is at an end of a numeric search dimension (a grid's first or last
    value; within 10% of a range's width, on a log scale for loguniform), else None: the optimum may lie beyond."""
    values = [v for v in entry.extremes() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or len(values) < 2:
        return None
    low, high = min(values), max(values)
    if entry.kind in ("grid", "choice"):
        return "lowest" if value == low else "highest" if value == high else None
    scale = (lambda v: math.log(v)) if entry.kind == "loguniform" else (lambda v: float(v))  # noqa: E731
    width = scale(high) - scale(low)
    return ("lowest" if scale(value) - scale(low) <= 0.1 * width else
            "highest" if scale(high) - scale(value) <= 0.1 * width else None)


def tuning_md(data: ExperimentData, metric: str, space: dict[str, SpaceEntry] | None = None) -> str:
    if data.tune is None:
        return "No tuning summary (`best.json` of the tune stage not found).\n"
    results = data.tune.get("results") or []
    stopped = [r for r in results if r.get("stopped_early")]
    lines = [f"Tune stage: {data.tune.get('trials', DASH)} trials"
             + (f", {len(stopped)} of them stopped early by ASHA (each compared with its own variant's trials only)"
                if stopped else "") + "."]
    for variant, entry in sorted((data.tune.get("best") or {}).items()):
        sample = ", ".join(f"`{k}={v}`" for k, v in sorted((entry.get("sample") or {}).items())) or "(no search values)"
        value = (entry.get("metrics") or {}).get(metric)
        edges = [f"`{k}` at the {edge} value searched" for k, v in sorted((entry.get("sample") or {}).items())
                 if k in (space or {}) and (edge := at_edge(space[k], v))]
        lines.append(f"- `{variant}`: best {metric} {fmt(value, '.4g')} with {sample}"
                     + (f" — {', '.join(edges)}: the optimum may lie outside `tune.search_space`; widen it"
                        if edges else ""))
    for variant, reasons in sorted((data.tune.get("failed") or {}).items()):
        if reasons:
            shown = reasons if isinstance(reasons, list) else [reasons]
            lines.append(f"- `{variant}`: {len(shown)} failed trial(s): {'; '.join(map(str, shown[:3]))}")
    return "\n".join(lines) + "\n"


def sample_grids(artifacts: Artifacts, data: ExperimentData) -> list[Path]:
    """The evaluate stage's sample grids of this experiment (``samples/<variant>.png``), in variant order."""
    return [p for v in data.variants() if (p := artifacts.sample_grid(data.name, v)).exists()]


def sample_grids_md(artifacts: Artifacts, data: ExperimentData) -> list[str]:
    grids = sample_grids(artifacts, data)
    if not grids:
        return []
    return ["### Samples\n", *(f"`{p.stem}`:\n\n![samples of {p.stem}]({artifacts.rel(p)})\n" for p in grids)]


def write_report(artifacts: Artifacts, s: Settings, params: Path, datas: list[ExperimentData], tables: dict[str, str],
                 bench: MemoryBench, fidelity_md: str, conclusions: list[str], caveat_lines: list[str],
                 figures: dict[str, list[Path]], tags: dict[str, str]) -> Path:
    md = ["# deqsm report\n",
          f"Written by `python -m pipelines.report` from `{params.name}`; "
          f"git commit `{tags.get('mlflow.source.git.commit', 'unknown')}`, "
          f"pipeline sha256 `{tags.get('pipeline_sha256', 'none')[:12]}` (params + dvc.yaml). "
          f"Experiments: {', '.join(f'`{d.name}`' for d in datas)}. Every number below is read from the files "
          "the pipeline wrote; the same files are logged to MLflow (run `report` of each experiment).\n",
          "## What to conclude\n", *(f"- {c}" for c in conclusions), "",
          "## Caveats\n", *(f"- {c}" for c in caveat_lines or ["None found in the numbers."]), ""]
    for data in datas:
        md += [f"## {data.name}\n",
               f"Dataset `{data.spec.dataset}`, model `{data.spec.model}`, loss `{loss_label(data.spec)}`; "
               f"table also as [CSV](tables/{data.name}.csv), metrics from "
               f"`{artifacts.rel(artifacts.metrics(data.name))}`.\n", tables[data.name],
               *depth_section_md(artifacts, data, figures.get(data.name, [])),
               *study_md(artifacts, data, study_rows(data, s.tune.metric, s.tune.mode), s.tune.mode,
                         figures.get(data.name, [])),
               "### Convergence\n", convergence_table_md(experiment_convergence(data)) + "\n",
               f"![training curves]({artifacts.rel(artifacts.figures / f'training_{data.name}.png')})\n",
               f"![solver residual]({artifacts.rel(artifacts.figures / f'residual_{data.name}.png')})\n",
               *sample_grids_md(artifacts, data),
               "### Tuning\n", tuning_md(data, s.tune.metric, s.tune.search_space),
               *([f"![tune trials]({artifacts.rel(tuning)})\n"]
                 if (tuning := artifacts.figures / f"tuning_{data.name}.png") in figures.get(data.name, []) else [])]
    explicit, deq = bench.explicit(), bench.deq()
    body = [[f"explicit-{d}", DASH, f"{r['peak_bytes'] / MIB:.3f}", fmt(r.get("step_ms"), ".1f")] for d, r in explicit]
    body += [[f"deq-{b}", str(r["solver_iters"]), f"{r['peak_bytes'] / MIB:.3f}", fmt(r.get("step_ms"), ".1f")]
             for b, runs in sorted(deq.items()) for r in runs]
    md += ["## Memory vs depth (benchmark)\n",
           f"One SSM training step of an energy MLP, explicit depth L against one DEQ layer ({bench.device}; "
           f"memory: `{bench.memory_kind}` — {MEMORY_KINDS.get(bench.memory_kind, 'as named')}). Source: "
           f"{bench.source}; rows in [plots/memory_depth.jsonl](plots/memory_depth.jsonl).\n",
           md_table(["variant", "solver iterations", "peak memory (MiB)", "ms/step"], body), "",
           "![memory vs depth](figures/memory_depth.png)\n", "![memory vs solver iterations](figures/memory_iters.png)\n",
           "## Phantom vs exact gradients (fidelity)\n", fidelity_md,
           "Also as [tables/fidelity.csv](tables/fidelity.csv); the fidelity stage's files: "
           + ", ".join(f"[{d.name}]({artifacts.rel(artifacts.fidelity(d.name))})" for d in datas) + ".\n",
           "![fidelity](figures/fidelity.png)\n",
           "## Files\n",
           *(f"- [{artifacts.rel(p)}]({artifacts.rel(p)})" for ps in figures.values() for p in ps),
           *(f"- [tables/{d.name}.md](tables/{d.name}.md), [tables/{d.name}.csv](tables/{d.name}.csv)" for d in datas),
           "- [tables/fidelity.md](tables/fidelity.md), [tables/fidelity.csv](tables/fidelity.csv)",
           "- `plots/*.csv`: the figures' data for `dvc plots show`", ""]
    return write_atomic(artifacts.report, "\n".join(md))

