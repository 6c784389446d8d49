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
    # the UI opens it as a model-training experiment (runs, metrics, models), not as a GenAI app's traces
    assert tracker.client.get_experiment_by_name("nice-test").tags["mlflow.experimentKind"] == "custom_model_development"


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
    # the DEQ's effective depth at each evaluation, as the trial's step metrics (deqsm.depth)
    contraction = client.get_metric_history(by_variant["deq"][0].info.run_id, "deq_contraction")
    assert len(contraction) >= 1 and all(0 < m.value < 1 for m in contraction)
    assert by_variant["deq"][0].data.metrics["deq_iterations"] >= 1
    assert "deq_contraction" not in by_variant["explicit-2"][0].data.metrics
    best = json.loads((tmp_path / "out" / "tune" / "dkef-mixture" / "best.json").read_text())
    assert best["best"]["deq"]["metrics"]["val_loss"] == min(r.data.metrics["val_loss"] for r in by_variant["deq"])
    # the parent run sums its trials up: the best val_loss per variant and over all
    [parent] = client.search_runs([exp.experiment_id], "tags.stage = 'tune' and tags.mlflow.source.name = 'pipelines.tune'"
                                  " and tags.best_variant != ''")
    for variant, runs in by_variant.items():
        assert parent.data.metrics[f"best/{variant}/val_loss"] == min(r.data.metrics["val_loss"] for r in runs)
    assert parent.data.metrics["best/val_loss"] == min(r.data.metrics["val_loss"] for r in trials)
    # each trial: the device its worker trained on, its data as inputs (the test split is not among them)
    manifest = json.loads((tmp_path / "data" / "prepared" / "mixture" / "manifest.json").read_text())
    for r in trials:
        assert r.data.tags["device"] == "cpu" and "git_commit" not in r.data.tags
        inputs = {i.tags[0].value: i.dataset for i in client.get_run(r.info.run_id).inputs.dataset_inputs}
        assert set(inputs) == {"train", "val"}
        assert all(manifest["splits"][k]["sha256"].startswith(d.digest) for k, d in inputs.items())


# --- what a user sees in the UI: source tags, device, datasets used, logged models, best metrics (SQLite store)

