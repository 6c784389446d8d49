"""DVC stage `train`: retrain the best configuration of every variant found by `tune`, with the full
``train.steps``, and save the model (``<out>/models/<experiment>/<variant>.pt``) with its training curve
(``<results>/experiments/<experiment>/curves/<variant>.csv``). Each variant is one MLflow run (stage=train).
"""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

from pipelines.artifacts import Artifacts, load_splits, prune_variants, save_model, write_atomic
from pipelines.settings import Settings, main_guard, run_experiment_stage
from pipelines.trials import flatten


class CurveLogger:
    """deqsm.train callbacks → a CSV curve and MLflow metrics (every ``every`` steps and each evaluation)."""

    def __init__(self, tracker, run_id: str, every: int = 10) -> None:
        self.tracker, self.run_id, self.every = tracker, run_id, every
        self.rows: list[dict[str, float]] = []

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.every == 0 or step == 1:
            self.rows.append({"step": step, **metrics})
            self.tracker.log_metrics(self.run_id, metrics, step=step)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append({"step": step, **metrics})
        self.tracker.log_metrics(self.run_id, metrics, step=step)

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


def write_curve_plots(artifacts: Artifacts, name: str, curves: dict[str, CurveLogger]) -> None:
    for key in PLOTTED:
        rows = [{"step": step, "variant": variant, key: value}
                for variant, curve in sorted(curves.items()) for step, value in curve.series(key)]
        write_csv(artifacts.curve_plot(name, key), ["step", "variant", key], rows)


def train_experiment(settings: Settings, name: str) -> None:
    from deqsm.experiments import VariantSpec, SolverRecorder, train_model
    from deqsm.train import TrainSettings
    from pipelines.provenance import provenance_tags
    from pipelines.tracking import Tracker

    mlflow_exp = settings.tracking.experiment_prefix + name
    tracker = Tracker.open(settings.tracking_uri(), [mlflow_exp], settings.tracking.timeout)
    artifacts = Artifacts.of(settings)
    best_file = artifacts.tune_best(name)
    if not best_file.exists():
        raise FileNotFoundError(f"{best_file} is missing: run the tune stage first (dvc repro tune@{name})")
    best = json.loads(best_file.read_text())["best"]
    splits = load_splits(artifacts, settings.experiments[name].dataset)
    tags = provenance_tags(settings, "pipelines.train")
    parent = tracker.start_run(mlflow_exp, f"train-{time.strftime('%Y%m%d-%H%M%S')}", {}, {"stage": "train", **tags})
    best_val: dict[str, float] = {}
    artifacts.models_dir(name).mkdir(parents=True, exist_ok=True)  # a DVC out, even when no variant trains
    curves: dict[str, CurveLogger] = {}
    for variant, entry in sorted(best.items()):
        cfg = entry["config"]
        # the search's settings with the full budget (not tune.steps) and this stage's progress bar
        train_cfg = {**cfg["train"], "steps": settings.train.steps, "progress": settings.train.progress}
        spec = VariantSpec(**cfg["spec"])
        run_id = tracker.start_run(mlflow_exp, f"{variant}", flatten({"spec": cfg["spec"], "train": train_cfg}),
                                   {"stage": "train", "variant": variant, **tags}, parent_run_id=parent)
        tracker.log_dataset_inputs(run_id, artifacts.data_root, settings.experiments[name].dataset, ("train", "val"))
        curve = curves[variant] = CurveLogger(tracker, run_id)
        solver = SolverRecorder()
        print(f"{name}/{variant}: training {train_cfg['steps']} steps", flush=True)
        try:
            model, fit = train_model(spec, splits, TrainSettings(**train_cfg), callbacks=[curve, solver])
        except BaseException as err:  # an interrupt ends the run KILLED, an error FAILED with its reason
            interrupted = isinstance(err, KeyboardInterrupt)
            tracker.end_run(run_id, "KILLED" if interrupted else "FAILED",
                            failure_reason=None if interrupted else f"{type(err).__name__}: {err}")
            tracker.end_run(parent, "KILLED" if interrupted else "FAILED")
            raise
        n_params = sum(p.numel() for p in model.parameters())
        summary = {**fit.summary(), **solver.summary(), "params": float(n_params)}
        tracker.log_metrics(run_id, {k: v for k, v in summary.items() if not isinstance(v, str)}, step=fit.steps)
        tracker.set_tags(run_id, {"memory_kind": fit.memory_kind})
        curve_path = artifacts.curve(name, variant)
        curve.write(curve_path)
        tracker.log_artifact(run_id, curve_path, "curves")
        save_model(artifacts.model(name, variant), model, spec=cfg["spec"], train=train_cfg, fit=summary,
                   history=fit.history, mlflow_run_id=run_id)
        tracker.log_model(run_id, mlflow_exp, variant, artifacts.model(name, variant), step=fit.steps,
                          params=flatten({"spec": cfg["spec"]}))
        best_val[variant] = fit.best_val_loss
        tracker.end_run(run_id, "FINISHED")
    write_curve_plots(artifacts, name, curves)
    prune_variants(artifacts.models(name) + sorted(artifacts.curve(name, "_").parent.glob("*.csv")), keep=set(best))
    tracker.log_best(parent, "val_loss", "min", best_val)  # the best validation loss of each variant
    tracker.end_run(parent, "FINISHED")


def main(argv: list[str] | None = None) -> None:
    run_experiment_stage(train_experiment, "pipelines.train", __doc__, argv)


if __name__ == "__main__":
    main_guard(main)
