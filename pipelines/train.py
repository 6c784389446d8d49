"""DVC stage `train`: retrain the best configuration of every variant found by `tune`, up to its step cap
(``experiments.<name>.train.steps``, else ``train.steps``), once per seed (``train.seeds``: base.seed,
base.seed + 1, ...; ``base.workers`` of them at once, each in its own process), and save each model
(``<out>/models/<experiment>/<variant>/seed<s>.pt``) with its training curve
(``<results>/experiments/<experiment>/curves/<variant>/seed<s>.csv``).

MLflow: a run for the stage (stage=train), under it one run per variant (its figures averaged over the seeds),
and under each variant one run per seed (its curve, training figures and logged model).
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipelines.artifacts import MODEL_SUFFIX, Artifacts, load_splits, prune_seeds, save_model, write_atomic
from pipelines.settings import Settings, main_guard, run_experiment_stage
from pipelines.trials import flatten
from pipelines.workers import cached_floor, cached_splits, run_jobs, start_workers, worker_count


class CurveLogger:
    """deqsm.train callbacks → the rows of a CSV curve (every ``every`` steps and each evaluation), logged to
    MLflow once training is done (:meth:`log_to`: a worker process writes no MLflow store)."""

    def __init__(self, every: int = 10, rows: list[dict[str, float]] | None = None) -> None:
        self.every = every
        self.rows: list[dict[str, float]] = list(rows or [])

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.every == 0 or step == 1:
            self.rows.append({"step": step, **metrics})

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append({"step": step, **metrics})

    def log_to(self, tracker, run_id: str) -> None:
        """Every row as MLflow metrics at its step."""
        tracker.log_metric_rows(run_id, self.rows)

    def on_checkpoint(self, step: int, path: Path) -> None: ...

    def write(self, path: Path) -> None:
        keys = sorted({k for r in self.rows for k in r}, key=lambda k: (k != "step", k))
        write_csv(path, keys, self.rows)

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of the rows that logged ``key`` (an evaluation row has no train_loss: no blank)."""
        return [(int(r["step"]), r[key]) for r in self.rows if r.get(key) is not None]


# The DVC plots of the train stage (dvc.yaml): per experiment, one long-format table per quantity, every variant's
# rows in it, so that `dvc plots show` draws the variants as lines of one plot (.dvc/plots/variants.json).
PLOTTED = ("train_loss", "val_loss")


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_atomic(path, buf.getvalue())


def write_curve_plots(artifacts: Artifacts, name: str, curves: dict[tuple[str, int], CurveLogger]) -> None:
    """One long table per plotted quantity: a line per variant and seed (the template's colour is the variant)."""
    for key in PLOTTED:
        rows = [{"step": step, "variant": variant, "seed": seed, key: value}
                for (variant, seed), curve in sorted(curves.items()) for step, value in curve.series(key)]
        write_csv(artifacts.curve_plot(name, key), ["step", "variant", "seed", key], rows)


def grad_cosine_tag(summary: dict[str, Any]) -> dict[str, str]:
    """``deqsm.grad_cosine_low`` = ``true`` / ``false`` for a DEQ run whose training measured its gradient's cosine
    with the exact one (train.grad_cosine_min): the MLflow UI can filter the runs trained on an inexact gradient."""
    low = summary.get("train_grad_cosine_low")
    return {} if low is None else {"deqsm.grad_cosine_low": "true" if low else "false"}


def degenerate_tag(summary: dict[str, Any]) -> dict[str, str]:
    """``deqsm.degenerate_loss`` = ``true`` / ``false`` for a run on data with a known score whose score-matching
    loss was watched against the data's floor (:mod:`deqsm.floor`): the UI can filter the degenerate runs."""
    flag = summary.get("loss_degenerate")
    return {} if flag is None else {"deqsm.degenerate_loss": "true" if flag else "false"}


@dataclass(frozen=True)
class SeedJob:
    """One training: a variant's best configuration with one seed (plain data: it crosses to a worker process)."""

    variant: str
    seed: int
    spec: dict[str, Any]
    train: dict[str, Any]
    data_root: str
    dataset: str

    def __str__(self) -> str:
        return f"{self.variant} seed {self.seed}"


def train_seed(job: SeedJob) -> dict[str, Any]:
    """Train one variant with one seed (in this process or a worker's) and return the weights, the training
    summary, the history of evaluations and the curve's rows."""
    from deqsm.experiments import SolverRecorder, VariantSpec, train_model
    from deqsm.train import TrainSettings

    curve, solver = CurveLogger(), SolverRecorder()
    model, fit = train_model(VariantSpec(**job.spec), cached_splits(job.data_root, job.dataset),
                             TrainSettings(**job.train), callbacks=[curve, solver],
                             loss_floor=cached_floor(job.data_root, job.dataset))
    summary = {**fit.summary(), **solver.summary(), "params": float(sum(p.numel() for p in model.parameters()))}
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "summary": summary,
            "history": fit.history, "rows": curve.rows}


