"""End to end on a copy of the project: real git, real DVC, real Ray (local), real MLflow (SQLite store).

One module-scoped project runs `dvc repro` once; the tests then read what it left and change one thing at
a time: a second repro is a no-op, an eval param re-runs only evaluation, `dvc exp run -S deq.solver=...`
re-runs what depends on the DEQ settings and not the data preparation.
"""
from __future__ import annotations

import json

import pytest
import yaml

from pipeline_project import make_project, run, tiny_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPERIMENTS = ("dkef-mixture", "nice-digits")


def _ran(proc) -> set[str]:
    """Stage names DVC ran (its 'Running stage ...' lines)."""
    out = proc.stdout + proc.stderr
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("deqsm-project"), tiny_params())
    first = run(["dvc", "repro"], root)
    return root, first


def test_repro_runs_every_stage_and_writes_metrics(project):
    root, first = project
    ran = _ran(first)
    assert "prepare" in ran
    for exp in EXPERIMENTS:
        assert {f"tune@{exp}", f"train@{exp}", f"evaluate@{exp}", f"fidelity@{exp}"} <= ran
        metrics = json.loads((root / "results" / "experiments" / exp / "metrics.json").read_text())
        assert set(metrics) == {"deq", "explicit-2"}
        for row in metrics.values():  # means over the seeds, with their standard errors
            assert row["seeds"] == [0, 1] and isinstance(row["test_loglik_mean"], float)
            assert row["test_loglik_se_seeds"] > 0 and row["peak_bytes_mean"] > 0 and row["step_ms_median_mean"] > 0
            assert row["params_mean"] > 0
        assert metrics["deq"]["solver_nstep_mean_mean"] >= 1
        per_seed = json.loads((root / "results" / "experiments" / exp / "seeds.json").read_text())
        assert {v: sorted(s) for v, s in per_seed.items()} == {"deq": ["0", "1"], "explicit-2": ["0", "1"]}
        best = json.loads((root / "out" / "tune" / exp / "best.json").read_text())
        assert best["trials"] == 4 and set(best["best"]) == {"deq", "explicit-2"}
        progress = [ln for ln in (first.stdout + first.stderr).splitlines() if ln.startswith(f"[{exp} ")]
        assert [ln.split()[1] for ln in progress] == ["1/4]", "2/4]", "3/4]", "4/4]"], progress
        curves = sorted(p.relative_to(root / "results" / "experiments" / exp / "curves").as_posix()
                        for p in (root / "results" / "experiments" / exp / "curves").rglob("*.csv"))
        assert curves == ["deq/seed0.csv", "deq/seed1.csv", "explicit-2/seed0.csv", "explicit-2/seed1.csv"]
        models = sorted(p.relative_to(root / "out" / "models" / exp).as_posix()
                        for p in (root / "out" / "models" / exp).rglob("*.pt"))
        assert models == ["deq/seed0.pt", "deq/seed1.pt", "explicit-2/seed0.pt", "explicit-2/seed1.pt"]
    mixture = json.loads((root / "results" / "experiments" / "dkef-mixture" / "metrics.json").read_text())
    assert "fisher_divergence_mean" in mixture["deq"], "generated data: the true score is known"
    nice = json.loads((root / "results" / "experiments" / "nice-digits" / "metrics.json").read_text())
    assert nice["deq"]["test_bpd_mean"] > 0
    assert {"bench", "report"} <= ran
    report = (root / "results" / "REPORT.md").read_text()
    for exp in EXPERIMENTS:
        assert exp in report and (root / "results" / "tables" / f"{exp}.md").exists()
        assert f"{nice['deq']['test_loglik_mean']:.2f}" in (root / "results" / "tables" / "nice-digits.md").read_text()
    assert (root / "results" / "figures" / "memory_depth.png").stat().st_size > 1000


def test_metrics_show_lists_every_experiment(project):
    root, _ = project
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], root).stdout)
    files = {f for ws in shown.values() for f in ws.get("data", {})}
    assert {f"results/experiments/{e}/metrics.json" for e in EXPERIMENTS} <= files


