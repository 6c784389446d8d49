"""DVC stage `report`: the paper-style tables, the figures and ``REPORT.md``, from the files the other stages
wrote (it recomputes nothing). Reads, per experiment of params.yaml (paths: :mod:`pipelines.artifacts`):

- ``<results>/experiments/<experiment>/metrics.json`` (evaluate): ``{variant: {<metric>_mean, <metric>_se_seeds,
  seeds, ...}}``, and ``seeds.json`` beside it (each seed's metrics: the training summaries behind convergence);
- ``<results>/experiments/<experiment>/curves/<variant>/seed<s>.csv`` (train): the training curves;
- ``<results>/experiments/<experiment>/fidelity.json`` (fidelity): phantom vs exact gradients of the DEQs;
- ``<out>/tune/<experiment>/best.json`` (tune; optional): trials, failures, best samples;

and ``<results>/benchmarks/memory_depth.jsonl`` (bench). Writes, under ``--out-dir`` (default: params.yaml's
``base.results``; apart from ``<results>/experiments``, which DVC takes as one dependency):

- ``tables/<experiment>.md`` / ``.csv``: one row per variant, headed by the model family's headline metric
  (its mean over seeds ± the standard error across them), then peak memory
  and what it counts, ms per step, parameters, solver steps and residual, ...; ``tables/fidelity.md`` / ``.csv``;
- ``tables/<experiment>_depth.csv``: the effective depth of each DEQ variant (contraction, ‖Ŵ‖₂, iterations,
  depth gain, gradient cosine; :mod:`pipelines.reporting.depth`), when metrics.json has them;
  ``tables/<experiment>_study.csv``: the depth study (a search over deq settings; :mod:`pipelines.reporting.study`);
- ``figures/``: ``memory_depth.png``, ``memory_iters.png``, ``training_<experiment>.png``,
  ``residual_<experiment>.png``, ``tuning_<experiment>.png`` (tune trials: metric vs searched values), ``fidelity.png``,
  ``depth_<experiment>.png`` (the headline metric against the DEQs' contraction, when measured),
  ``study_<experiment>.png`` (the depth study's trials against contraction and memory, with the Pareto front);
- ``plots/``: the figures' data as CSV for ``dvc plots`` and ``memory_depth.jsonl`` (the benchmark rows used);
- ``REPORT.md``: all of it, with a "what to conclude / caveats" section computed from the numbers (verdicts:
  Welch's t on the means over seeds) and a convergence table per experiment;

and logs REPORT.md, the tables and the figures as artifacts of a run named ``report`` (tag ``stage=report``)
in each experiment's MLflow experiment. A failure to log is an error.

Relative paths (base.out, base.results, a relative SQLite tracking URI) start at the folder of the params
file, as in every stage; ``--root`` takes them from another folder.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from pipelines.artifacts import Artifacts
from pipelines.reporting.depth import DEPTH_COLUMNS, depth_figure, depth_rows
from pipelines.reporting.study import STUDY_COLUMNS, study_figure, study_rows, study_sentence
from pipelines.reporting.figures import experiment_figures, fidelity_figure, memory_figures, tuning_figure
from pipelines.reporting.findings import caveats, experiment_findings, fidelity_findings, memory_findings
from pipelines.reporting.inputs import ExperimentData, ReportError, read_experiment, read_memory_bench
from pipelines.reporting.markdown import sample_grids, write_report
from pipelines.reporting.tables import (CSV_COLUMNS, FIDELITY_COLUMNS, experiment_table_md, fidelity_table_md,
                                        fidelity_table_rows, table_rows, write_csv)
from pipelines import ServiceError
from pipelines.settings import ParamsError, Settings, load_params, main_guard

def log(message: str) -> None:
    print(f"report: {message}", flush=True)


def log_to_mlflow(artifacts: Artifacts, settings: Settings, datas: list[ExperimentData],
                  numbers: dict[str, dict[str, float]], common: list[Path], per_experiment: dict[str, list[Path]],
                  tags: dict[str, str], params: dict[str, Any]) -> dict[str, str]:
    """A run named ``report`` (tag stage=report) per experiment holding the report's files; run ids by experiment."""
    from pipelines.tracking import Tracker

    uri = settings.tracking_uri(artifacts.root)
    run_ids = {}
    try:
        tracker = Tracker.open(uri, [settings.tracking.experiment_prefix + d.name for d in datas],
                               settings.tracking.timeout)
    except ServiceError:
        raise
    except Exception as err:  # noqa: BLE001 — re-raised with the URI
        raise ReportError(f"cannot open MLflow tracking URI {uri}: {type(err).__name__}: {err}") from err
    for data in datas:
        experiment = settings.tracking.experiment_prefix + data.name
        run_id = None
        try:
            run_id = tracker.start_run(experiment, "report", params, {"stage": "report", **tags})
            tracker.log_metrics(run_id, numbers.get(data.name, {}))
            for path in common:
                tracker.log_artifact(run_id, path, _artifact_dir(artifacts, path))
            for path in per_experiment.get(data.name, []):
                tracker.log_artifact(run_id, path, _artifact_dir(artifacts, path))
            tracker.end_run(run_id, "FINISHED")
        except Exception as err:  # noqa: BLE001 — re-raised naming the run and the URI
            if run_id is not None:
                try:
                    tracker.end_run(run_id, "FAILED", failure_reason=f"{type(err).__name__}: {err}")
                except Exception:  # noqa: BLE001 — the original error is the one to report
                    pass
            raise ReportError(f"logging the report to MLflow ({uri}, experiment {experiment!r}) failed: "
                              f"{type(err).__name__}: {err}") from err
        run_ids[data.name] = run_id
        log(f"MLflow: {experiment} run 'report' {run_id}")
    return run_ids


