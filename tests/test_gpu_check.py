"""benchmarks/gpu_check.sh end to end on the CPU, as on a GPU check machine: with ray, mlflow and dvc made
unimportable, it runs the memory, solver and training benchmarks and ends with one JSON summary line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_without_the_orchestration_stack(tmp_path):
    blockers = tmp_path / "blockers"
    for name in ("ray", "mlflow", "dvc"):
        (blockers / name).mkdir(parents=True)
        (blockers / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not installed on the GPU check machines')\n")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "PYTHONPATH": str(blockers)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])["gpu_check"]
    assert set(summary) == {"memory_depth", "equal_accuracy", "solvers", "training"}
    accuracy = summary["equal_accuracy"]
    assert accuracy["mode"] == "accuracy" and accuracy["implicit_over_phantom_memory"] <= 2.0
    assert accuracy["implicit_over_phantom_equal_accuracy_time"] > 0 and accuracy["deq_implicit_memory_spread"] <= 0.03

    memory = summary["memory_depth"]
    assert memory["memory_kind"] == "autograd_saved_bytes" and memory["device"] == "cpu"
    assert memory["explicit16_over_deq_phantom_memory"] > 1 and memory["deq_phantom_memory_spread"] <= 0.03
    assert all(k.endswith("_over_picard_iters") for k in summary["solvers"]) and summary["solvers"]

    training = summary["training"]
    assert training["device"] == "cpu"
    for experiment in ("dkef-mixture", "nice-digits", "vae-digits", "ncsn-digits"):
        ratios = training[experiment]
        assert 0 < ratios["deq_over_explicit16_memory"] < 1, ratios
        assert ratios["deq_over_explicit16_step_time"] > 0 and ratios["deq_solver_nstep_mean"] >= 1

    rows = [json.loads(line) for line in (out / "train_check.jsonl").read_text().splitlines()]
    runs = [r for r in rows if "summary" not in r]
    assert {(r["experiment"], r["variant"]) for r in runs} == {
        (e, v) for e in ("dkef-mixture", "nice-digits", "vae-digits", "ncsn-digits") for v in ("deq", "explicit-16")}
    for r in runs:
        assert r["steps"] > 0 and r["peak_bytes"] > 0 and r["step_ms_median"] > 0 and r["final_loss"] is not None
    assert (out / "memory_depth.jsonl").stat().st_size > 0 and (out / "solvers.jsonl").stat().st_size > 0
