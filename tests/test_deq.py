"""The DEQ layer's backward modes against a fully converged unroll (float64), to second order."""
import pytest
import torch
from torch import nn

from deqsm.deq import BACKWARDS, DEQ, NormalizedLinear, SoftplusCell, frobenius_normalize, spectral_normalize
from deqsm.losses import get_loss
from deqsm.registry import UnknownNameError

D, B = 5, 4


class TanhCell(nn.Module):
    """f(z, x) = tanh(Ŵ z + U x + b): a small contractive cell with parameters in and out of the loop."""

    def __init__(self, d: int, lam: float = 1.6) -> None:
        super().__init__()
        self.w = NormalizedLinear(d, lam=lam)
        self.u = nn.Linear(d, d)

    def forward(self, z, x):
        return torch.tanh(self.w(z) + self.u(x))


def make(cell, backward, **kw):
    opts = dict(solver="anderson", tol=1e-13, max_iter=400)
    opts.update(kw)
    return DEQ(cell, backward=backward, **opts)


def energy(deq, x):
    z = deq(x, torch.zeros(x.shape[0], D))
    return 0.5 * (z**2).sum(1) + (z * x).sum(1)


def derivatives(deq, x, v):
    """Energy, score, Hessian-vector product and the parameter gradient of an SSM-like loss."""
    x = x.detach().requires_grad_(True)
    e = energy(deq, x)
    s = torch.autograd.grad(e.sum(), x, create_graph=True)[0]
    hv = torch.autograd.grad((s * v).sum(), x, create_graph=True)[0]
    loss = (hv * v).sum() + 0.5 * ((s * v).sum(1) ** 2).sum()
    grads = torch.autograd.grad(loss, [p for p in deq.parameters()])
    return e, s, hv, torch.cat([g.flatten() for g in grads])


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.fixture
def setup(float64):
    torch.manual_seed(0)
    return TanhCell(D), torch.randn(B, D), torch.randn(B, D)


def test_implicit_matches_converged_unroll_to_second_order(setup):
    cell, x, v = setup
    ref = derivatives(make(cell, "unroll"), x, v)
    got = derivatives(make(cell, "implicit"), x, v)
    for name, a, b in zip(["energy", "score", "hvp", "param grad"], got, ref):
        assert rel(a, b) <= 1e-6, name


def test_implicit_gradcheck_and_gradgradcheck(setup):
    cell, _, _ = setup
    deq = make(cell, "implicit")
    x = torch.randn(2, D, requires_grad=True)
    # gradcheck perturbs its inputs in place: passing the cell's weight checks the parameter path too.
    f = lambda x_, w_: deq(x_, torch.zeros(2, D))  # noqa: E731
    inputs = (x, cell.w.weight)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_phantom_error_shrinks_with_k(setup):
    cell, x, v = setup
    exact = derivatives(make(cell, "implicit"), x, v)[3]
    errors = [rel(derivatives(make(cell, "phantom", k=k), x, v)[3], exact) for k in (1, 2, 4, 8)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.1 * errors[0]


def test_ssm_loss_implicit_equals_unroll(float64):
    torch.manual_seed(1)
    cell = SoftplusCell(6, lam=1.5)
    inject = nn.Linear(3, 6)
    x = torch.randn(8, 3)

    def energy_fn(deq):
        return lambda x_: deq(inject(x_), torch.zeros(x_.shape[0], 6)).sum(1)

    losses = {}
    for mode in ("implicit", "unroll"):
        deq = make(cell, mode)
        gen = torch.Generator().manual_seed(3)
        out = get_loss("ssm", generator=gen)(energy_fn(deq), x)
        grads = torch.autograd.grad(out.loss, list(cell.parameters()) + list(inject.parameters()))
        losses[mode] = (out.loss, torch.cat([g.flatten() for g in grads]))
    assert rel(losses["implicit"][0], losses["unroll"][0]) < 1e-9
    assert rel(losses["implicit"][1], losses["unroll"][1]) < 1e-6


def test_stats_are_kept(setup):
    cell, x, v = setup
    deq = make(cell, "implicit", tol=1e-8)
    derivatives(deq, x, v)
    assert deq.last_stats is not None and deq.last_stats.converged
    assert len(deq.backward_stats) >= 2 and all(s.converged for s in deq.backward_stats)


def test_no_graph_in_no_grad_mode(setup):
    cell, x, _ = setup
    for mode in BACKWARDS.names():
        with torch.no_grad():
            z = make(cell, mode)(x, torch.zeros(B, D))
        assert not z.requires_grad
        assert torch.allclose(z, make(cell, "unroll")(x, torch.zeros(B, D)).detach(), atol=1e-10)


def test_normalisation_is_a_contraction(float64):
    w = torch.randn(30, 30) * 5
    for fn in (frobenius_normalize, spectral_normalize):
        assert torch.linalg.matrix_norm(fn(w, lam=2.0), ord=2) <= 0.5 + 1e-9
    with pytest.raises(ValueError, match="lambda must be > 1"):
        NormalizedLinear(4, lam=1.0)
    with pytest.raises(UnknownNameError, match="known: frobenius, operator, spectral"):
        NormalizedLinear(4, norm="l1")


def test_bad_input():
    cell = SoftplusCell(3)
    with pytest.raises(UnknownNameError, match="known: implicit, phantom, unroll"):
        DEQ(cell, backward="ift")
    with pytest.raises(UnknownNameError, match="unknown solver"):
        DEQ(cell, solver="newton")
    with pytest.raises(TypeError, match="memroy"):
        DEQ(cell, solver="anderson", solver_options={"memroy": 3})
    with pytest.raises(ValueError, match="k must be >= 1"):
        DEQ(cell, k=0)
    deq = DEQ(cell)
    with pytest.raises(ValueError, match="NaN or Inf"):
        deq(torch.tensor([[1.0, float("nan"), 0.0]]), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="batch sizes differ"):
        deq(torch.zeros(2, 3), torch.zeros(3, 3))
