"""Forward fixed-point solvers for DEQ layers: find z* with z* = f(z*).

The paper solves the fixed point by plain (Picard) iteration, stopping when ‖f(z) − z‖ < tol; the
reviewers asked for faster solvers, so Anderson acceleration and limited-memory Broyden sit beside it.
Every solver has one signature, ``solver(f, z0, *, max_iter, tol, stop_mode, <own knobs>)``, and returns
``(z, SolverStats)``. Tensors of any shape (B, ...) are solved per sample: the first dimension is the
batch, the rest is flattened. Solvers run without an autograd graph unless the caller asks for one
(the ``unroll`` backward mode of :mod:`deqsm.deq` differentiates through the iterations).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from deqsm.registry import Registry

Tensor = torch.Tensor
FixedPointMap = Callable[[Tensor], Tensor]

SOLVERS: Registry[Callable[..., tuple[Tensor, "SolverStats"]]] = Registry("solver")
STOP_MODES = ("abs", "rel")


class ConvergenceError(RuntimeError):
    """A solver did not reach its tolerance (when asked to raise), or its iterates became non-finite."""


@dataclass
class SolverStats:
    """What one solve did; logged per training step.

    Attributes:
        method: the solver's registry name.
        nstep: number of iterations taken (f evaluations after the first).
        abs_residual: final ‖f(z) − z‖ per sample, shape (B,).
        rel_residual: final ‖f(z) − z‖ / (‖f(z)‖ + 1e-9) per sample, shape (B,).
        abs_trace: batch-max absolute residual after each iteration (length nstep).
        rel_trace: batch-max relative residual after each iteration (length nstep).
        converged: whether every sample met ``tol`` in the chosen ``stop_mode``.
        tol, stop_mode: the criterion that was applied.
    """

    method: str
    nstep: int
    abs_residual: Tensor
    rel_residual: Tensor
    abs_trace: list[float] = field(default_factory=list)
    rel_trace: list[float] = field(default_factory=list)
    converged: bool = False
    tol: float = 0.0
    stop_mode: str = "abs"

    @property
    def abs_residual_max(self) -> float:
        return float(self.abs_residual.max())

    @property
    def rel_residual_max(self) -> float:
        return float(self.rel_residual.max())

    @property
    def residual_max(self) -> float:
        """The batch-max residual in the stop mode that was applied."""
        return self.abs_residual_max if self.stop_mode == "abs" else self.rel_residual_max

    def summary(self, prefix: str = "solver") -> dict[str, float]:
        """Flat scalar metrics (for Ray Tune reports and MLflow)."""
        return {
            f"{prefix}_nstep": float(self.nstep),
            f"{prefix}_abs_residual_max": self.abs_residual_max,
            f"{prefix}_abs_residual_mean": float(self.abs_residual.mean()),
            f"{prefix}_rel_residual_max": self.rel_residual_max,
            f"{prefix}_converged": float(self.converged),
        }


class _ResidualBook:
    """Shared residual bookkeeping: per-sample residuals, traces, stop test, best iterate."""

    def __init__(self, method: str, tol: float, stop_mode: str, keep_best: bool) -> None:
        self.method, self.tol, self.stop_mode, self.keep_best = method, tol, stop_mode, keep_best
        self.abs_trace: list[float] = []
        self.rel_trace: list[float] = []
        self.best_z: Tensor | None = None
        self.best_abs: Tensor | None = None
        self.best_rel: Tensor | None = None
        self.nstep = 0

    def update(self, z: Tensor, fz: Tensor) -> bool:
        """Record the residual of iterate ``z`` (with ``fz = f(z)``); True when converged."""
        with torch.no_grad():
            diff = (fz - z).flatten(1)
            abs_r = diff.norm(dim=1)
            rel_r = abs_r / (fz.flatten(1).norm(dim=1) + 1e-9)
        if not bool(torch.isfinite(abs_r).all()):
            raise ConvergenceError(
                f"{self.method} solver diverged: non-finite residual after {self.nstep} iterations "
                f"(last finite max residual {self.abs_trace[-1] if self.abs_trace else float('nan'):.3g})"
            )
        self.abs_trace.append(float(abs_r.max()))
        self.rel_trace.append(float(rel_r.max()))
        crit = abs_r if self.stop_mode == "abs" else rel_r
        if self.best_z is None or not self.keep_best:
            self.best_z, self.best_abs, self.best_rel = fz, abs_r, rel_r
        else:
            # Per-sample: keep whichever iterate has the smaller residual (Broyden is not monotone).
            best_crit = self.best_abs if self.stop_mode == "abs" else self.best_rel
            better = crit < best_crit
            shape = (-1,) + (1,) * (z.dim() - 1)
            self.best_z = torch.where(better.view(shape), fz, self.best_z)
            self.best_abs = torch.where(better, abs_r, self.best_abs)
            self.best_rel = torch.where(better, rel_r, self.best_rel)
        best_crit = self.best_abs if self.stop_mode == "abs" else self.best_rel
        return bool((best_crit < self.tol).all())

    def finish(self, converged: bool) -> tuple[Tensor, SolverStats]:
        assert self.best_z is not None and self.best_abs is not None and self.best_rel is not None
        stats = SolverStats(
            method=self.method,
            nstep=self.nstep,
            abs_residual=self.best_abs.detach(),
            rel_residual=self.best_rel.detach(),
            abs_trace=self.abs_trace,
            rel_trace=self.rel_trace,
            converged=converged,
            tol=self.tol,
            stop_mode=self.stop_mode,
        )
        return self.best_z, stats


@SOLVERS.register("picard")
def picard(
    f: FixedPointMap,
    z0: Tensor,
    *,
    max_iter: int,
    tol: float,
    stop_mode: str = "abs",
    damping: float = 1.0,
) -> tuple[Tensor, SolverStats]:
    """Plain fixed-point iteration z ← (1 − β) z + β f(z), β = ``damping`` (the paper's solver)."""
    if not 0.0 < damping <= 1.0:
        raise ValueError(f"picard damping must be in (0, 1], got {damping}")
    tr = _ResidualBook("picard", tol, stop_mode, keep_best=False)
    z = z0
    converged = False
    for _ in range(max_iter):
        fz = f(z)
        tr.nstep += 1
        # The residual of z is measured with f(z); the returned iterate is f(z) itself.
        if tr.update(z, fz):
            converged = True
            break
        z = fz if damping == 1.0 else (1.0 - damping) * z + damping * fz
    return tr.finish(converged)


@SOLVERS.register("anderson")
def anderson(
    f: FixedPointMap,
    z0: Tensor,
    *,
    max_iter: int,
    tol: float,
    stop_mode: str = "abs",
    memory: int = 5,
    reg: float = 1e-8,
    beta: float = 1.0,
) -> tuple[Tensor, SolverStats]:
    """Anderson acceleration (type II): mix the last ``memory`` evaluations so as to minimise the
    linearised residual, z ← Σ α_i [β f(z_i) + (1 − β) z_i] with Σ α_i = 1.

    The constrained least-squares problem min ‖Σ α_i G_i‖ s.t. Σ α_i = 1 (G_i = f(z_i) − z_i) has the
    solution α ∝ (G Gᵀ + λ I)⁻¹ 1; λ = ``reg`` × mean diag(G Gᵀ) keeps it solvable, and a sample whose
    system is still singular or gives non-finite weights falls back to a plain step (safeguard).
    """
    if memory < 1:
        raise ValueError(f"anderson memory must be >= 1, got {memory}")
    tr = _ResidualBook("anderson", tol, stop_mode, keep_best=False)
    shape = z0.shape
    bsz = shape[0]
    xs: list[Tensor] = []  # flattened iterates, (B, d)
    fs: list[Tensor] = []  # flattened f(iterates)
    z = z0
    converged = False
    for _ in range(max_iter):
        fz = f(z)
        tr.nstep += 1
        if tr.update(z, fz):
            converged = True
            break
        xs.append(z.reshape(bsz, -1))
        fs.append(fz.reshape(bsz, -1))
        if len(xs) > memory:
            xs.pop(0)
            fs.pop(0)
        X = torch.stack(xs, dim=1)  # (B, n, d)
        F = torch.stack(fs, dim=1)
        G = F - X
        gram = G @ G.transpose(1, 2)  # (B, n, n)
        n = gram.shape[-1]
        eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
        lam = reg * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
        rhs = torch.ones(bsz, n, 1, dtype=gram.dtype, device=gram.device)
        a, info = torch.linalg.solve_ex(gram + lam.view(-1, 1, 1) * eye, rhs)
        alpha = a.squeeze(-1)
        alpha = alpha / alpha.sum(dim=1, keepdim=True)
        ok = (info == 0) & torch.isfinite(alpha).all(dim=1)
        # Safeguard: samples whose system failed take a plain step (weight 1 on the newest iterate).
        plain = torch.zeros_like(alpha)
        plain[:, -1] = 1.0
        alpha = torch.where(ok.view(-1, 1), alpha, plain)
        mixed = beta * (alpha.unsqueeze(1) @ F) + (1.0 - beta) * (alpha.unsqueeze(1) @ X)
        z = mixed.reshape(shape)
    return tr.finish(converged)


@SOLVERS.register("broyden")
def broyden(
    f: FixedPointMap,
    z0: Tensor,
    *,
    max_iter: int,
    tol: float,
    stop_mode: str = "abs",
    memory: int = 30,
    restart_factor: float = 10.0,
) -> tuple[Tensor, SolverStats]:
    """Limited-memory ("good") Broyden on the root problem g(z) = f(z) − z = 0.

    The inverse Jacobian of g is approximated as H = −I + Σ u_i v_iᵀ (the −I start makes the first step a
    plain Picard step) and updated by Sherman–Morrison after each step. Safeguards: when ``memory``
    updates are stored, or when a step makes the residual ``restart_factor`` times worse than the best
    so far, the approximation is reset to −I (from the best iterate, in the second case). Broyden's
    residual is not monotone, so the best iterate per sample is returned.
    """
    if memory < 1:
        raise ValueError(f"broyden memory must be >= 1, got {memory}")
    tr = _ResidualBook("broyden", tol, stop_mode, keep_best=True)
    shape = z0.shape
    bsz = shape[0]
    us: list[Tensor] = []
    vs: list[Tensor] = []

    def apply_h(x: Tensor) -> Tensor:  # H x, x of shape (B, d)
        out = -x
        for u, v in zip(us, vs):
            out = out + u * (v * x).sum(dim=1, keepdim=True)
        return out

    def apply_ht(x: Tensor) -> Tensor:  # Hᵀ x
        out = -x
        for u, v in zip(us, vs):
            out = out + v * (u * x).sum(dim=1, keepdim=True)
        return out

    z = z0.reshape(bsz, -1)
    fz = f(z.reshape(shape))
    tr.nstep += 1
    converged = tr.update(z.reshape(shape), fz)
    g = fz.reshape(bsz, -1) - z
    best = tr.abs_trace[-1]
    while not converged and tr.nstep < max_iter:
        dz = -apply_h(g)
        z_new = z + dz
        fz = f(z_new.reshape(shape))
        tr.nstep += 1
        converged = tr.update(z_new.reshape(shape), fz)
        g_new = fz.reshape(bsz, -1) - z_new
        if tr.abs_trace[-1] > restart_factor * best or len(us) >= memory:
            us.clear()
            vs.clear()
            if tr.abs_trace[-1] > restart_factor * best:  # a bad step: go back to the best iterate
                assert tr.best_z is not None
                z_new = tr.best_z.reshape(bsz, -1)
                fz = f(z_new.reshape(shape))
                tr.nstep += 1
                converged = tr.update(z_new.reshape(shape), fz)
                g_new = fz.reshape(bsz, -1) - z_new
            z, g = z_new, g_new
            best = min(best, tr.abs_trace[-1])
            continue
        best = min(best, tr.abs_trace[-1])
        dg = g_new - g
        h_dg = apply_h(dg)
        denom = (dz * h_dg).sum(dim=1, keepdim=True)
        safe = denom.abs() > 1e-30
        us.append(torch.where(safe, (dz - h_dg) / torch.where(safe, denom, torch.ones_like(denom)), torch.zeros_like(dz)))
        vs.append(apply_ht(dz))
        z, g = z_new, g_new
    return tr.finish(converged)


def solver_knobs(method: str) -> list[str]:
    """The solver-specific keyword options of ``method`` (beyond max_iter / tol / stop_mode)."""
    params = inspect.signature(SOLVERS.get(method)).parameters
    return [p for p in params if p not in ("f", "z0", "max_iter", "tol", "stop_mode")]


def solve(
    f: FixedPointMap,
    z0: Tensor,
    *,
    method: str = "anderson",
    tol: float = 1e-5,
    max_iter: int = 50,
    stop_mode: str = "abs",
    raise_on_nonconvergence: bool = False,
    record_graph: bool = False,
    **knobs: float,
) -> tuple[Tensor, SolverStats]:
    """Find z* = f(z*) starting from ``z0`` with the registered solver ``method``.

    Args:
        f: the map; takes and returns tensors shaped like ``z0`` (batch first).
        z0: the initial state.
        tol: stop when every sample's residual (``stop_mode`` "abs": ‖f(z) − z‖, "rel": divided by
            ‖f(z)‖) is below it.
        raise_on_nonconvergence: raise :class:`ConvergenceError` (naming the residual reached and the
            limit) instead of only reporting ``converged=False`` in the stats.
        record_graph: build an autograd graph through the iterations (for back-propagating through the
            solver); by default the solve runs under ``no_grad``.
        knobs: the solver's own options (see :func:`solver_knobs`); an unknown one is an error.
    """
    fn = SOLVERS.get(method)
    if stop_mode not in STOP_MODES:
        raise ValueError(f"unknown stop_mode {stop_mode!r}; known: {', '.join(STOP_MODES)}")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive number, got {tol}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if z0.dim() < 2:
        raise ValueError(f"z0 must have a batch dimension and at least one state dimension, got shape {tuple(z0.shape)}")
    unknown = set(knobs) - set(solver_knobs(method))
    if unknown:
        raise TypeError(
            f"unknown option(s) {sorted(unknown)} for solver {method!r}; its options: {solver_knobs(method)}"
        )
    with torch.set_grad_enabled(record_graph and torch.is_grad_enabled()):
        z, stats = fn(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, **knobs)
    if raise_on_nonconvergence and not stats.converged:
        raise ConvergenceError(
            f"{method} solver did not converge: {stop_mode} residual {stats.residual_max:.3g} > tol {tol:g} "
            f"after max_iter={max_iter} iterations"
        )
    return z, stats
