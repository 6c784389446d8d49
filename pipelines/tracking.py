"""MLflow: every MLflow call of the project lives here.

Conventions (see DESIGN.md): one MLflow experiment per pipeline experiment (e.g. ``nice-digits``); one
run per Ray Tune trial, nested under the tune stage's parent run; params flattened with dotted keys. All
logging goes through an explicit ``MlflowClient`` and run ids (no global active run), so the Tune driver can
log many trials from one process.

Tags of every run: :mod:`pipelines.provenance` (source, git commit, DVC stage and experiment, device).

Inputs and outputs: a training run logs its prepared dataset splits as MLflow dataset inputs
(:meth:`Tracker.log_dataset_inputs`: the UI's "Datasets used"), and a trained variant is an MLflow logged
model (:meth:`Tracker.log_model`) whose artifact is the pipeline's own model file, not a pickled module:
``mlflow.pytorch.log_model`` pickles the whole ``nn.Module`` (loading it unpickles arbitrary objects, i.e.
runs code from the file), while the pipeline's file holds a state dict and the spec that rebuilds the
architecture. Load it with :meth:`Tracker.download_model` and :func:`pipelines.artifacts.load_model`.
"""
from __future__ import annotations

import math
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import (Dataset, DatasetInput, InputTag, LoggedModelOutput,  # noqa: E402
                              LoggedModelStatus, Metric, Param, RunStatus, RunTag)
from mlflow.tracking import MlflowClient  # noqa: E402


MAX_PARAM_LEN = 6000
ROOT = Path(__file__).resolve().parents[1]


def check_store(uri: str, timeout: float = 30.0) -> None:
    """Fail fast, in one :class:`pipelines.ServiceError` line that names the store, its address and what to do,
    when the tracking store cannot be used: an http(s) server that does not answer its /health within
    ``timeout`` seconds, a SQLite file that is not a database (truncated, corrupt) or is locked by another
    process for longer than ``timeout``. Without it MLflow retries for minutes, then prints a long traceback."""
    from pipelines import ServiceError

    if uri.startswith(("http://", "https://")):
        import requests

        url = uri.rstrip("/") + "/health"
        try:
            reply = requests.get(url, timeout=timeout)
        except requests.RequestException as err:
            reason = (f"no answer within {timeout:g} s" if isinstance(err, requests.Timeout)
                      else "connection refused" if "refused" in str(err).lower() else type(err).__name__)
            raise ServiceError(f"MLflow tracking server at {uri} is not reachable ({reason}; tracking.timeout "
                               f"{timeout:g} s): start it (e.g. `mlflow server --host 127.0.0.1 "
                               f"--port {urlsplit(uri).port or 80}`) or point tracking.uri at a running one") from None
        if reply.status_code != 200:
            raise ServiceError(f"MLflow tracking server at {uri} answered /health with HTTP {reply.status_code}: "
                               "is it an MLflow server? check tracking.uri") from None
        return
    if uri.startswith("sqlite:///"):
        import sqlite3

        path = Path(uri[len("sqlite:///"):])
        if not path.exists() or path.stat().st_size == 0:
            return  # a new store: MLflow creates it
        try:
            deadline = time.monotonic() + timeout  # one wait in all, not one per statement
            con = sqlite3.connect(str(path), timeout=timeout)
            try:
                con.execute("SELECT count(*) FROM sqlite_master").fetchone()  # waits while a writer holds it
                left_ms = max(1, int(1000 * (deadline - time.monotonic())))
                con.execute(f"PRAGMA busy_timeout = {left_ms}")
                con.execute("BEGIN IMMEDIATE")  # waits, for what is left, for another writer's lock
                con.rollback()
            finally:
                con.close()
        except sqlite3.DatabaseError as err:
            what = str(err)
            if "locked" in what or "busy" in what:
                raise ServiceError(f"MLflow store {path} is locked by another process ({what}, waited "
                                   f"{timeout:g} s, tracking.timeout): wait for it to finish or stop it "
                                   "(e.g. a stage still running, an `mlflow ui` mid-write)") from None
            raise ServiceError(f"MLflow store {path} is not a usable SQLite database ({what}): restore it from a "
                               "backup, or move it aside to start a new store") from None


def _started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None where /proc does not tell: with
    the pid it names one process, also after the pid was reused by another."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name (field 2) may hold spaces
    except (OSError, IndexError):
        return None


