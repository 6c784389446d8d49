"""MLflow tracking against a real `mlflow server` on 127.0.0.1 (SQLite store), stopped by its PID."""
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline_project import free_port, stop_group

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
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
        stop_group(proc, timeout=30)  # the server and its workers: the group we started


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


@pytest.mark.slow
def test_tiny_tune_against_the_server_compares_deq_with_explicit(mlflow_server, tmp_path):
    """The tune stage logs to a real MLflow server; search_runs reads the trials back for a DEQ-vs-explicit
    comparison (what a user does in the UI's compare view)."""
    import yaml
    from mlflow.tracking import MlflowClient

    from pipeline_project import tiny_params
    from pipelines.tune import main as tune_main

    params = tiny_params(**{"tracking.uri": mlflow_server, "tracking.experiment_prefix": "srv-"})
    params["experiments"] = {"dkef-mixture": params["experiments"]["dkef-mixture"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    from deqsm.data import prepare_datasets
    from pipelines.settings import load_params

    settings = load_params(tmp_path / "params.yaml")
    prepare_datasets(settings.data, tmp_path, ["mixture"])
    tune_main(["--params", str(tmp_path / "params.yaml")])

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("srv-dkef-mixture")
    trials = client.search_runs([exp.experiment_id], "tags.stage = 'tune' and attributes.status = 'FINISHED'",
                                order_by=["metrics.val_loss ASC"])
    trials = [r for r in trials if "ray_trial_id" in r.data.tags]
    assert len(trials) == 4
    by_variant = {}
    for r in trials:
        by_variant.setdefault(r.data.tags["variant"], []).append(r)
    assert set(by_variant) == {"deq", "explicit-2"}
    for variant, runs in by_variant.items():
        assert len(runs) == 2 and {r.data.params["train.lr"] for r in runs} == {"0.001", "0.003"}
        for r in runs:
            assert r.data.metrics["peak_bytes"] > 0 and r.data.metrics["step_ms_median"] > 0
    assert "solver_nstep_mean" in by_variant["deq"][0].data.metrics
    assert "solver_nstep_mean" not in by_variant["explicit-2"][0].data.metrics
    best = json.loads((tmp_path / "out" / "tune" / "dkef-mixture" / "best.json").read_text())
    assert best["best"]["deq"]["metrics"]["val_loss"] == min(r.data.metrics["val_loss"] for r in by_variant["deq"])