def _settings(tmp_path, **changes):
    import yaml

    from pipeline_project import tiny_params
    from pipelines.settings import load_params

    params = tiny_params(**{"tracking.uri": "sqlite:///mlflow.db", **changes})
    params["experiments"] = {"dkef-mixture": params["experiments"]["dkef-mixture"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return load_params(tmp_path / "params.yaml")


def _git(root, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_provenance_tags_are_mlflows_source_tags_the_dvc_experiment_and_the_device(tmp_path, monkeypatch):
    from pipelines.provenance import provenance_tags

    for var in ("DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    settings = _settings(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    _git(tmp_path, "init", "-q", "-b", "main")
    _git(tmp_path, "remote", "add", "origin", "https://user:s3cret@example.com/team/deqsm.git")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "one")
    tags = provenance_tags(settings, "pipelines.train")
    assert tags["mlflow.source.name"] == "pipelines.train" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == _git(tmp_path, "rev-parse", "HEAD")
    assert tags["mlflow.source.git.branch"] == "main"
    assert tags["mlflow.source.git.repoURL"] == "https://example.com/team/deqsm.git", "no credentials in MLflow"
    assert tags["device"] == "cpu" and settings.base.device == "auto"  # the device used, not the setting
    assert "git_commit" not in tags and "dvc_lock_sha256" not in tags and "dvc.exp_name" not in tags

    # A stage under `dvc exp run`: DVC's environment names the experiment; dvc.lock, rewritten after each stage,
    # does not change the pipeline hash, a param does.
    monkeypatch.setenv("DVC_STAGE", "train@dkef-mixture")
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-moat")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    under_dvc = provenance_tags(settings, "pipelines.evaluate")
    assert under_dvc["mlflow.source.type"] == "JOB" and under_dvc["dvc.stage"] == "train@dkef-mixture"
    assert under_dvc["dvc.exp_name"] == "brisk-moat" and under_dvc["dvc.exp_baseline_rev"] == "a" * 40
    assert under_dvc["pipeline_sha256"] == tags["pipeline_sha256"]
    changed = _settings(tmp_path, **{"deq.solver": "broyden"})
    assert provenance_tags(changed, "pipelines.train")["pipeline_sha256"] != tags["pipeline_sha256"]
    _git(tmp_path, "checkout", "-q", "--detach")
    assert "mlflow.source.git.branch" not in provenance_tags(settings, "pipelines.train")


def test_a_logged_model_downloads_and_loads_weights_only_into_the_same_model(tmp_path):
    """The trained-model file as an MLflow logged model: downloaded from the store, it loads (weights_only)
    into a model with the trained model's outputs."""
    import torch

    from deqsm.experiments import VariantSpec, train_model
    from deqsm.train import TrainSettings
    from pipelines.artifacts import load_model, save_model
    from mlflow.entities import LoggedModelStatus

    from pipelines.tracking import Tracker

    torch.manual_seed(0)
    train = torch.randn(64, 2)
    spec = {"name": "toy/deq", "model": "dkef", "variant": "deq", "width": 8, "loss": {"name": "ssm"},
            "model_options": {"n_inducing": 8}}
    model, fit = train_model(VariantSpec(**spec), {"train": train, "val": train[:16]},
                             TrainSettings(steps=3, batch_size=16, eval_every=3, progress=False, device="cpu"))
    tracker = Tracker(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    run = tracker.start_run("toy", "deq")
    save_model(tmp_path / "deq.pt", model, spec=spec, train={}, fit={}, history=fit.history, mlflow_run_id=run)
    model_id = tracker.log_model(run, "toy", "deq", tmp_path / "deq.pt", step=3, params={"spec.variant": "deq"})
    tracker.end_run(run)

    logged = tracker.client.get_logged_model(model_id)
    assert logged.name == "deq" and logged.source_run_id == run and logged.status == LoggedModelStatus.READY
    assert [o.model_id for o in tracker.client.get_run(run).outputs.model_outputs] == [model_id]
    path = tracker.download_model(model_id, tmp_path / "download")
    assert path.read_bytes() == (tmp_path / "deq.pt").read_bytes()
    _, loaded, saved = load_model(path, train)
    assert saved["mlflow_run_id"] == run
    x = torch.randn(10, 2)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.slow
def test_train_and_evaluate_runs_carry_seeds_datasets_models_and_honest_metric_names(tmp_path):
    """The train stage (from a hand-written best.json, no Ray; two seeds in two worker processes) and the evaluate
    stage on a SQLite store: the stage's run holds a run per variant, each variant's run a run per seed."""
    from deqsm.data import prepare_datasets, read_manifest
    from pipelines.artifacts import Artifacts, write_json
    from pipelines.evaluate import evaluate_experiment
    from pipelines.tracking import Tracker
    from pipelines.train import train_experiment
    from pipelines.trials import trial_config

    settings = _settings(tmp_path, **{"train.steps": 6, "train.eval_every": 3, "train.seeds": 2, "base.workers": 2})
    prepare_datasets(settings.data, tmp_path, ["mixture"])
    artifacts = Artifacts.of(settings)
    write_json(artifacts.tune_best("dkef-mixture"), {"best": {
        v: {"config": trial_config(settings, "dkef-mixture", v)} for v in ("deq", "explicit-2")}})
    train_experiment(settings, "dkef-mixture")
    evaluate_experiment(settings, "dkef-mixture")

    tracker = Tracker(settings.tracking_uri())
    runs = tracker.runs("dkef-mixture")
    [parent] = [r for r in runs if "variant" not in r.data.tags]
    variants = {r.data.tags["variant"]: r for r in runs if "variant" in r.data.tags and "seed" not in r.data.tags}
    seeds = {(r.data.tags["variant"], int(r.data.tags["seed"])): r for r in runs if "seed" in r.data.tags}
    assert set(variants) == {"deq", "explicit-2"} and set(seeds) == {(v, s) for v in variants for s in (0, 1)}
    assert {r.data.tags["mlflow.parentRunId"] for r in variants.values()} == {parent.info.run_id}
    metrics_json = json.loads(artifacts.metrics("dkef-mixture").read_text())
    per_seed = json.loads(artifacts.seed_metrics("dkef-mixture").read_text())
    manifest = read_manifest(artifacts.data_root, "mixture")
    for (variant, seed), r in seeds.items():
        assert r.data.tags["mlflow.parentRunId"] == variants[variant].info.run_id
        r = tracker.client.get_run(r.info.run_id)  # search_runs leaves the outputs out
        assert r.data.tags["mlflow.source.name"] == "pipelines.train" and r.data.tags["device"] == "cpu"
        inputs = {i.tags[0].value: i.dataset for i in r.inputs.dataset_inputs}
        assert set(inputs) == {"train", "val", "test"}  # train/val from training, test from evaluate
        for split, ds in inputs.items():
            assert ds.name == "mixture" and manifest["splits"][split]["sha256"].startswith(ds.digest)
            assert json.loads(ds.source)["uri"] == str(artifacts.data_root.resolve() / "mixture" / f"{split}.parquet")
        metrics = r.data.metrics
        assert {"test/loglik", "test/fisher_divergence", "model/params", "params", "peak_bytes"} <= set(metrics)
        assert not [k for k in metrics if k.startswith("test/") and k[5:] in ("params", "train_steps", "peak_bytes",
                                                                               "step_ms_median", "steps")]
        assert metrics["test/loglik"] == per_seed[variant][str(seed)]["test_loglik"]
        if variant == "deq":  # its gradient checked against the exact one once trained (train.grad_cosine_min)
            assert metrics["train_grad_cosine"] > 0.99 and r.data.tags["deqsm.grad_cosine_low"] == "false"
        else:
            assert "train_grad_cosine" not in metrics and "deqsm.grad_cosine_low" not in r.data.tags
        # generated data: the SSM loss watched against the data's floor (deqsm.floor)
        assert metrics["loss_floor"] < 0 and metrics["loss_degenerate"] == 0.0
        assert r.data.tags["deqsm.degenerate_loss"] == "false"
        assert r.data.params["train.seed"] == str(seed)
        [output] = r.outputs.model_outputs
        logged = tracker.client.get_logged_model(output.model_id)
        assert logged.name == f"{variant}-seed{seed}" and logged.source_run_id == r.info.run_id
        assert tracker.download_model(output.model_id, tmp_path / variant / str(seed)).read_bytes() == \
            artifacts.model("dkef-mixture", variant, seed).read_bytes()
    for variant, r in variants.items():
        m = r.data.metrics
        values = [per_seed[variant][s]["test_loglik"] for s in ("0", "1")]
        assert values[0] != values[1], "the seeds train different models"
        assert m["test/loglik_mean"] == pytest.approx(sum(values) / 2) == metrics_json[variant]["test_loglik_mean"]
        assert m["test/loglik_se_seeds"] == pytest.approx(abs(values[0] - values[1]) / 2)
        assert "model/params_mean" in m and metrics_json[variant]["seeds"] == [0, 1]
        if variant == "deq":  # its effective depth on test rows (deqsm.depth), in metrics.json and MLflow
            assert 0 < m["test/deq_contraction_mean"] == metrics_json["deq"]["deq_contraction_mean"] < 1
            assert metrics_json["deq"]["deq_grad_cosine_mean"] > 0.9
        else:
            assert "test/deq_contraction_mean" not in m and "deq_contraction_mean" not in metrics_json[variant]
        assert parent.data.metrics[f"best/{variant}/val_loss"] == pytest.approx(m["best_val_loss_mean"])
    # the same seeds trained in this process (workers 1) give the same weights as in the worker processes
    import torch

    one = settings.model_copy(update={"base": settings.base.model_copy(update={"out": "out1", "workers": 1})})
    write_json(Artifacts.of(one).tune_best("dkef-mixture"), json.loads(artifacts.tune_best("dkef-mixture").read_text()))
    train_experiment(one, "dkef-mixture")
    for variant in variants:
        for seed in (0, 1):
            a, b = (torch.load(Artifacts.of(s).model("dkef-mixture", variant, seed), weights_only=True)["state_dict"]
                    for s in (settings, one))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (variant, seed)