def _owner_tags() -> dict[str, str]:
    return {"deqsm.host": socket.gethostname(), "deqsm.pid": str(os.getpid()),
            "deqsm.pid_started": _started(os.getpid()) or ""}


def _owner_alive(pid: str | None, started: str | None) -> bool:
    """Whether the process a run records (``deqsm.pid``, ``deqsm.pid_started``) still runs on this host; a pid
    now held by another process (a different start time) does not count."""
    if pid is None or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    return not started or _started(int(pid)) in (None, started)


class Tracker:
    """A thin, explicit wrapper over MlflowClient for one tracking URI. Every run it starts carries the host and
    process that own it (``deqsm.host``, ``deqsm.pid``, ``deqsm.pid_started``): :meth:`end_stale_runs` ends the RUNNING runs whose
    owner is gone (a SIGKILL, a power cut) as KILLED."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        if uri.startswith("sqlite:///"):  # a new store: its folder must exist
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=uri)

    @classmethod
    def open(cls, uri: str, experiments: list[str] | tuple[str, ...] = (), timeout: float = 30.0) -> "Tracker":
        """A stage's tracker: the store checked (:func:`check_store`) before the stage does any work, and the
        stale runs of ``experiments`` ended (:meth:`end_stale_runs`)."""
        check_store(uri, timeout)
        if uri.startswith(("http://", "https://")):  # later calls fail within the same bound, not after retries
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, timeout))))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        tracker = cls(uri)
        for name in experiments:
            ended = tracker.end_stale_runs(name)
            if ended:
                print(f"mlflow: {name}: ended {len(ended)} stale RUNNING run(s) as KILLED (their process is gone)",
                      flush=True)
        return tracker

    def end_stale_runs(self, experiment: str) -> list[str]:
        """End as KILLED, with a ``failure_reason``, the RUNNING runs of ``experiment`` whose process is gone: one
        on this host that no longer runs, or one that records no owner (a run from before owners were recorded).
        Runs of live processes, and of other hosts, are left alone. Returns the ids ended."""
        host = socket.gethostname()
        ended = []
        for run in self.runs(experiment, "attributes.status = 'RUNNING'"):
            tags = run.data.tags
            pid, owner = tags.get("deqsm.pid"), tags.get("deqsm.host")
            if owner is not None and owner != host:
                continue
            if _owner_alive(pid, tags.get("deqsm.pid_started")):
                continue
            why = (f"stale: its process ({owner}, pid {pid}) ended without closing the run (killed?)" if pid
                   else "stale: RUNNING with no owner process recorded")
            self.end_run(run.info.run_id, "KILLED", failure_reason=why)
            ended.append(run.info.run_id)
        return ended

    def end_own_runs(self, experiment: str, status: str = "KILLED", failure_reason: str | None = None) -> list[str]:
        """End this process's RUNNING runs of ``experiment`` (an interrupted stage: its trial runs too)."""
        mine = (socket.gethostname(), str(os.getpid()))
        ended = []
        for run in self.runs(experiment, "attributes.status = 'RUNNING'"):
            if (run.data.tags.get("deqsm.host"), run.data.tags.get("deqsm.pid")) == mine:
                self.end_run(run.info.run_id, status, failure_reason=failure_reason)
                ended.append(run.info.run_id)
        return ended

    def run_or_new(self, run_id: str | None, experiment: str, name: str, tags: dict[str, str]) -> tuple[str, bool]:
        """``run_id`` when the store holds it; else a new run (tagged ``missing_run_id``) in ``experiment``: the
        store was deleted or tracking.uri changed since the run was made. Returns (run id, whether it is new)."""
        if run_id:
            try:
                self.client.get_run(run_id)
                return run_id, False
            except mlflow.exceptions.MlflowException:
                pass
        return self.start_run(experiment, name, None, {**tags, "missing_run_id": run_id or "none"}), True

    def claim(self, run_id: str) -> None:
        """Record this process as the owner of ``run_id`` (a resumed search logging to an earlier trial's run)."""
        self.set_tags(run_id, _owner_tags())

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
        # the UI's kind of experiment: model training (its runs, metrics and models), not a GenAI app's traces
        return self.client.create_experiment(name, artifact_location=artifacts,
                                             tags={"mlflow.experimentKind": "custom_model_development"})

    def start_run(self, experiment: str, name: str, params: dict[str, Any] | None = None,
                  tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
        all_tags = {**_owner_tags(), **(tags or {})}
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

    def log_metric_rows(self, run_id: str, rows: list[dict[str, Any]]) -> None:
        """A training curve's rows (each with its ``step``) as metric histories, in few requests."""
        import time

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(r["step"])) for r in rows for k, v in r.items()
                 if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: Path | str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dataset_inputs(self, run_id: str, data_root: Path | str, name: str, splits: tuple[str, ...]) -> None:
        """The prepared dataset ``name``'s ``splits`` as the run's dataset inputs (the UI's "Datasets used"): one
        MLflow dataset per Parquet file, named ``name``, context tag the split, source its path, digest the
        first 32 hex digits of the file's sha256 in the manifest (MLflow allows 36 characters; the profile holds
        the whole sha256, the rows and the sample shape)."""
        from deqsm.data import read_manifest

        manifest = read_manifest(data_root, name)
        inputs = []
        for split in splits:
            entry = manifest["splits"][split]
            path = (Path(data_root) / name / entry["file"]).resolve()
            profile = {"rows": entry["rows"], "bytes": entry["bytes"], "sha256": entry["sha256"],
                       "shape": manifest.get("shape"), "dataset": manifest.get("dataset"), "kind": manifest.get("kind")}
            ds = Dataset(name=name, digest=entry["sha256"][:32], source_type="local",
                         source=json.dumps({"uri": str(path)}), profile=json.dumps(profile, sort_keys=True))
            inputs.append(DatasetInput(ds, [InputTag("mlflow.data.context", split)]))
        self.client.log_inputs(run_id, datasets=inputs)

    def log_model(self, run_id: str, experiment: str, name: str, path: Path | str, *, step: int = 0,
                  params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> str:
        """The model file at ``path`` (:func:`pipelines.artifacts.save_model`'s format) as an MLflow logged model
        named ``name``, produced by run ``run_id`` (the run page's "Logged models"); returns its model id.
        The artifact is the file itself (weights + spec, read with ``weights_only=True``), no MLmodel flavor."""
        path = Path(path)
        model = self.client.create_logged_model(
            self.experiment_id(experiment), name=name, source_run_id=run_id, model_type="deqsm",
            params={k: str(v)[:MAX_PARAM_LEN] for k, v in (params or {}).items()},
            tags={"deqsm.file": path.name,
                  "deqsm.loader": f"pipelines.artifacts.load_model(<downloaded>/{path.name}, <train split>)",
                  **(tags or {})})
        try:
            with tempfile.TemporaryDirectory(prefix="deqsm-model-") as tmp:
                shutil.copy2(path, Path(tmp) / path.name)
                self.client.log_model_artifacts(model.model_id, tmp)
        except BaseException:
            self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
        return model.model_id

    def download_model(self, model_id: str, dst: Path | str) -> Path:
        """A logged model's file, downloaded into ``dst``; load it with :func:`pipelines.artifacts.load_model`."""
        model = self.client.get_logged_model(model_id)
        folder = mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=str(dst))
        return Path(folder) / model.tags["deqsm.file"]

    def log_best(self, run_id: str, metric: str, mode: str, values: dict[str, Any]) -> None:
        """A parent run's summary of its children: ``best/<variant>/<metric>`` per variant and ``best/<metric>``
        over all, with tag ``best_variant`` (``mode``: min or max)."""
        values = {k: float(v) for k, v in values.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
        if not values:
            return
        best = (min if mode == "min" else max)(values, key=values.get)
        self.log_metrics(run_id, {**{f"best/{v}/{metric}": x for v, x in values.items()},
                                  f"best/{metric}": values[best]})
        self.set_tags(run_id, {"best_variant": best})

    def end_run(self, run_id: str, status: str = "FINISHED", failure_reason: str | None = None) -> None:
        """End a run; a FINISHED run keeps no ``failure_reason`` of an earlier, interrupted attempt."""
        if failure_reason:
            self.set_tags(run_id, {"failure_reason": failure_reason[:5000]})
        elif status == "FINISHED" and "failure_reason" in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, "failure_reason")
        self.client.set_terminated(run_id, status=RunStatus.to_string(getattr(RunStatus, status)))

    def runs(self, experiment: str, filter_string: str = "") -> list:
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        return self.client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=5000)

    def run_url(self, experiment: str, port: int = 5000) -> str:
        return f"http://127.0.0.1:{port}/#/experiments/{self.experiment_id(experiment)}/runs"