def test_mlflow_holds_one_run_per_trial(project):
    root, _ = project
    from pipelines.tracking import Tracker

    tracker = Tracker(f"sqlite:///{root}/out/mlflow.db")
    for exp in EXPERIMENTS:
        runs = tracker.runs(exp)
        trials = [r for r in runs if r.data.tags.get("stage") == "tune" and "ray_trial_id" in r.data.tags]
        parents = [r for r in runs if r.data.tags.get("stage") == "tune" and "ray_trial_id" not in r.data.tags]
        assert len(trials) == 4 and len(parents) == 1
        for r in trials:
            assert r.info.status == "FINISHED"
            assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
            assert {"val_loss", "peak_bytes", "step_ms", "step_ms_median", "train_loss"} <= set(r.data.metrics)
            assert r.data.params["train.lr"] in ("0.001", "0.003")
            assert r.data.tags["mlflow.source.git.commit"] and r.data.tags["device"] in ("cpu", "cuda:0")
            assert r.data.tags["mlflow.source.type"] == "JOB" and r.data.tags["dvc.stage"] == f"tune@{exp}"
            r = tracker.client.get_run(r.info.run_id)  # with its inputs
            dataset = {"dkef-mixture": "mixture", "nice-digits": "digits"}[exp]
            assert {i.tags[0].value: i.dataset.name for i in r.inputs.dataset_inputs} == {"train": dataset, "val": dataset}
        deq_trials = [r for r in trials if r.data.tags["variant"] == "deq"]
        for r in deq_trials:  # per-step solver metrics (one set per DEQ layer) and their summary
            assert "solver_nstep_mean" in r.data.metrics
            assert any(k.startswith("solver") and k.endswith("_nstep") for k in r.data.metrics)
        assert len(deq_trials) == 2
        best = json.loads((root / "out" / "tune" / exp / "best.json").read_text())["best"]
        assert parents[0].data.metrics["best/deq/val_loss"] == best["deq"]["metrics"]["val_loss"]
        final = [r for r in runs if r.data.tags.get("stage") == "train" and "variant" in r.data.tags]
        by_variant = {r.data.tags["variant"]: r for r in final if "seed" not in r.data.tags}
        seeds = [r for r in final if "seed" in r.data.tags]
        assert sorted(by_variant) == ["deq", "explicit-2"] and len(seeds) == 4
        for r in by_variant.values():  # the variant's run: means and errors over its seeds' runs, nested under it
            assert {"test/loglik_mean", "test/loglik_se_seeds", "best_val_loss_mean"} <= set(r.data.metrics)
        for r in seeds:
            assert r.data.tags["mlflow.parentRunId"] == by_variant[r.data.tags["variant"]].info.run_id
            assert "test/loglik" in r.data.metrics and "peak_bytes" in r.data.metrics
            assert not any(k in r.data.metrics for k in ("test/params", "test/train_steps", "test/peak_bytes"))
            assert [a.path for a in tracker.client.list_artifacts(r.info.run_id)] == ["curves"]
            assert len(tracker.client.get_run(r.info.run_id).outputs.model_outputs) == 1  # the logged model
        # one repro: every stage's runs carry the same pipeline hash (dvc.lock changes between stages)
        assert len({r.data.tags["pipeline_sha256"] for r in runs}) == 1


def test_second_repro_does_nothing(project):
    root, _ = project
    again = run(["dvc", "repro"], root)
    assert _ran(again) == set()
    assert "Data and pipelines are up to date" in again.stdout + again.stderr


def test_eval_param_reruns_only_evaluation(project):
    root, _ = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["eval"]["is_samples"] = 3000
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = run(["dvc", "repro"], root)
    # check reads all of params.yaml (a few seconds); its output stays the same, so only evaluation follows
    assert _ran(proc) == {"check"} | {f"evaluate@{e}" for e in EXPERIMENTS} | {"report"}


def _set_params(root, changes: dict) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split(".")
        params[section][name] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_settings_trials_do_not_read_leave_the_search_alone(project):
    """train.steps (trials run tune.steps), train.progress and base.threads (the stage process's threads) change
    the train stage, not the Ray search."""
    root, _ = project
    before = (root / "params.yaml").read_text()
    try:
        _set_params(root, {"train.steps": 14, "train.progress": True, "base.threads": 2})
        changed = set(json.loads(run(["dvc", "status", "--json"], root).stdout))
    finally:
        (root / "params.yaml").write_text(before)
    assert {f"train@{e}" for e in EXPERIMENTS} <= changed
    assert not {s for s in changed if s.startswith("tune@")}, changed


def test_a_search_run_again_writes_the_same_best_json_and_nothing_after_it_reruns(project):
    """best.json holds what the search decided (no dates, hosts, pids, timings): a forced re-run of an unchanged
    search rewrites the same bytes, so DVC re-runs none of the stages after it."""
    root, _ = project
    best = root / "out" / "tune" / "dkef-mixture" / "best.json"
    before = best.read_bytes()
    for key in ("date", "hostname", "pid", "timestamp", "node_id", "trial_id", "parent_run_id", "step_ms_median"):
        assert f'"{key}"' not in before.decode(), key
    run(["dvc", "repro", "--force", "--single-item", "tune@dkef-mixture"], root)
    assert best.read_bytes() == before
    again = run(["dvc", "repro"], root)
    assert _ran(again) == set(), "an unchanged search must leave train/evaluate/fidelity/report up to date"


