"""The report stage on a small, fake results tree (the formats the evaluate / train / tune stages write),
with a real trained DEQ model measured by the real fidelity stage, the real bench stage, and a real MLflow
SQLite store: tables hold the numbers, missing metrics read "—", figures are PNGs, conclusions come from the
numbers, artifacts are logged, and missing inputs fail with errors that name the file and the stage to run."""
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from deqsm.data import load_splits, prepare_datasets
from deqsm.experiments import VariantSpec, train_model
from deqsm.train import TrainSettings
from pipelines import bench, fidelity, report
from pipelines.artifacts import Artifacts, save_model
from pipelines.reporting import depth, inputs, tables
from pipelines.seeds import aggregate
from pipelines.settings import load_params

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

METRICS = {
    "deq": {"test_loglik": -2.3456, "test_loglik_se": 0.0123, "test_loglik_sample_se": 0.05, "test_ssm_loss": -0.4321,
            "test_sm_loss": -0.4, "test_loss": -0.43, "fisher_divergence": 0.071, "params": 624.0,
            "peak_bytes": 1_780_088.0, "memory_kind": "autograd_saved_bytes", "step_ms_median": 12.34,
            "solver_nstep_mean": 7.5, "solver_residual_max": 8.6e-6, "train_steps": 3.0, "train_best_val_loss": -0.45,
            "test_is_ess": 850.0},
    "explicit-2": {"test_loglik": -2.5, "test_loglik_se": 0.011, "test_ssm_loss": -0.3, "test_sm_loss": -0.31,
                   "test_loss": -0.3, "fisher_divergence": 0.09, "params": 720.0, "peak_bytes": 2_500_000.0,
                   "memory_kind": "autograd_saved_bytes", "step_ms_median": 9.87, "train_steps": 3.0,
                   "train_best_val_loss": -0.33, "test_is_ess": 900.0},
    # gaps: no standard error, a null bits/dim, no solver stats (explicit), no Fisher divergence
    "explicit-4": {"test_loglik": -2.4, "test_bpd": None, "test_ssm_loss": -0.35, "params": 1000.0,
                   "peak_bytes": 4_000_000.0, "memory_kind": "autograd_saved_bytes", "step_ms_median": None,
                   "train_steps": 3.0},
}
# explicit-8 is in params.yaml but has no metrics (its tuning failed)
BENCH_ROWS = ([{"variant": f"explicit-{d}", "solver_iters": None, "peak_bytes": 1000 * d, "memory_kind": "autograd_saved_bytes",
                "step_ms": 1.0 * d, "device": "cpu"} for d in (1, 2, 4, 8, 16, 32)]
              + [{"variant": f"deq-{b}", "solver_iters": it, "peak_bytes": peak * (it if b == "unroll" else 1),
                  "memory_kind": "autograd_saved_bytes", "step_ms": 0.5 * it, "device": "cpu"}
                 for b, peak in (("phantom", 2500), ("implicit", 3500), ("unroll", 1000)) for it in (5, 10)])


