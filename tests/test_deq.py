"""The DEQ layer's backward modes against a fully converged unroll (float64), to second order."""
import pytest
import torch
from torch import nn

from deqsm.deq import BACKWARDS, DEQ, SoftplusCell
from deqsm.normalization import NormalizedLinear, frobenius_normalize, spectral_normalize
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


class DampedUnroll(nn.Module):
    """The phantom gradient written out by hand (the reference): a plain fixed-point loop to machine precision,
    without a graph, then K steps z ← (1 − τ) z + τ f(z, x) from the detached z*, differentiated by autograd."""

    def __init__(self, cell: nn.Module, k: int, tau: float) -> None:
        super().__init__()
        self.cell, self.k, self.tau = cell, k, tau

    def forward(self, x, z0):
        with torch.no_grad():
            z = z0
            for _ in range(10_000):
                z, previous = self.cell(z, x), z
                if float((z - previous).abs().max()) < 1e-15:
                    break
        z = z.detach()
        for _ in range(self.k):
            z = (1 - self.tau) * z + self.tau * self.cell(z, x)
        return z


@pytest.mark.parametrize("k,tau", [(1, 1.0), (2, 1.0), (3, 0.3), (2, 0.7)])
def test_phantom_gradient_is_a_k_step_damped_unroll(setup, k, tau):
    """Algorithm 1 for a given K and τ, to second order: energy, score, Hessian-vector product and the parameter
    gradient of an SSM-like loss equal those of the hand-written K-step damped unroll from the detached z*."""
    cell, x, v = setup
    got = derivatives(make(cell, "phantom", k=k, tau=tau), x, v)
    ref = derivatives(DampedUnroll(cell, k, tau), x, v)
    for name, a, b in zip(["energy", "score", "hvp", "param grad"], got, ref):
        assert rel(a, b) <= 1e-9, (name, rel(a, b))
    # ... and K or τ matter: one step more, or the weights of the damping swapped, is a different gradient.
    other = derivatives(DampedUnroll(cell, k + 1, tau), x, v)[3]
    assert rel(got[3], other) > 1e-3
    if tau != 1.0:
        assert rel(got[3], derivatives(DampedUnroll(cell, k, 1 - tau), x, v)[3]) > 1e-3


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


class ConvEnergyCell(nn.Module):
    """Softplus(Ŵ ⋆ z + x) with the exact operator norm (size-dependent) and a learned gain."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        from deqsm.models.conv import ConvSoftplusCell

        self.cell = ConvSoftplusCell(channels, lam=1.05, norm="operator", learn_gain=True)

    def forward(self, z, x):
        return self.cell(z, x)


@pytest.mark.parametrize("kind", ["spectral-gain", "conv-operator-gain"])
def test_implicit_with_normalised_weights_as_inputs_matches_unroll_to_third_order(float64, kind):
    """The implicit backward feeds each normalised layer in as its Ŵ (computed once, with its graph to W and the
    gain): energy, score, Hessian-vector product and an SSM-like parameter gradient equal a converged unroll's."""
    torch.manual_seed(2)
    if kind == "spectral-gain":
        cell, shape = SoftplusCell(D, lam=1.05, norm="spectral", learn_gain=True), (B, D)
    else:
        cell, shape = ConvEnergyCell(2), (B, 2, 4, 4)
    x, v = torch.randn(shape), torch.randn(shape)

    def derivs(backward):
        deq = make(cell, backward)
        xx = x.detach().requires_grad_(True)
        z = deq(xx, torch.zeros(shape))
        e = (0.5 * z**2 + z * xx).flatten(1).sum(1)
        s = torch.autograd.grad(e.sum(), xx, create_graph=True)[0]
        hv = torch.autograd.grad((s * v).sum(), xx, create_graph=True)[0]
        loss = (hv * v).sum() + 0.5 * ((s * v).flatten(1).sum(1) ** 2).sum()
        grads = torch.autograd.grad(loss, list(cell.parameters()))
        return e, s, hv, torch.cat([g.flatten() for g in grads])

    for name, a, b in zip(["energy", "score", "hvp", "param grad"], derivs("implicit"), derivs("unroll")):
        assert rel(a, b) <= 1e-6, name


@pytest.mark.parametrize("backward", ["phantom", "implicit", "unroll"])
def test_a_normalised_weight_is_computed_once_per_training_step(backward, monkeypatch):
    """Under gradients, a DEQ call computes each layer's Ŵ once, however many times the cell runs (phantom steps,
    unrolled iterations, the implicit backward's derivative levels): for ``spectral`` each costs an SVD. Graph-free
    solves use the cache. An SSM step (third order in the implicit mode) computes it at most twice."""
    from deqsm.normalization import NormalizedLinear as Linear

    calls = []
    original = Linear._compute
    monkeypatch.setattr(Linear, "_compute", lambda self, size: calls.append(1) or original(self, size))
    torch.manual_seed(0)
    cell = SoftplusCell(8, lam=1.05, norm="spectral")
    inject = nn.Linear(3, 8)
    deq = DEQ(cell, backward=backward, k=8, tol=1e-6, max_iter=100)
    out = get_loss("ssm", generator=torch.Generator().manual_seed(0))(
        lambda x_: deq(inject(x_), torch.zeros(x_.shape[0], 8)).sum(1), torch.randn(16, 3))
    out.loss.backward()
    assert 1 <= len(calls) <= 2, len(calls)
    assert cell.linear.weight.grad is not None and bool(cell.linear.weight.grad.abs().sum() > 0)


def test_adjoint_solves_stop_relative_to_the_gradients_scale(setup):
    """A loss scaled by 1e-8 (a mean over a large batch, a small loss weight) has a gradient 1e-8 times as large,
    solved as exactly: the adjoint solves stop on the relative residual by default. Stopping on the absolute
    residual instead, the same solve stops at once and the gradient is wrong by far more than the tolerance."""
    cell, x, v = setup

    def scaled_grad(**kw):
        deq = make(cell, "implicit", tol=1e-6, **kw)
        z = deq(x, torch.zeros(B, D))
        loss = 1e-8 * ((z * v).sum() + (z**2).sum())
        g = torch.autograd.grad(loss, list(cell.parameters()))
        ref_deq = make(cell, "implicit")
        zr = ref_deq(x, torch.zeros(B, D))
        gr = torch.autograd.grad(1e-8 * ((zr * v).sum() + (zr**2).sum()), list(cell.parameters()))
        return rel(torch.cat([a.flatten() for a in g]), torch.cat([b.flatten() for b in gr]))

    assert scaled_grad() < 1e-5
    assert scaled_grad(adjoint_stop_mode="abs") > 1e-3