def test_exp_run_with_another_solver_skips_data_preparation(project):
    root, _ = project
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "after first repro"], root)
    proc = run(["dvc", "exp", "run", "-n", "broyden", "-S", "deq.solver=broyden"], root)
    ran = _ran(proc)
    assert "prepare" not in ran
    assert {f"tune@{e}" for e in EXPERIMENTS} <= ran
    best = json.loads((root / "out" / "tune" / "nice-digits" / "best.json").read_text())
    assert best["best"]["deq"]["config"]["spec"]["deq"]["solver"] == "broyden"
    from pipelines.tracking import Tracker

    runs = Tracker(f"sqlite:///{root}/out/mlflow.db").runs("nice-digits", "tags.stage = 'train'")
    names = {r.data.tags.get("dvc.exp_name") for r in runs}
    assert names == {None, "broyden"}, names  # the first repro's runs, and the experiment's by its name


def test_experiments_compare_in_dvc_exp_show_metrics_diff_and_plots_diff(project):
    """Metrics and plot tables are tracked by git (cache: false, not ignored): each revision and experiment
    keeps its own, so DVC's comparisons read both sides (before, every revision showed `!`)."""
    root, _ = project
    shown = json.loads(run(["dvc", "exp", "show", "--json"], root).stdout)
    flat = json.dumps(shown)
    assert "broyden" in flat
    for exp in EXPERIMENTS:
        assert f"results/experiments/{exp}/metrics.json" in flat
    rows = run(["dvc", "exp", "show", "--csv", "--no-pager"], root).stdout.splitlines()
    header = rows[0].split(",")
    col = header.index("results/experiments/nice-digits/metrics.json:deq.test_loglik_mean")
    values = [r.split(",")[col] for r in rows[1:]]
    assert len(values) >= 2 and all(v not in ("", "!", "-") for v in values), rows
    diff = json.loads(run(["dvc", "metrics", "diff", "HEAD", "broyden", "--json"], root).stdout)
    deq = diff["results/experiments/nice-digits/metrics.json"]["deq.test_loglik_mean"]
    assert isinstance(deq["old"], float) and isinstance(deq["new"], float)
    plots = json.loads(run(["dvc", "plots", "diff", "HEAD", "broyden", "--json"], root).stdout)
    assert not plots.get("errors"), plots.get("errors")
    name = "results/experiments/nice-digits/plots/train_loss.csv"
    data = plots["data"][name][0]
    values = data["content"]["data"]["values"]
    assert {v["rev"] for v in values} == {"HEAD", "broyden"} and {v["variant"] for v in values} == {"deq", "explicit-2"}
    assert all(v["train_loss"] not in ("", None) for v in values), "no blank (drawn as 0) in a plotted column"
    assert data["content"]["encoding"]["color"]["field"] == "variant"
    assert {v["seed"] for v in values} == {"0", "1"} and data["content"]["encoding"]["detail"]["field"] == "seed"
    assert data["content"]["encoding"]["y"]["title"].startswith("training loss")


def test_a_queued_experiment_runs_in_a_copy_and_logs_to_the_projects_store(project):
    """`dvc exp run --queue` + `dvc queue start` (and --temp, the same executor) run in a temporary copy: the
    committed .dvc/config has no relative site_cache_dir (it failed "unable to open database file"), and the
    relative tracking store resolves from DVC_ROOT, the project the run was queued from."""
    import time

    from pipelines.tracking import Tracker

    root, _ = project
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "before queue", "--allow-empty"], root)
    run(["dvc", "exp", "run", "--queue", "-n", "k3-queued", "-S", "deq.k=3"], root)
    run(["dvc", "queue", "start", "-j", "1"], root)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            status = run(["dvc", "queue", "status"], root).stdout
            if "k3-queued" in status and not any(s in status for s in ("Queued", "Running")):
                break
            time.sleep(5)
    finally:
        run(["dvc", "queue", "stop"], root, check=False)  # the worker we started
    assert "Success" in status, status + run(["dvc", "queue", "logs", "k3-queued"], root, check=False).stdout[-3000:]
    runs = Tracker(f"sqlite:///{root}/out/mlflow.db").runs("nice-digits", "tags.`dvc.exp_name` = 'k3-queued'")
    assert {r.data.tags.get("stage") for r in runs} >= {"tune", "train"}
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    shown = run(["dvc", "exp", "show", "--csv", "--no-pager"], root).stdout
    assert "k3-queued" in shown