def write_curve(path: Path, deq: bool) -> None:
    cols = ["step", "train_loss", "step_ms", "val_loss"] + (["solver_nstep", "solver_abs_residual_max"] if deq else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for step in (1, 2, 3):
            row = {"step": step, "train_loss": -0.1 * step, "step_ms": 10.0}
            if deq:
                row.update(solver_nstep=8 - step, solver_abs_residual_max=10.0 ** (-4 - step))
            w.writerow(row)
        w.writerow({"step": 3, "val_loss": -0.35})  # an evaluation row: the other columns blank


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    params = {
        "base": {"seed": 0, "out": "out", "results": "results"},
        "data": {"root": "data/prepared", "datasets": {"gaussian": {"dim": 2, "n_train": 200, "n_val": 50, "n_test": 60}}},
        "deq": {"max_iter": 40, "tol": 1e-5},
        "train": {"steps": 3},
        "experiments": {"toy": {
            "dataset": "gaussian", "model": "dkef", "width": 8, "model_options": {"n_inducing": 5},
            "loss": {"name": "ssm"},
            "variants": {"deq": {"variant": "deq"}, "explicit-2": {"variant": "explicit", "depth": 2},
                         "explicit-4": {"variant": "explicit", "depth": 4},
                         "explicit-8": {"variant": "explicit", "depth": 8}}}},
        "fidelity": {"rows": 40},
        "tracking": {"uri": "sqlite:///mlflow.db"},  # relative: from the params file's folder
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    settings = load_params(root / "params.yaml")
    prepare_datasets(settings.data, base=root)
    splits = load_splits(root / "data/prepared", "gaussian")
    spec = VariantSpec(name="toy/deq", model="dkef", variant="deq", width=8, model_options={"n_inducing": 5},
                          loss={"name": "ssm"}, deq=settings.deq)
    model, fit = train_model(spec, splits, TrainSettings(steps=3, batch_size=32, eval_every=3, progress=False))
    save_model(Artifacts.of(settings).model("toy", "deq", 0), model, spec=spec.model_dump(), train={},
               fit=fit.summary(), history=fit.history, mlflow_run_id="none")
    results = root / "results/experiments/toy"
    results.mkdir(parents=True)
    (results / "metrics.json").write_text(json.dumps({v: aggregate({0: m}) for v, m in METRICS.items()}))
    (results / "seeds.json").write_text(json.dumps({v: {"0": m} for v, m in METRICS.items()}))
    for variant in METRICS:
        write_curve(results / "curves" / variant / "seed0.csv", deq=variant == "deq")
    (root / "out/tune/toy").mkdir(parents=True)
    (root / "out/tune/toy/best.json").write_text(json.dumps(
        {"trials": 5, "failed": {"explicit-8": ["TrainingError: non-finite loss"]},
         "best": {"deq": {"sample": {"train.lr": 0.001}, "metrics": {"val_loss": -0.45}}}}))
    (root / "results/benchmarks").mkdir(parents=True)
    (root / "results/benchmarks/memory_depth.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in BENCH_ROWS) + json.dumps({"summary": {}}) + "\n")
    return root, settings


@pytest.fixture(scope="module")
def built(tree):
    """The fidelity and report stages as DVC runs them: the CLI, paths relative to the params file's folder."""
    root, settings = tree
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)  # MLflow's default artifact root (./mlruns) lands in the tree
            fidelity.main(["--params", str(root / "params.yaml"), "--experiment", "toy"])
            report.main(["--params", str(root / "params.yaml")])
    finally:
        torch.set_num_threads(threads)  # the stage applies base.threads
    return root, settings


def test_tables_hold_the_numbers_and_dashes_for_missing_metrics(built):
    root, _ = built
    md = (root / "results/tables/toy.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in lines[1:]}
    deq = rows["deq (DEQ)"]
    assert "-2.346 ± 0.012" in deq and f"{1_780_088 / 2**20:.3f}" in deq and "12.3" in deq and "624" in deq
    assert "7.5" in deq and "1.00e-07" in deq and "-0.4321" in deq  # solver steps, final residual, test SSM
    ex4 = rows["explicit-4 (depth 4)"]
    assert "-2.400" in ex4  # no standard error: the value alone
    col = {name: i for i, name in enumerate(header)}
    assert all(ex4[col[c]] == tables.DASH for c in ("ms/step", "solver steps", "IS effective samples"))
    assert "bits/dim" not in header  # no variant has one (explicit-4's is null)
    assert deq[col["IS effective samples"]] == "850"
    assert all(c == tables.DASH for c in rows["explicit-8 (depth 8)"][2:])
    assert "autograd_saved_bytes" in md and "No metrics for explicit-8" in md
    with open(root / "results/tables/toy.csv") as f:
        csv_rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert list(csv_rows) == ["deq", "explicit-2", "explicit-4", "explicit-8"]
    assert float(csv_rows["deq"]["test_loglik"]) == -2.3456 and float(csv_rows["deq"]["test_loglik_se"]) == 0.0123
    assert csv_rows["explicit-4"]["test_bpd"] == "" and csv_rows["explicit-8"]["status"] == "no metrics"
    assert csv_rows["deq"]["loss"] == "ssm" and csv_rows["explicit-2"]["depth"] == "2"


def test_figures_and_plot_data_exist(built):
    root, _ = built
    names = ["memory_depth.png", "memory_iters.png", "training_toy.png", "residual_toy.png", "fidelity.png"]
    for name in names:
        data = (root / "results/figures" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    with open(root / "results/plots/memory_depth.csv") as f:
        mem = list(csv.DictReader(f))
    assert [float(r["depth"]) for r in mem] == [1, 2, 4, 8, 16, 32]
    assert {float(r["deq_phantom_bytes"]) for r in mem} == {2500.0} and float(mem[-1]["explicit_bytes"]) == 32000
    with open(root / "results/plots/toy_train_loss.csv") as f:
        header = next(csv.reader(f))
    assert header == ["step", "deq", "explicit-2", "explicit-4"]
    for name in ("memory_iters.csv", "toy_val_loss.csv", "toy_residual.csv", "fidelity_cosine.csv", "memory_depth.jsonl"):
        assert (root / "results/plots" / name).stat().st_size > 0


def test_fidelity_compares_phantom_with_the_exact_gradient(built):
    root, _ = built
    fid = {"toy": json.loads((root / "results/experiments/toy/fidelity.json").read_text())}
    assert list(fid["toy"]) == ["deq"]  # explicit variants have no DEQ layer
    res = fid["toy"]["deq"]["results"]
    assert [r["k"] for r in res] == [1, 2, 4, 8] and fid["toy"]["deq"]["rows"] == 40
    assert all(-1 - 1e-6 <= r["grad_cosine"] <= 1 + 1e-6 and r["grad_rel_error"] >= 0 for r in res)
    assert all(r["score_rel_error"] >= 0 for r in res)
    assert res[-1]["grad_rel_error"] < res[0]["grad_rel_error"]  # more phantom steps: closer to exact
    table = (root / "results/tables/fidelity.md").read_text()
    assert f"{res[0]['grad_cosine']:.5f}" in table


def test_report_conclusions_come_from_the_numbers(built):
    root, _ = built
    text = (root / "results/REPORT.md").read_text()
    for section in ("## What to conclude", "## Caveats", "## toy", "## Memory vs depth", "## Phantom vs exact"):
        assert section in text
    # DEQ 1.78 MB vs the deepest explicit with metrics (explicit-4, 4.0 MB): 44.5%
    assert f"{100 * 1_780_088 / 4_000_000:.1f}% of the memory of the deepest explicit variant with metrics `explicit-4`" in text
    # -2.3456 vs -2.5 with se 0.0123, 0.011: beats; vs explicit-4 (no se): no verdict
    assert "`deq` beats `explicit-2` in test log-likelihood" in text
    assert "`deq`'s test log-likelihood is above `explicit-4`'s" in text and "no standard error" in text
    # benchmark: phantom 2500 B of explicit-32's 32000 B, the memory of depth 2.5
    assert f"{100 * 2500 / 32000:.1f}% of the explicit depth-32" in text and "depth ≈ 2.5" in text
    assert "unroll` backward: its memory grows" in text
    assert "TrainingError" in text and "explicit-8: 1" in text  # failed trials from best.json
    assert "](figures/training_toy.png)" in text and "](tables/toy.csv)" in text


def test_artifacts_are_logged_to_a_report_run(built):
    root, settings = built
    from pipelines.tracking import Tracker

    tracker = Tracker(settings.tracking_uri())
    assert settings.tracking_uri() == f"sqlite:///{root / 'mlflow.db'}"
    runs = tracker.runs("toy", "tags.stage = 'report'")
    assert len(runs) == 1 and runs[0].info.run_name == "report" and runs[0].info.status == "FINISHED"
    top = {a.path for a in tracker.client.list_artifacts(runs[0].info.run_id)}
    assert {"REPORT.md", "figures", "tables", "experiments"} <= top
    own = {a.path for a in tracker.client.list_artifacts(runs[0].info.run_id, "experiments/toy")}
    assert "experiments/toy/fidelity.json" in own  # the fidelity stage's file, as the report read it
    figs = {a.path for a in tracker.client.list_artifacts(runs[0].info.run_id, "figures")}
    assert {"figures/memory_depth.png", "figures/training_toy.png", "figures/fidelity.png"} <= figs
    metrics = runs[0].data.metrics
    assert abs(metrics["deq_over_explicit-4_memory"] - 1_780_088 / 4_000_000) < 1e-9
    assert "deq_fidelity_k1_grad_cosine" in metrics


def test_missing_metrics_name_the_file_and_the_stage(tree, tmp_path):
    root, _ = tree
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["experiments"]["other"] = params["experiments"]["toy"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    # the subprocess runs the CLI with main_guard: one line on stderr and exit status 2, before any work
    done = subprocess.run([sys.executable, "-m", "pipelines.report", "--params", str(tmp_path / "params.yaml"),
                           "--root", str(root)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "results/experiments/other/metrics.json is missing" in done.stderr and "dvc repro evaluate@other" in done.stderr
    assert not (root / "results/experiments/other").exists()


def test_missing_curve_and_fidelity_name_their_stages(tree, tmp_path):
    root, settings = tree
    artifacts = Artifacts.of(settings, tmp_path)
    (tmp_path / "results/experiments/toy/curves").mkdir(parents=True)
    (tmp_path / "results/experiments/toy/metrics.json").write_text(json.dumps({"deq": METRICS["deq"]}))
    with pytest.raises(inputs.ReportError, match=r"variant\(s\) deq have no 'seeds' list.*evaluate@toy"):
        inputs.read_experiment(artifacts, settings, "toy")
    (tmp_path / "results/experiments/toy/metrics.json").write_text(json.dumps({"deq": aggregate({0: METRICS["deq"]})}))
    with pytest.raises(inputs.ReportError, match=r"curves/deq/seed0.csv is missing.*seed 0.*dvc repro train@toy"):
        inputs.read_experiment(artifacts, settings, "toy")
    write_curve(tmp_path / "results/experiments/toy/curves/deq/seed0.csv", deq=True)
    with pytest.raises(inputs.ReportError, match=r"toy/fidelity.json is missing.*dvc repro fidelity@toy"):
        inputs.read_experiment(artifacts, settings, "toy")
    (tmp_path / "results/experiments/toy/fidelity.json").write_text("{not json")
    with pytest.raises(inputs.ReportError, match=r"fidelity.json is not valid JSON.*dvc repro fidelity@toy"):
        inputs.read_experiment(artifacts, settings, "toy")


def test_fidelity_stage_skips_a_deq_without_a_model(tree, tmp_path, capsys):
    """A DEQ variant whose tuning failed has no model: the stage says so and measures the others."""
    root, settings = tree
    params = yaml.safe_load((root / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data").symlink_to(root / "data")
    fidelity.main(["--params", str(tmp_path / "params.yaml"), "--experiment", "toy"])
    assert json.loads((tmp_path / "results/experiments/toy/fidelity.json").read_text()) == {}
    assert "no trained model for DEQ variant(s) ['deq']" in capsys.readouterr().out


def test_mlflow_failure_is_an_error(tree, tmp_path, monkeypatch):
    root, settings = tree
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a folder")
    bad = settings.model_copy(update={"tracking": settings.tracking.model_copy(
        update={"uri": f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}"})})
    artifacts = Artifacts.of(bad, root)
    data = inputs.read_experiment(artifacts, bad, "toy")
    (tmp_path / "x.md").write_text("x")
    with pytest.raises(inputs.ReportError, match="MLflow"):
        report.log_to_mlflow(artifacts, bad, [data], {}, [tmp_path / "x.md"], {}, {}, {})


def test_curves_from_the_train_stage_format(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("step,solver.nets.0.deq_abs_residual_max,solver.nets.0.deq_nstep,solver.nets.1.deq_abs_residual_max,"
                    "solver.nets.1.deq_nstep,train_loss,val_loss\n1,1e-6,4,3e-6,6,0.5,\n2,,,,,,0.4\n")
    curve = inputs.Curve.read(path)
    assert curve.loss_key == "train_loss"
    assert curve.residuals() == ([1.0], [3e-6]) and curve.nsteps() == ([1.0], [5.0])
    assert curve.series("val_loss") == ([2.0], [0.4])


@pytest.mark.slow
def test_bench_stage_writes_the_memory_benchmark_rows(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"bench": {"iters": [5, 10]}}))
    bench.main(["--params", str(tmp_path / "params.yaml")])
    rows = inputs.read_memory_bench(tmp_path / "results/benchmarks/memory_depth.jsonl")
    assert [d for d, _ in rows.explicit()] == [1, 2, 4, 8, 16, 32]
    deq = rows.deq()
    assert set(deq) == {"phantom", "implicit", "unroll"}
    phantom = [r["peak_bytes"] for r in deq["phantom"]]
    assert max(phantom) == min(phantom) < rows.explicit()[-1][1]["peak_bytes"]
    assert [r["solver_iters"] for r in deq["unroll"]] == [5, 10]


def test_bench_stage_names_a_bad_benchmark_output(tmp_path):
    from pipelines.artifacts import memory_bench_rows

    with pytest.raises(ValueError, match="out.jsonl, line 2: not JSON"):
        memory_bench_rows(['{"variant": "deq-phantom", "peak_bytes": 1}', "{oops"], "out.jsonl")
    with pytest.raises(ValueError, match="line 1: a benchmark row needs 'variant' and 'peak_bytes'"):
        memory_bench_rows(['{"variant": "x"}'], "out.jsonl")


def test_solver_stats_fall_back_to_the_curve(tree, tmp_path):
    _, settings = tree
    path = tmp_path / "deq.csv"
    write_curve(path, deq=True)  # solver steps 7, 6, 5; residuals 1e-5, 1e-6, 1e-7
    metrics = {k: v for k, v in METRICS["deq"].items() if not k.startswith("solver")}
    data = inputs.ExperimentData("toy", settings.experiments["toy"], {"deq": inputs.seed_view(aggregate({0: metrics}))},
                                 {"deq": {0: inputs.Curve.read(path)}}, None)
    row = next(r for r in tables.table_rows(data) if r["variant"] == "deq")
    assert row["solver_nstep_mean"] == 6.0 and row["solver_residual_max"] == pytest.approx(1e-5)
    assert row["solver_final_residual"] == pytest.approx(1e-7) and row["solver_source"] == "curve"
    assert "averaged over the training curve's logged steps" in tables.experiment_table_md(data, tables.table_rows(data))


def test_out_dir_keeps_the_report_apart_from_its_inputs(built, tmp_path, monkeypatch):
    root, settings = built
    monkeypatch.chdir(tmp_path)
    other = settings.model_copy(update={"tracking": settings.tracking.model_copy(
        update={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})})
    out = report.run_report(other, root / "params.yaml", root, out_dir=Path("report"))
    assert out["report"] == root / "report" / "REPORT.md"
    for name in ("tables/toy.md", "tables/fidelity.csv", "figures/training_toy.png", "plots/memory_depth.csv"):
        assert (root / "report" / name).stat().st_size > 0, name
    text = out["report"].read_text()
    assert "`../results/experiments/toy/metrics.json`" in text and "](figures/training_toy.png)" in text


def test_files_of_a_dropped_experiment_are_pruned(built, tmp_path, monkeypatch):
    """The report's folders are DVC `persist` outs (DVC no longer clears them): what an earlier report wrote for
    an experiment now gone from params.yaml is removed; what this run wrote stays."""
    root, settings = built
    monkeypatch.chdir(tmp_path)
    other = settings.model_copy(update={"tracking": settings.tracking.model_copy(
        update={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})})
    stale = [root / "pruned" / rel for rel in ("tables/gone.md", "figures/training_gone.png", "plots/gone_val_loss.csv")]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("from an earlier run")
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    report.run_report(other, root / "params.yaml", root, out_dir=Path("pruned"))
    assert not any(p.exists() for p in stale)
    for name in ("tables/toy.md", "figures/training_toy.png", "plots/memory_depth.csv"):
        assert (root / "pruned" / name).stat().st_size > 0, name


DEPTH_SEEDS = {  # per seed: test_loglik and the evaluate stage's effective-depth metrics of a DEQ
    "deq": {0: {"test_loglik": -2.30, "deq_contraction": 0.12, "deq_weight_norm": 0.90, "deq_iterations": 6.0,
                "deq_depth_gain": 0.02, "deq_grad_cosine": 0.99},
            1: {"test_loglik": -2.40, "deq_contraction": 0.18, "deq_weight_norm": 0.95, "deq_iterations": 8.0,
                "deq_depth_gain": 0.04, "deq_grad_cosine": 0.97}},
    "deq-deep": {0: {"test_loglik": -2.20, "deq_contraction": 0.80, "deq_weight_norm": 1.10, "deq_iterations": 20.0,
                     "deq_depth_gain": 0.40, "deq_grad_cosine": 0.90}},
}


def report_of_seeds(built, per_seed: dict, tmp_path, monkeypatch):
    """The built project's results copied to ``tmp_path`` with toy's metrics.json, seeds.json and curves made from
    ``per_seed`` (variant → seed → metrics), then the report on them: (its settings, run_report's output)."""
    root, settings = built
    shutil.copytree(root / "results", tmp_path / "results")
    exp = tmp_path / "results/experiments/toy"
    (exp / "metrics.json").write_text(json.dumps({v: aggregate(by_seed) for v, by_seed in per_seed.items()}))
    (exp / "seeds.json").write_text(json.dumps({v: {str(s): m for s, m in by_seed.items()}
                                                for v, by_seed in per_seed.items()}))
    for variant, by_seed in per_seed.items():
        for seed in by_seed:
            write_curve(exp / "curves" / variant / f"seed{seed}.csv", deq=variant.startswith("deq"))
    monkeypatch.chdir(tmp_path)
    other = settings.model_copy(update={"tracking": settings.tracking.model_copy(
        update={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})})
    return other, report.run_report(other, root / "params.yaml", tmp_path)


def test_effective_depth_table_and_figure(built, tmp_path, monkeypatch):
    """metrics.json with the deq_* keys (two seeds of `deq`, one of a variant not in params.yaml) and plain
    explicit variants: a depth table of the DEQs only, the verdicts, a CSV and the figure."""
    root, settings = built
    per_seed = {v: {s: {**METRICS["deq"], **m} for s, m in by_seed.items()} for v, by_seed in DEPTH_SEEDS.items()}
    per_seed["explicit-2"] = {0: METRICS["explicit-2"], 1: {**METRICS["explicit-2"], "test_loglik": -2.6}}
    per_seed["explicit-4"] = {0: METRICS["explicit-4"]}
    other, out = report_of_seeds(built, per_seed, tmp_path, monkeypatch)

    text = out["report"].read_text()
    section = text[text.index("### Effective depth"):text.index("### Convergence")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in section.splitlines() if line.startswith("| ") and not line.startswith("| variant")}
    assert list(rows) == ["deq", "deq-deep"]  # explicit variants have no row
    # means over the two seeds ± the standard error across them (stdev / √2)
    assert rows["deq"] == ["0.150 ± 0.030", "0.925 ± 0.025", "7.0 ± 1.0", "0.030 ± 0.010", "0.9800 ± 0.0100"]
    assert rows["deq-deep"] == ["0.800", "1.100", "20.0", "0.400", "0.9000"]  # one seed: no se
    assert ("`deq` is close to a one-layer network (contraction 0.150, its fixed point within 3.0% of one cell"
            in section)
    assert "`deq-deep` is deeper than one layer (contraction 0.800, its fixed point 40.0% from one cell" in section
    assert "Depth gain: ‖z* − f(z₀, x)‖ / ‖z*‖" in section
    assert "![quality against contraction](figures/depth_toy.png)" in section
    assert text.index("### Effective depth") > text.index("| deq (DEQ)")  # below the experiment's main table
    png = (tmp_path / "results/figures/depth_toy.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    with open(tmp_path / "results/tables/toy_depth.csv") as f:
        csv_rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert list(csv_rows) == ["deq", "deq-deep"]
    assert float(csv_rows["deq"]["deq_contraction"]) == pytest.approx(0.15)
    assert float(csv_rows["deq"]["deq_contraction_se"]) == pytest.approx(0.03)
    assert csv_rows["deq-deep"]["deq_depth_gain_se"] == "" and csv_rows["deq-deep"]["n_seeds"] == "1"
    data = inputs.read_experiment(Artifacts.of(other, tmp_path), other, "toy")
    assert sorted(depth.seed_points(data, "deq", "test_loglik")) == [(0.12, -2.3), (0.18, -2.4)]


def test_results_without_depth_metrics_have_no_depth_table(built):
    root, _ = built
    text = (root / "results/REPORT.md").read_text()
    assert "## toy" in text and "Effective depth" not in text and "quality against contraction" not in text
    assert not (root / "results/figures/depth_toy.png").exists()
    assert not (root / "results/tables/toy_depth.csv").exists()
    data = inputs.read_experiment(Artifacts.of(load_params(root / "params.yaml"), root),
                                  load_params(root / "params.yaml"), "toy")
    assert depth.depth_rows(data) == [] and depth.depth_table_md([]) == ""


def test_a_degenerate_variant_is_named_in_the_convergence_table_and_the_caveats(built, tmp_path, monkeypatch):
    """A seed whose loss fell below the data's floor (its training summary's loss_degenerate, deqsm.floor) makes
    its variant's convergence verdict "degenerate" and adds a caveat naming it; the others are watched and clean."""
    per_seed = {v: {0: {**m, "loss_degenerate": 0.0}, 1: {**m, "loss_degenerate": float(v == "deq")}}
                for v, m in METRICS.items()}
    text = report_of_seeds(built, per_seed, tmp_path, monkeypatch)[1]["report"].read_text()
    table = text[text.index("### Convergence"):]
    table = table[:table.index("\n#", 5)]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and not line.startswith("| variant")}
    assert rows["deq"][0] == "degenerate" and rows["deq"][-1] == "1/2"
    assert all(r[0] != "degenerate" and r[-1] == "0/2" for v, r in rows.items() if v != "deq"), rows
    assert "`toy`: degenerate score matching — `deq` in 1/2 seeds" in text


def _trial(variant, lr, loss, mib, deq=None, contraction=None, degenerate=False):
    row = {"variant": variant, "sample": {"train.lr": lr, **({"deq": deq} if deq else {})}, "val_loss": loss,
           "step": 100, "stopped_early": False, "degenerate": degenerate, "peak_bytes": mib * 2 ** 20}
    if contraction is not None:
        row.update(best_deq_contraction=contraction, best_deq_iterations=4 + 20 * contraction,
                   best_deq_depth_gain=contraction / 2)
    return row


def test_the_depth_study_names_the_configuration_selected_on_validation_and_why(built, tmp_path, monkeypatch):
    """best.json of a search over deq bundles: the "Depth study" table (a row per configuration: its best
    non-degenerate trial; a row per explicit baseline), the sentence that names the selected configuration,
    whether depth paid and the memory against the best explicit one, the CSV, the figure and the conclusion."""
    from pipelines.reporting.study import pareto

    shallow = {"norm": "frobenius", "lam": 2.0, "backward": "phantom", "k": 2}
    mid = {"norm": "spectral", "lam": 1.05, "backward": "phantom", "k": 8}
    deep = {"norm": "spectral", "lam": 1.01, "gain": "learned", "backward": "implicit", "k": 2}
    results = [_trial("deq", 1e-3, -1.4, 0.5, shallow, 0.15), _trial("deq", 3e-3, -1.5, 0.5, shallow, 0.16),
               _trial("deq", 1e-3, -6.8, 0.6, mid, 0.85), _trial("deq", 3e-3, -6.0, 0.6, mid, 0.87),
               _trial("deq", 1e-3, -90.0, 0.6, deep, 0.99, degenerate=True),
               _trial("deq", 3e-3, -5.0, 0.6, deep, 0.95),
               _trial("explicit-2", 1e-3, -3.0, 0.8), _trial("explicit-8", 1e-3, -6.5, 2.4),
               _trial("explicit-8", 3e-3, -6.1, 2.4)]
    (tmp_path / "out/tune/toy").mkdir(parents=True)
    best = {"deq": {"sample": {"train.lr": 1e-3, "deq": mid}, "metrics": {"val_loss": -6.8}}}
    (tmp_path / "out/tune/toy/best.json").write_text(json.dumps({"trials": 9, "failed": {}, "results": results,
                                                                "best": best}))
    other, out = report_of_seeds(built, {v: {0: m} for v, m in METRICS.items()}, tmp_path, monkeypatch)

    text = out["report"].read_text()
    section = text[text.index("### Depth study (validation)"):text.index("### Convergence")]
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in section.splitlines() if line.startswith("| ") and not line.startswith("| variant")}
    assert list(rows) == ["norm=frobenius lam=2 backward=phantom k=2",  # shallow to deep: by contraction
                          "norm=spectral lam=1.05 backward=phantom k=8 **(selected)**",
                          "norm=spectral lam=1.01 gain=learned backward=implicit", "depth 2", "depth 8"]  # no K

    deep_row = rows["norm=spectral lam=1.01 gain=learned backward=implicit"]
    assert deep_row[2] == "-5" and deep_row[4] == "0.950" and deep_row[-1] == "2 (1 degenerate)"  # -90: not kept
    assert rows["depth 8"][:3] == ["explicit-8", "depth 8", "-6.5"] and rows["depth 8"][7] == "2.40"
    assert ("Selected on validation: `deq` with norm=spectral lam=1.05 backward=phantom k=8 (val_loss -6.8, the "
            "lowest of 3 configurations; contraction 0.850") in section
    assert "(norm=frobenius lam=2 backward=phantom k=2, contraction 0.160) reached -1.5: depth paid" in section
    assert "`explicit-8`, reached -6.5: the selected DEQ is better at 0.25x its memory" in section
    assert "1 DEQ trial(s) fell below the data's score-matching floor" in section
    assert "![depth study](figures/study_toy.png)" in section
    assert "`toy` depth study: Selected on validation" in text[:text.index("## Caveats")]
    png = (tmp_path / "results/figures/study_toy.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    with open(tmp_path / "results/tables/toy_study.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["selected"] for r in csv_rows] == ["False", "True", "False", "False", "False"]
    assert float(csv_rows[1]["peak_mib"]) == pytest.approx(0.6)
    # the Pareto front over (memory, loss): only points no other beats on both
    assert pareto([(0.5, -1.5), (0.6, -6.8), (0.8, -3.0), (2.4, -6.5), (0.6, -5.0)], "min") == [(0.5, -1.5),
                                                                                               (0.6, -6.8)]


def test_a_search_over_the_learning_rate_alone_has_no_depth_study(built):
    root, _ = built
    assert "Depth study" not in (root / "results/REPORT.md").read_text()
    assert not (root / "results/figures/study_toy.png").exists()
