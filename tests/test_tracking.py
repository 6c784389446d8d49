"""MLflow tracking against a real `mlflow server` on 127.0.0.1 (SQLite store), stopped by its PID."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--artifacts-destination", str(root / "artifacts")],
        cwd=root, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not become healthy:\n" + (root / "server.log").read_text()[-2000:])
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: the group we started
        proc.wait(timeout=30)


def test_nested_runs_params_metrics_and_failure(mlflow_server, tmp_path):
    from pipelines.tracking import Tracker

    tracker = Tracker(mlflow_server)
    parent = tracker.start_run("nice-test", "tune-1", {"tune.num_samples": 1}, {"stage": "tune"})
    child = tracker.start_run("nice-test", "deq-0", {"spec.deq.solver": "anderson", "train.lr": 0.001},
                              {"variant": "deq"}, parent_run_id=parent)
    for step in (10, 20):
        tracker.log_metrics(child, {"val_loss": 1.0 / step, "peak_bytes": 1234}, step=step)
    (tmp_path / "curve.csv").write_text("step,loss\n10,0.1\n")
    tracker.log_artifact(child, tmp_path / "curve.csv")
    tracker.end_run(child, "FINISHED")
    failed = tracker.start_run("nice-test", "explicit-0", {}, parent_run_id=parent)
    tracker.end_run(failed, "FAILED", failure_reason="TrainingError: non-finite loss (nan) at step 3")
    tracker.end_run(parent, "FINISHED")

    runs = {r.info.run_name: r for r in tracker.runs("nice-test")}
    assert runs["deq-0"].data.tags["mlflow.parentRunId"] == parent
    assert runs["deq-0"].data.params["spec.deq.solver"] == "anderson"
    history = tracker.client.get_metric_history(child, "val_loss")
    assert [(m.step, m.value) for m in history] == [(10, 0.1), (20, 0.05)]
    assert runs["explicit-0"].info.status == "FAILED"
    assert runs["explicit-0"].data.tags["failure_reason"].startswith("TrainingError: non-finite")
    assert [a.path for a in tracker.client.list_artifacts(child)] == ["curve.csv"]
    assert tracker.run_url("nice-test").startswith("http://127.0.0.1:")
