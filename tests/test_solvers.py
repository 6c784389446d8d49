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


# --- Independent float64 references (issue 15): written from the maths, not from deqsm/solvers.py ----------------
# Each reference works on numpy arrays of shape (B, d), one sample at a time where the method is per sample, and
# follows the conventions in the solvers' docstrings: abs_trace[i] is the batch-max ‖f(z_i) − z_i‖ of the i-th
# f evaluation, and a solver returns f(z) of its last (Picard, Anderson) or per-sample best (Broyden) iterate.
import numpy as np  # noqa: E402  (a declared dependency)


def _max_residual(z, fz):
    return float(np.linalg.norm(fz - z, axis=1).max())


def _ref_picard(fmap, z0, n_eval, damping):
    """z ← z + β (f(z) − z)."""
    z, trace = z0.copy(), []
    for _ in range(n_eval):
        fz = fmap(z)
        trace.append(_max_residual(z, fz))
        z = z + damping * (fz - z)
    return fz, trace


def _anderson_weights(g, reg):
    """argmin_α αᵀ(K + λI)α subject to Σα = 1, K = G Gᵀ, λ = reg·tr(K)/n, via the KKT system (Lagrange)."""
    n = g.shape[0]
    k = g @ g.T
    lam = reg * max(np.trace(k) / n, 1e-30)
    kkt = np.zeros((n + 1, n + 1))
    kkt[:n, :n] = k + lam * np.eye(n)
    kkt[:n, n] = kkt[n, :n] = 1.0
    rhs = np.zeros(n + 1)
    rhs[n] = 1.0
    return np.linalg.solve(kkt, rhs)[:n]


def _ref_anderson(fmap, z0, n_eval, memory, reg, beta):
    """Type-II Anderson over the last `memory` pairs (x_i, f(x_i)): z ← Σ α_i [β f(x_i) + (1 − β) x_i]."""
    z, trace, pairs = z0.copy(), [], []
    for _ in range(n_eval):
        fz = fmap(z)
        trace.append(_max_residual(z, fz))
        pairs = (pairs + [(z, fz)])[-memory:]
        z = np.empty_like(z)
        for s in range(z.shape[0]):
            xs = np.stack([p[0][s] for p in pairs])
            fs = np.stack([p[1][s] for p in pairs])
            z[s] = _anderson_weights(fs - xs, reg) @ (beta * fs + (1.0 - beta) * xs)
    return fz, trace


def _ref_broyden(fmap, z0, max_eval, memory, restart_factor):
    """"Good" Broyden on g(z) = f(z) − z with a dense inverse Jacobian H per sample (starting at −I):
    step z ← z − H g, then H ← H + (Δz − H Δg) Δzᵀ H / (Δzᵀ H Δg) (Sherman–Morrison). H is reset to −I instead
    of updated after a step taken with `memory` updates, or when the batch-max residual exceeds
    `restart_factor` × the best one so far; then the solve also restarts from the per-sample best point (which,
    as the solver keeps f(z) of its best iterate, is f(z_best)). Returns (f of best iterate, trace, counts)."""
    bsz, d = z0.shape
    z = z0.copy()
    fz = fmap(z)
    trace = [_max_residual(z, fz)]
    best_res = np.linalg.norm(fz - z, axis=1)
    best_fz = fz.copy()

    def evaluate(x):
        fx = fmap(x)
        res = np.linalg.norm(fx - x, axis=1)
        trace.append(float(res.max()))
        better = res < best_res
        best_res[better], best_fz[better] = res[better], fx[better]
        return fx - x

    g = fz - z
    best = trace[0]
    h = np.stack([-np.eye(d)] * bsz)
    n_updates, counts = 0, {"restarts": 0, "resets": 0}
    while len(trace) < max_eval:
        dz = -np.einsum("bij,bj->bi", h, g)
        z_new = z + dz
        g_new = evaluate(z_new)
        bad = trace[-1] > restart_factor * best
        if bad or n_updates == memory:
            h, n_updates = np.stack([-np.eye(d)] * bsz), 0
            counts["restarts" if bad else "resets"] += 1
            if bad:
                z_new = best_fz.copy()
                g_new = evaluate(z_new)
        else:
            dg = g_new - g
            for s in range(bsz):
                h_dg = h[s] @ dg[s]
                h[s] = h[s] + np.outer(dz[s] - h_dg, dz[s] @ h[s]) / (dz[s] @ h_dg)
            n_updates += 1
        best = min(best, trace[-1])
        z, g = z_new, g_new
    return best_fz, trace, counts


