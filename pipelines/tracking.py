"""MLflow: every MLflow call of the project lives here.

Conventions (see DESIGN.md): one MLflow experiment per pipeline experiment (e.g. ``nice-digits``); one
run per Ray Tune trial, nested under the tune stage's parent run; params flattened with dotted keys;
tags: git commit, dvc.lock hash, device. All logging goes through an explicit ``MlflowClient`` and run
ids (no global active run), so the Tune driver can log many trials from one process.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402


MAX_PARAM_LEN = 6000
ROOT = Path(__file__).resolve().parents[1]


def provenance_tags(device: str | None = None, root: Path = ROOT) -> dict[str, str]:
    """Tags every run carries: the git commit and dvc.lock hash of the project at ``root``, the device."""
    tags = {}
    try:
        tags["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                            text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        tags["git_commit"] = "unknown"
    lock = Path(root) / "dvc.lock"
    tags["dvc_lock_sha256"] = hashlib.sha256(lock.read_bytes()).hexdigest() if lock.exists() else "none"
    if device:
        tags["device"] = device
    return tags


class Tracker:
    """A thin, explicit wrapper over MlflowClient for one tracking URI."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        if uri.startswith("sqlite:///"):  # a new store: its folder must exist
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=uri)

    def __reduce__(self):  # Ray pickles Tune callbacks with the experiment state: carry the URI only
        return (Tracker, (self.uri,))

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        artifacts = None
        if self.uri.startswith("sqlite:///"):  # artifacts beside the database, not in the caller's cwd
            artifacts = (Path(self.uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" / name).as_uri()
        return self.client.create_experiment(name, artifact_location=artifacts)

    def start_run(self, experiment: str, name: str, params: dict[str, Any] | None = None,
                  tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id(experiment), run_name=name, tags=all_tags)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
        import time

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step or 0)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i:i + 500])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: Path | str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def end_run(self, run_id: str, status: str = "FINISHED", failure_reason: str | None = None) -> None:
        if failure_reason:
            self.set_tags(run_id, {"failure_reason": failure_reason[:5000]})
        self.client.set_terminated(run_id, status=RunStatus.to_string(getattr(RunStatus, status)))

    def runs(self, experiment: str, filter_string: str = "") -> list:
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        return self.client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=5000)

    def run_url(self, experiment: str, port: int = 5000) -> str:
        return f"http://127.0.0.1:{port}/#/experiments/{self.experiment_id(experiment)}/runs"
