"""Every registered solver on known fixed points (jaxopt-style), plus the stats record and bad input."""
import pytest
import torch

from deqsm.registry import UnknownNameError
from deqsm.solvers import SOLVERS, ConvergenceError, solve

COS_FIXED_POINT = 0.7390851332151607


@pytest.mark.parametrize("method", SOLVERS.names())
@pytest.mark.parametrize("shape", [(3, 2), (2, 3, 4, 4)])
def test_cos_fixed_point(method, shape, float64):
    z, stats = solve(torch.cos, torch.zeros(shape), method=method, tol=1e-10, max_iter=200)
    assert stats.converged
    assert torch.allclose(z, torch.full(shape, COS_FIXED_POINT), atol=1e-9)
    assert stats.abs_residual.shape == (shape[0],)
    assert stats.nstep == len(stats.abs_trace) == len(stats.rel_trace)
    assert stats.abs_residual_max < 1e-10


@pytest.mark.parametrize("method", SOLVERS.names())
@pytest.mark.parametrize("shape", [(4, 6), (2, 2, 3, 2)])
def test_contractive_affine_map(method, shape, float64):
    """f(z) = A z + b with ‖A‖₂ = 0.9 has z* = (I − A)⁻¹ b."""
    gen = torch.Generator().manual_seed(1)
    d = int(torch.tensor(shape[1:]).prod())
    a = torch.randn(d, d, generator=gen)
    a = 0.9 * a / torch.linalg.matrix_norm(a, ord=2)
    b = torch.randn(shape[0], d, generator=gen)
    f = lambda z: (z.flatten(1) @ a.t() + b).view(shape)  # noqa: E731
    expected = torch.linalg.solve(torch.eye(d) - a, b.t()).t().view(shape)
    z, stats = solve(f, torch.zeros(shape), method=method, tol=1e-10, max_iter=500)
    assert stats.converged, stats.residual_max
    assert torch.allclose(z, expected, atol=1e-8)


def test_no_graph_unless_asked():
    w = torch.tensor(0.5, requires_grad=True)
    z, _ = solve(lambda z: w * z + 1, torch.zeros(2, 2), method="picard", tol=1e-6, max_iter=100)
    assert not z.requires_grad
    z, _ = solve(lambda z: w * z + 1, torch.zeros(2, 2), method="picard", tol=1e-6, max_iter=100, record_graph=True)
    assert z.requires_grad


def test_anderson_beats_picard_on_weak_contraction(float64):
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen))
    a = 0.98 * q  # every eigenvalue has modulus 0.98: Picard contracts slowly
    f = lambda z: torch.tanh(z @ a.t() + 0.3)  # noqa: E731
    _, sp = solve(f, torch.zeros(4, 20), method="picard", tol=1e-8, max_iter=2000)
    _, sa = solve(f, torch.zeros(4, 20), method="anderson", tol=1e-8, max_iter=2000)
    assert sp.converged and sa.converged
    assert sa.nstep < 0.5 * sp.nstep


def test_rel_stop_mode_and_summary(float64):
    _, stats = solve(torch.cos, torch.zeros(2, 2), method="picard", tol=1e-6, max_iter=200, stop_mode="rel")
    assert stats.converged and stats.rel_residual_max < 1e-6
    summary = stats.summary()
    assert summary["solver_converged"] == 1.0 and summary["solver_nstep"] == stats.nstep


def test_nonconvergence_reported_or_raised():
    _, stats = solve(torch.cos, torch.zeros(2, 2), method="picard", tol=1e-12, max_iter=3)
    assert not stats.converged and stats.nstep == 3
    with pytest.raises(ConvergenceError, match=r"residual .* > tol 1e-12 after max_iter=3"):
        solve(torch.cos, torch.zeros(2, 2), method="picard", tol=1e-12, max_iter=3, raise_on_nonconvergence=True)


def test_divergence_is_an_error():
    with pytest.raises(ConvergenceError, match="diverged"):
        solve(lambda z: 1e200 * z * z + 1.0, torch.zeros(2, 2, dtype=torch.float64), method="picard", tol=1e-6, max_iter=50)


def test_bad_input():
    with pytest.raises(UnknownNameError, match="unknown solver 'newton'; known: anderson, broyden, picard"):
        solve(torch.cos, torch.zeros(2, 2), method="newton")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['memroy'\] for solver 'anderson'"):
        solve(torch.cos, torch.zeros(2, 2), method="anderson", memroy=3)
    with pytest.raises(ValueError, match="tol must be a positive"):
        solve(torch.cos, torch.zeros(2, 2), tol=-1.0)
    with pytest.raises(ValueError, match="stop_mode"):
        solve(torch.cos, torch.zeros(2, 2), stop_mode="max")
    with pytest.raises(ValueError, match="batch dimension"):
        solve(torch.cos, torch.zeros(3))
