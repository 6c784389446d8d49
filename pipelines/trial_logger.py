"""Ray Tune → MLflow, on the driver: :class:`MlflowTrialLogger` logs each trial of a search as one MLflow run
nested under the tune stage's parent run, and prints one progress line per finished trial.

A retried trial stays the same run (tagged ``retried`` and ``last_error``); a trial that raised ends FAILED
with a ``failure_reason`` (the root cause first), and so does one whose training stopped on a
:class:`deqsm.train.TrainingError`, which :func:`pipelines.ray_search._trainable` reports as a result
(``failed``) rather than raising; one that ASHA stopped is tagged ``stopped_early``.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from ray import tune

from pipelines.tracking import Tracker
from pipelines.trials import apply_sample, flatten, trial_point

# What Ray adds to every result a trial reports (when, where, which process, its own counters): not the trial's
# figures, so not logged to MLflow as metrics.
RAY_BOOKKEEPING = {"timestamp", "date", "hostname", "pid", "node_ip", "node_id", "trial_id", "experiment_id",
                   "time_this_iter_s", "time_total_s", "time_since_restore", "iterations_since_restore", "done",
                   "checkpoint_dir_name", "should_checkpoint", "config", "training_iteration"}


def stopped_early(last_result: dict) -> bool:
    """Whether a trial's last result is an evaluation's report rather than the summary (``final`` = 1) that a trial
    run to its end sends: ASHA stopped it at a rung."""
    return "final" not in last_result and "step" in last_result


class MlflowTrialLogger(tune.Callback):
    """Driver-side: one MLflow run per trial, nested under ``parent_run_id``."""

    def __init__(self, tracker: Tracker, experiment: str, parent_run_id: str,
                 base_configs: dict[str, dict], tags: dict[str, str] | None = None, total: int | None = None,
                 data_root: Path | None = None) -> None:
        self.tracker, self.experiment, self.parent = tracker, experiment, parent_run_id
        self.base_configs = base_configs
        self.total = total  # trials of the whole search (Ray creates them lazily: its list grows as they start)
        self.tags = dict(tags or {})
        self.data_root = data_root  # the prepared datasets: each trial run logs its train/val splits as inputs
        self.runs: dict[str, str] = {}
        self.devices: dict[str, str] = {}  # trial id → the device its worker reported (tagged once)

    def _run_id(self, trial) -> str:
        if trial.trial_id not in self.runs:
            variant, sample = trial_point(trial.config)
            cfg = apply_sample(self.base_configs[variant], sample)
            params = flatten({k: v for k, v in cfg.items() if k in ("spec", "train", "eval_options")})
            params["variant_name"] = cfg["variant_name"]
            params["dataset"] = cfg["dataset"]
            existing = self.tracker.runs(self.experiment, f"tags.ray_trial_id = '{trial.trial_id}'")
            if existing:  # a resumed search: keep logging to the trial's run, now owned by this process
                self.runs[trial.trial_id] = existing[0].info.run_id
                self.tracker.claim(existing[0].info.run_id)
            else:
                self.runs[trial.trial_id] = self.tracker.start_run(
                    self.experiment, f"{cfg['variant_name']}-{trial.trial_id}", params,
                    {"ray_trial_id": trial.trial_id, "variant": cfg["variant_name"], "stage": "tune",
                     **self.tags}, parent_run_id=self.parent)
                if self.data_root is not None:
                    self.tracker.log_dataset_inputs(self.runs[trial.trial_id], self.data_root, cfg["dataset"],
                                                    ("train", "val"))
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "failed" in result:  # the trial's training stopped on an error (its run ends FAILED on completion)
            return
        metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in RAY_BOOKKEEPING}
        self.tracker.log_metrics(self._run_id(trial), metrics, step=int(result.get("step", result.get("training_iteration", 0))))
        device = result.get("device")
        if isinstance(device, str) and self.devices.get(trial.trial_id) != device:
            self.devices[trial.trial_id] = device
            self.tracker.set_tags(self._run_id(trial), {"device": device})

    def on_trial_recover(self, iteration, trials, trial, **info):
        run_id = self._run_id(trial)
        self.tracker.set_tags(run_id, {"retried": str(trial.num_failures), "last_error": _error_text(trial)})

    def _progress(self, trials, trial, outcome: str) -> None:
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial) + 1
        variant, point = trial_point(trial.config)
        sample = ", ".join(f"{k}={v}" for k, v in sorted(point.items()))
        metric = trial.last_result.get("val_loss") if trial.last_result else None
        print(f"[{self.experiment} {done}/{max(self.total or 0, len(trials))}] {variant} ({sample}) {outcome}"
              + (f", val_loss={metric:.4g}" if isinstance(metric, float) and math.isfinite(metric) else ""), flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if isinstance(last.get("failed"), str):  # ended on a TrainingError (see _trainable)
            self.tracker.end_run(self._run_id(trial), "FAILED", failure_reason=last["failed"])
            self._progress(trials, trial, f"FAILED: {last['failed'].splitlines()[0]}")
            return
        stopped = stopped_early(last)
        if stopped:
            self.tracker.set_tags(self._run_id(trial), {"stopped_early": f"asha at step {last['step']}"})
        self.tracker.end_run(self._run_id(trial), "FINISHED")
        self._progress(trials, trial, f"stopped early by ASHA at step {last['step']}" if stopped else "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        reason = _error_text(trial)
        self.tracker.end_run(self._run_id(trial), "FAILED", failure_reason=reason)
        self._progress(trials, trial, f"FAILED: {reason.splitlines()[0]}")


def _error_text(trial) -> str:
    try:
        # Ray writes the error to the driver's local trial folder before it calls the callbacks and copies it to
        # the storage path (where trial.get_error() reads) only later: read the local file, its last failure.
        local = Path(trial.error_file) if trial.error_file else None
        text = local.read_text() if local is not None and local.is_file() else ""
        text = re.split(r"^Failure # \d+ \(occurred at [^)]*\)$", text, flags=re.M)[-1]
        if not text.strip():
            err = trial.get_error()
            text = str(err) if err is not None else ""
    except Exception as e:  # noqa: BLE001 — reading a failed trial's error must not fail the search
        text = f"(error unreadable: {e})"
    # The root cause is the last line of the worker's traceback: keep it first.
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] + "\n" + text) if lines else "unknown error"