def prune_stale(folders: list[Path], started: float) -> None:
    """Remove what this report run did not write in its own folders (DVC ``persist`` outs, which DVC no longer
    clears): the tables and figures of an experiment dropped from params.yaml would otherwise stay beside the
    new ones. ``started``: when this run began writing (2 s of slack for file systems with coarse times)."""
    for folder in folders:
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if path.is_file() and path.stat().st_mtime < started - 2:
                path.unlink()
                log(f"removed {path} (not part of this report)")


def _artifact_dir(artifacts: Artifacts, path: Path) -> str | None:
    out = artifacts.report_dir
    parent = path.parent.relative_to(out).as_posix() if path.is_relative_to(out) else None
    return None if parent in (None, ".") else parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--root", type=Path, default=None,
                   help="folder that relative paths of params.yaml are taken from (default: the params file's folder)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="folder of the report's own files (default: base.results); relative paths from --root")
    p.add_argument("--memory-jsonl", type=Path, default=None,
                   help="memory-vs-depth benchmark rows (default: the bench stage's "
                        "<base.results>/benchmarks/memory_depth.jsonl)")
    return p.parse_args(argv)


def run_report(settings: Settings, params: Path, root: Path | None = None, memory_jsonl: Path | None = None,
               out_dir: Path | None = None) -> dict[str, Any]:
    """Build the whole report from the stages' files; returns the written paths and the MLflow run ids."""
    if not settings.experiments:
        raise ParamsError("params.yaml has no experiments: nothing to report")
    artifacts = Artifacts.of(settings, root, out_dir)
    t0 = time.perf_counter()
    # Every input first: a missing file fails before anything is written.
    datas = [read_experiment(artifacts, settings, name) for name in settings.experiments]
    log(f"read {len(datas)} experiment(s): " + ", ".join(f"{d.name} ({len(d.metrics)} variants)" for d in datas))
    bench_path = memory_jsonl or artifacts.memory_bench
    bench = read_memory_bench(bench_path, artifacts.rel_to_root(bench_path))
    fidelity = {d.name: d.fidelity for d in datas if d.fidelity}
    from pipelines.tracking import check_store

    check_store(settings.tracking_uri(artifacts.root), settings.tracking.timeout)  # before anything is written

    started = time.time()
    all_rows, tables, depth_csvs, study_lines = {}, {}, {}, {}
    for data in datas:
        rows = all_rows[data.name] = table_rows(data)
        write_csv(artifacts.tables / f"{data.name}.csv", rows, CSV_COLUMNS)
        tables[data.name] = experiment_table_md(data, rows)
        (artifacts.tables / f"{data.name}.md").write_text(f"# {data.name}\n\n{tables[data.name]}")
        if depth := depth_rows(data):  # DEQ variants measured for effective depth
            depth_csvs[data.name] = [artifacts.tables / f"{data.name}_depth.csv"]
            write_csv(depth_csvs[data.name][0], depth, DEPTH_COLUMNS)
        if study := study_rows(data, settings.tune.metric, settings.tune.mode):  # a search over deq settings
            depth_csvs.setdefault(data.name, []).append(artifacts.tables / f"{data.name}_study.csv")
            write_csv(depth_csvs[data.name][-1], study, STUDY_COLUMNS)
            study_lines[data.name] = study_sentence(study, settings.tune.mode)
    fid_rows = fidelity_table_rows(fidelity)
    write_csv(artifacts.tables / "fidelity.csv", fid_rows, FIDELITY_COLUMNS)
    fidelity_md = fidelity_table_md(fid_rows)
    (artifacts.tables / "fidelity.md").write_text(f"# Phantom vs exact gradient fidelity\n\n{fidelity_md}")

    log("figures")
    figures = {"memory": memory_figures(artifacts, bench)}
    for data in datas:
        figures[data.name] = experiment_figures(artifacts, data, settings.deq.tol)
        if (tuning := tuning_figure(artifacts, data, settings.tune.metric)) is not None:
            figures[data.name].append(tuning)
        if (depth_png := depth_figure(artifacts, data)) is not None:
            figures[data.name].append(depth_png)
        if (study_png := study_figure(artifacts, data, settings.tune.metric, settings.tune.mode)) is not None:
            figures[data.name].append(study_png)
    figures["fidelity"] = [fidelity_figure(artifacts, fidelity)]

    bench_lines, bench_numbers = memory_findings(bench)
    conclusions, numbers = list(bench_lines), {}
    fid_lines, _ = fidelity_findings(fidelity)
    for data in datas:
        lines, nums = experiment_findings(data, all_rows[data.name], settings.deq.tol)
        conclusions += lines
        if data.name in study_lines:
            conclusions.append(f"`{data.name}` depth study: {study_lines[data.name]}")
        _, own_fid = fidelity_findings({data.name: data.fidelity or {}})
        numbers[data.name] = {**bench_numbers, **nums, **own_fid}
    conclusions += fid_lines
    from pipelines.provenance import provenance_tags

    tags = provenance_tags(settings, "pipelines.report", artifacts.root)
    report = write_report(artifacts, settings, params, datas, tables, bench, fidelity_md, conclusions,
                          caveats(settings, datas, all_rows, bench), figures, tags)
    log(f"wrote {report}")
    prune_stale([artifacts.tables, artifacts.figures, artifacts.plots], started)

    common = [report, artifacts.tables / "fidelity.md", artifacts.tables / "fidelity.csv",
              *figures["memory"], *figures["fidelity"], artifacts.plots / "memory_depth.csv"]
    per_exp = {d.name: [artifacts.tables / f"{d.name}.md", artifacts.tables / f"{d.name}.csv", *figures[d.name],
                        *sample_grids(artifacts, d), artifacts.fidelity(d.name), *depth_csvs.get(d.name, [])]
               for d in datas}
    run_ids = log_to_mlflow(artifacts, settings, datas, numbers, common, per_exp, tags,
                            {"report.params": params.name, "report.memory_source": bench.source})
    log(f"done in {time.perf_counter() - t0:.1f} s")
    return {"report": report, "figures": figures, "tables": artifacts.tables, "run_ids": run_ids}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = load_params(args.params)
    settings.base.apply_threads()
    run_report(settings, Path(args.params), args.root, args.memory_jsonl, args.out_dir)


if __name__ == "__main__":
    main_guard(main)
