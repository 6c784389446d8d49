"""Memory of an SSM training step: ratios that hold on any machine."""
import pytest
import torch

from deqsm.losses import get_loss
from deqsm.metrics.memory import SavedTensorCounter, measure_step
from deqsm.models.energy_mlp import DEQEnergyMLP, ExplicitEnergyMLP


def ssm_step_bytes(model, x):
    _, mem = measure_step(lambda: get_loss("ssm", generator=torch.Generator().manual_seed(0))(model, x).loss,
                          list(model.parameters()))
    assert mem.memory_kind == "autograd_saved_bytes" and mem.peak_bytes == mem.autograd_saved_bytes
    assert mem.process_peak_rss_bytes > 0 and mem.step_seconds > 0
    return mem.autograd_saved_bytes


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(32, 20)


def test_explicit_memory_grows_with_depth(x):
    shallow = ssm_step_bytes(ExplicitEnergyMLP(20, 64, 2), x)
    deep = ssm_step_bytes(ExplicitEnergyMLP(20, 64, 8), x)
    assert deep > 3 * shallow


@pytest.mark.parametrize("backward", ["phantom", "implicit"])
def test_deq_memory_flat_in_solver_iterations(x, backward):
    counts = []
    for iters in (10, 100):
        torch.manual_seed(1)
        # tol below reach: the solver runs exactly max_iter iterations
        model = DEQEnergyMLP(20, 64, solver="picard", backward=backward, tol=1e-30, max_iter=iters)
        counts.append(ssm_step_bytes(model, x))
        assert model.deq.last_stats.nstep == iters
    assert abs(counts[1] - counts[0]) <= 0.03 * counts[0], counts


def test_unroll_memory_grows_with_iterations(x):
    counts = [ssm_step_bytes(DEQEnergyMLP(20, 64, solver="picard", backward="unroll", tol=1e-30, max_iter=n), x)
              for n in (10, 100)]
    assert counts[1] > 5 * counts[0]


def test_counter_ignores_freed_graphs_and_parameters():
    w = torch.nn.Parameter(torch.randn(100, 100))
    with SavedTensorCounter(exclude=[w]) as c:
        a = torch.randn(10, 100)
        for _ in range(5):  # graphs built and dropped: nothing held
            (a @ w).tanh().sum()
        assert c.bytes == 0
        keep = (a @ w).tanh()  # tanh saves its 10×100 float32 output; mm saves a (w is excluded)
        assert c.bytes == 2 * 10 * 100 * 4
    assert keep.requires_grad


def test_the_equal_accuracy_benchmark_measures_exact_against_phantom(capsys):
    """``benchmarks/memory_depth.py --mode accuracy`` at a small size: the cell is deep (contraction measured ≥ 0.8),
    the exact mode reaches the target error, the phantom K it is compared with is the smallest that does, and the
    memory ratios that hold on any machine: the exact step's memory ≤ 2× phantom K = 2's and flat in iterations.
    (Time ratios are machine-dependent: the benchmark reports them, the test only checks they are there.)"""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import memory_depth

    rows = memory_depth.main(["--mode", "accuracy", "--device", "cpu", "--in-dim", "8", "--width", "32",
                              "--batch", "16", "--repeats", "1", "--ks", "2", "8", "16", "32", "48"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"]
    assert summary["contraction"] >= 0.8
    assert summary["implicit_grad_rel_error"] <= summary["target_grad_rel_error"]
    k = summary["phantom_k_equal_accuracy"]
    errors = {r["k"]: r["grad_rel_error"] for r in rows if r["variant"].startswith("deq-phantom-")}
    assert errors[k] <= 1e-4 and all(errors[j] > 1e-4 for j in errors if j < k), errors
    assert summary["implicit_over_phantom_equal_accuracy_time"] > 0
    assert summary["implicit_over_phantom_memory"] <= 2.0
    assert summary["deq_implicit_memory_spread"] <= 0.03