def _problem(kind, d, bsz, scale, seed, nonlinear=True):
    """z ↦ tanh(A z + b) (or A z + b): A = scale·Q (Q orthogonal) or a Gaussian matrix with ‖A‖₂ = scale.
    Returns the numpy map, the torch map (same numbers) and (A, b)."""
    rng = np.random.default_rng(seed)
    if kind == "orth":
        a = scale * np.linalg.qr(rng.standard_normal((d, d)))[0]
    else:
        a = rng.standard_normal((d, d))
        a = scale * a / np.linalg.norm(a, 2)
    b = rng.standard_normal((bsz, d))
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    if nonlinear:
        return (lambda z: np.tanh(z @ a.T + b)), (lambda z: torch.tanh(z @ at.T + bt)), (a, b)
    return (lambda z: z @ a.T + b), (lambda z: z @ at.T + bt), (a, b)


def _assert_matches_reference(z, stats, z_ref, trace_ref):
    assert stats.nstep == len(stats.abs_trace) == len(trace_ref)
    np.testing.assert_allclose(np.array(stats.abs_trace), np.array(trace_ref), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(z.numpy(), z_ref, rtol=0, atol=1e-10)


NO_STOP = 1e-300  # a tolerance never met: the solver runs exactly max_iter evaluations (or Broyden's + restart)


@pytest.mark.parametrize("damping", [0.3, 0.7, 1.0])
def test_picard_damping_matches_reference(damping, float64):
    fn, ft, _ = _problem("orth", 8, 3, 0.98, seed=0)
    z0 = np.zeros((3, 8))
    z_ref, trace_ref = _ref_picard(fn, z0, 15, damping)
    z, stats = solve(ft, torch.from_numpy(z0), method="picard", tol=NO_STOP, max_iter=15, damping=damping)
    _assert_matches_reference(z, stats, z_ref, trace_ref)


@pytest.mark.parametrize("damping", [0.3, 0.7, 1.0])
def test_picard_damping_closed_form(damping, float64):
    """f(z) = 3 − 2z (z* = 1): from z0 = 0 the damped iterates are z_k = 1 − (1 − 3β)^k, so the k-th residual is
    3 (1 − z_k)·‖1‖ = 3·√d·|1 − 3β|^k; Picard (β = 1) diverges, β = 0.3 contracts by 0.1 per step."""
    d, k = 4, 8
    z, stats = solve(lambda x: 3.0 - 2.0 * x, torch.zeros(1, d), method="picard", tol=NO_STOP, max_iter=k,
                     damping=damping)
    expected = [3.0 * d**0.5 * abs(1.0 - 3.0 * damping) ** i for i in range(k)]
    np.testing.assert_allclose(stats.abs_trace, expected, rtol=1e-12, atol=1e-13)
    z_last = 1.0 - (1.0 - 3.0 * damping) ** (k - 1)
    np.testing.assert_allclose(z.numpy(), np.full((1, d), 3.0 - 2.0 * z_last), rtol=1e-12)


@pytest.mark.parametrize("memory", [1, 2, 5])
@pytest.mark.parametrize("beta", [0.5, 1.0])
@pytest.mark.parametrize("reg", [1e-8, 1e-3])
def test_anderson_matches_reference(memory, beta, reg, float64):
    fn, ft, _ = _problem("orth", 8, 3, 0.98, seed=0)
    z0 = np.zeros((3, 8))
    z_ref, trace_ref = _ref_anderson(fn, z0, 12, memory, reg, beta)
    z, stats = solve(ft, torch.from_numpy(z0), method="anderson", tol=NO_STOP, max_iter=12, memory=memory,
                     beta=beta, reg=reg)
    _assert_matches_reference(z, stats, z_ref, trace_ref)


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_anderson_linear_finite_termination(beta, float64):
    """On f(z) = A z + b in d dimensions Anderson (type II, i.e. GMRES-like) with a window of d + 1 iterates
    is exact after d + 2 evaluations: z* = (I − A)⁻¹ b; a window of d iterates is not yet."""
    d = 6
    _, ft, (a, b) = _problem("gauss", d, 2, 0.95, seed=3, nonlinear=False)
    z_star = np.linalg.solve(np.eye(d) - a, b.T).T
    for memory in (d + 1, 2 * d):
        z, stats = solve(ft, torch.zeros(2, d), method="anderson", tol=NO_STOP, max_iter=d + 2, memory=memory,
                         beta=beta, reg=1e-15)
        assert stats.abs_trace[d + 1] < 1e-8 * stats.abs_trace[0], (memory, stats.abs_trace)
        np.testing.assert_allclose(z.numpy(), z_star, atol=1e-8)
    _, stats = solve(ft, torch.zeros(2, d), method="anderson", tol=NO_STOP, max_iter=d + 2, memory=d, beta=beta,
                     reg=1e-15)
    assert stats.abs_trace[d + 1] > 1e-7 * stats.abs_trace[0], stats.abs_trace


BROYDEN_CASES = [  # (problem, memory, restart_factor, restarts expected); tanh(A z + b) with ‖A‖₂ = 2 or 3, d = 20
    ("orth", 2, 1.5, True), ("orth", 5, 1.5, True), ("orth", 30, 1.5, False),
    ("orth", 2, 1e6, False), ("orth", 5, 1e6, False), ("orth", 30, 1e6, False),
    ("gauss", 2, 1.5, True), ("gauss", 5, 3.0, True),
]


@pytest.mark.parametrize(("kind", "memory", "restart_factor", "restarts"), BROYDEN_CASES)
def test_broyden_matches_dense_reference(kind, memory, restart_factor, restarts, float64):
    fn, ft, _ = _problem(kind, 20, 3, 2.0 if kind == "orth" else 3.0, seed=0)
    z0 = np.zeros((3, 20))
    z_ref, trace_ref, counts = _ref_broyden(fn, z0, 45, memory, restart_factor)
    assert (counts["restarts"] > 0) == restarts, counts
    assert counts["resets"] > 0 or counts["restarts"] > 0, counts  # the memory limit or the restart is exercised
    assert min(trace_ref) > 1e-8  # not converged to round-off, where the trace would be noise
    z, stats = solve(ft, torch.from_numpy(z0), method="broyden", tol=NO_STOP, max_iter=45, memory=memory,
                     restart_factor=restart_factor)
    _assert_matches_reference(z, stats, z_ref, trace_ref)


def test_broyden_linear_finite_termination(float64):
    """Gay (1979): "good" Broyden solves a d-dimensional linear system in at most 2d steps; with memory ≥ 2d
    (no reset) the residual after 2d + 1 evaluations is at round-off and the best f(z) is z* = (I − A)⁻¹ b.
    With memory 2 or 5 the resets spoil finite termination."""
    d = 6
    _, ft, (a, b) = _problem("gauss", d, 2, 0.95, seed=3, nonlinear=False)
    z_star = np.linalg.solve(np.eye(d) - a, b.T).T
    for memory in (2 * d, 30):
        z, stats = solve(ft, torch.zeros(2, d), method="broyden", tol=NO_STOP, max_iter=2 * d + 1, memory=memory,
                         restart_factor=1e6)
        assert stats.abs_trace[2 * d] < 1e-12 * stats.abs_trace[0], (memory, stats.abs_trace)
        np.testing.assert_allclose(z.numpy(), z_star, atol=1e-12)
    for memory in (2, 5):
        _, stats = solve(ft, torch.zeros(2, d), method="broyden", tol=NO_STOP, max_iter=2 * d + 1, memory=memory,
                         restart_factor=1e6)
        assert min(stats.abs_trace) > 1e-6 * stats.abs_trace[0], (memory, stats.abs_trace)
