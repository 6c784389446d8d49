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