def train_experiment(settings: Settings, name: str) -> None:
    from pipelines.provenance import provenance_tags
    from pipelines.seeds import aggregate
    from pipelines.tracking import Tracker

    mlflow_exp = settings.tracking.experiment_prefix + name
    seeds = settings.train.seed_values(settings.base.seed)
    # the workers start (and import torch) while this process opens the store and reads the search's results
    start_workers(worker_count(settings.base.workers, settings.base.threads,
                               len(settings.experiments[name].variants) * len(seeds)), settings.base.threads)
    tracker = Tracker.open(settings.tracking_uri(), [mlflow_exp], settings.tracking.timeout)
    artifacts = Artifacts.of(settings)
    best_file = artifacts.tune_best(name)
    if not best_file.exists():
        raise FileNotFoundError(f"{best_file} is missing: run the tune stage first (dvc repro tune@{name})")
    best = json.loads(best_file.read_text())["best"]
    dataset = settings.experiments[name].dataset
    load_splits(artifacts, dataset)  # checked against its manifest here, before any job starts
    steps = settings.experiment_train(name)["steps"]  # the step cap: experiments.<name>.train.steps or train.steps
    tags = provenance_tags(settings, "pipelines.train")
    artifacts.models_dir(name).mkdir(parents=True, exist_ok=True)  # a DVC out, even when no variant trains
    jobs = []
    for variant, entry in sorted(best.items()):
        cfg = entry["config"]
        # the search's settings with the full budget (not tune.steps) and this stage's progress bar
        train_cfg = {**cfg["train"], "steps": steps, "progress": settings.train.progress}
        jobs += [SeedJob(variant, seed, cfg["spec"], {**train_cfg, "seed": seed}, str(artifacts.data_root), dataset)
                 for seed in seeds]
    workers = worker_count(settings.base.workers, settings.base.threads, len(jobs))
    parent = tracker.start_run(mlflow_exp, f"train-{time.strftime('%Y%m%d-%H%M%S')}",
                               {"seeds": ",".join(map(str, seeds)), "workers": workers}, {"stage": "train", **tags})
    variant_runs = {v: tracker.start_run(mlflow_exp, v, flatten({"spec": e["config"]["spec"],
                                                                 "train": {**e["config"]["train"],
                                                                           "steps": steps}}),
                                         {"stage": "train", "variant": v, "seeds": ",".join(map(str, seeds)), **tags},
                                         parent_run_id=parent)
                    for v, e in sorted(best.items())}
    print(f"{name}: training {len(best)} variant(s) x {len(seeds)} seed(s) ({steps} steps at most "
          f"each), {workers} at a time", flush=True)
    summaries: dict[str, dict[int, dict]] = {v: {} for v in best}
    curves: dict[tuple[str, int], CurveLogger] = {}
    try:
        no_bar = [replace(job, train={**job.train, "progress": False}) for job in jobs]  # the pool has its own
        for job, result in run_jobs(train_seed, jobs if workers == 1 else no_bar, workers,
                                    settings.train.progress, "train", settings.base.threads):
            summaries[job.variant][job.seed] = summary = result["summary"]
            run_id = tracker.start_run(mlflow_exp, f"{job.variant}/seed{job.seed}", flatten({"train": job.train}),
                                       {"stage": "train", "variant": job.variant, "seed": str(job.seed), **tags},
                                       parent_run_id=variant_runs[job.variant])
            curve = curves[job.variant, job.seed] = CurveLogger(rows=result["rows"])
            curve.log_to(tracker, run_id)
            tracker.log_dataset_inputs(run_id, artifacts.data_root, dataset, ("train", "val"))
            tracker.log_metrics(run_id, {k: v for k, v in summary.items() if not isinstance(v, str)},
                                step=int(summary["steps"]))
            tracker.set_tags(run_id, {"memory_kind": str(summary["memory_kind"]), **grad_cosine_tag(summary),
                                      **degenerate_tag(summary)})
            curve_path = artifacts.curve(name, job.variant, job.seed)
            curve.write(curve_path)
            tracker.log_artifact(run_id, curve_path, "curves")
            model_path = artifacts.model(name, job.variant, job.seed)
            save_model(model_path, result["state_dict"], spec=job.spec, train=job.train, fit=summary,
                       history=result["history"], mlflow_run_id=run_id,
                       mlflow_variant_run_id=variant_runs[job.variant])
            tracker.log_model(run_id, mlflow_exp, f"{job.variant}-seed{job.seed}", model_path,
                              step=int(summary["steps"]), params=flatten({"spec": job.spec}))
            tracker.end_run(run_id, "FINISHED")
            print(f"{name}/{job.variant} seed {job.seed}: {int(summary['steps'])} steps, best validation loss "
                  f"{summary['best_val_loss']:.4g} at step {int(summary['best_step'])}", flush=True)
    except BaseException as err:  # an interrupt ends the runs KILLED, an error FAILED with its reason
        interrupted = isinstance(err, KeyboardInterrupt)
        for run_id in (*variant_runs.values(), parent):
            tracker.end_run(run_id, "KILLED" if interrupted else "FAILED",
                            failure_reason=None if interrupted else f"{type(err).__name__}: {err}")
        raise
    best_val = {}
    for variant, run_id in variant_runs.items():
        figures = aggregate(summaries[variant])
        tracker.log_metrics(run_id, {k: v for k, v in figures.items() if k not in ("seeds",)})
        best_val[variant] = figures["best_val_loss_mean"]
        tracker.end_run(run_id, "FINISHED")
    write_curve_plots(artifacts, name, curves)
    prune_seeds(artifacts.models_dir(name), MODEL_SUFFIX, {v: seeds for v in best})
    prune_seeds(artifacts.curves_dir(name), ".csv", {v: seeds for v in best})
    tracker.log_best(parent, "val_loss", "min", best_val)  # each variant's best validation loss, mean over seeds
    tracker.end_run(parent, "FINISHED")


def main(argv: list[str] | None = None) -> None:
    run_experiment_stage(train_experiment, "pipelines.train", __doc__, argv)


if __name__ == "__main__":
    main_guard(main)
