"""The DEQ layer: z* = f(z*, x), solved by a registered solver, differentiated by a registered backward mode.

Backward modes (``BACKWARDS`` registry):

``phantom`` (the paper's Algorithm 1)
    Solve without a graph, then take K damped steps z ← (1 − τ) z + τ f(z, x) from the detached z* with
    autograd on. Derivatives w.r.t. x and θ flow through these K steps only — a truncated Neumann series
    of the implicit derivative (Proposition 2), cheap and flat in memory.

``unroll``
    Back-propagate through every solver iteration (the memory-hungry reference).

``implicit``
    Exact implicit differentiation (Proposition 1): for a loss gradient g = ∂L/∂z*, solve the adjoint
    fixed point wᵀ = gᵀ + wᵀ ∂f/∂z at z*, then ∂L/∂x = wᵀ ∂f/∂x and ∂L/∂θ = wᵀ ∂f/∂θ.

    Score matching needs more: its loss contains ∇ₓ of the model, so the backward pass itself must be
    differentiable, including the dependence of z* on x and θ inside it (the second-order term of the
    paper's eq. 9; TorchDEQ drops it because its backward works on a detached z*). Here the fixed point
    is a custom :class:`torch.autograd.Function` whose backward is written in differentiable operations:

    * z* is saved as the Function's *output*, so inside a graph-recording backward it still carries this
      Function as its grad_fn, and derivatives through z* come back here;
    * the partial vector-Jacobian products (in z alone; in x and θ alone) are taken w.r.t. aliases of
      those arguments (:func:`partial_vjp`), so they do not follow z*'s own graph (which would recurse
      without end);
    * the adjoint solve is *the same Function* applied to the adjoint map w ↦ g + (∂f/∂z)ᵀ w, so its
      derivative is again an implicit solve — recursively, to any order (first order for the score,
      second for ∇ₓ s, third for the parameter gradient of an SSM loss).

    When the backward runs without ``create_graph`` (plain training of a non-derivative loss) all of
    this is a single adjoint solve with no graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn
from torch.func import functional_call

from deqsm.normalization import (CachedNormalization, NormalizedLinear, held_normalization, normalization_layers,
                                 normalization_overrides)
from deqsm.registry import Registry
from deqsm.solvers import SolverStats, solve

Tensor = torch.Tensor

BACKWARDS: Registry["BackwardMode"] = Registry("backward mode")


class Cell(Protocol):
    """f(z, x): the model's map; x is whatever the model injects (often already g(y))."""

    def __call__(self, z: Tensor, x: Tensor) -> Tensor: ...


class SoftplusCell(nn.Module):
    """f(z, u) = Softplus(Ŵ z + u): the paper's MLP cell; u = g(x) is the injection computed once by the
    model. Softplus is smooth (the theory needs f ∈ C²) and 1-Lipschitz, so ‖Ŵ‖₂ < 1 gives a contraction."""

    activation = "softplus"  # the name :meth:`DEQ.taped_phantom_steps` records each step's activation under

    def __init__(self, width: int, *, lam: float = 2.0, norm: str = "frobenius", learn_gain: bool = False) -> None:
        super().__init__()
        self.linear = NormalizedLinear(width, lam=lam, norm=norm, learn_gain=learn_gain)
        self.act = nn.Softplus()

    def preactivation(self, z: Tensor, u: Tensor) -> Tensor:
        """Ŵ z + u: what the activation of :meth:`forward` is applied to."""
        return self.linear(z) + u

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        return self.act(self.preactivation(z, u))


# ---------------------------------------------------------------------------------------------------
# Backward modes
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SolveSpec:
    """How to solve: forwarded to :func:`deqsm.solvers.solve`."""

    method: str = "anderson"
    tol: float = 1e-5
    max_iter: int = 50
    stop_mode: str = "abs"
    raise_on_nonconvergence: bool = False
    knobs: tuple[tuple[str, float], ...] = ()

    def __call__(self, f: Callable[[Tensor], Tensor], z0: Tensor, record_graph: bool = False):
        return solve(
            f, z0, method=self.method, tol=self.tol, max_iter=self.max_iter, stop_mode=self.stop_mode,
            raise_on_nonconvergence=self.raise_on_nonconvergence, record_graph=record_graph,
            **dict(self.knobs),
        )


def partial_vjp(fn: Callable[..., Tensor], args: list[Tensor], wrt: list[int], cotangent: Tensor) -> list[Tensor]:
    """The VJP of ``fn(*args)`` with ``cotangent``, w.r.t. ``args[i]`` for i in ``wrt`` only: *partial*
    derivatives that do not follow the other arguments' own dependence on the differentiated ones.

    Each differentiated argument is replaced by an alias (a view, still attached to its graph when it has
    one); ``autograd.grad`` w.r.t. the alias stops there. When grad mode is on (a graph-recording
    backward), the result keeps its graph to the original tensors, so it can be differentiated again.
    (``torch.func.vjp`` computes the same but refuses to run under saved-tensor hooks, which the memory
    measurement uses.)
    """
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        aliases = list(args)
        for i in wrt:
            a = args[i]
            aliases[i] = a.view_as(a) if a.requires_grad else a.detach().requires_grad_(True)
        out = fn(*aliases)
        grads = torch.autograd.grad(out, [aliases[i] for i in wrt], cotangent,
                                    create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(args[i]) if g is None else g for i, g in zip(wrt, grads)]


class _AdjointMap:
    """w ↦ g + (∂fn/∂u)ᵀ w at a fixed point u of ``fn``: affine in w, called as ``(w, g, u, *inputs)``.

    Called, it is differentiable in every argument (the backward of the Function that solves it needs that).
    :meth:`solve_map` gives the graph-free map its solver iterates: it records ``fn``'s graph at u once and
    takes each iteration's VJP through that graph, since the Jacobian at u does not depend on w (each
    iteration is then one backward pass, not a forward and a backward)."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn = fn

    def __call__(self, w: Tensor, g: Tensor, u: Tensor, *inputs: Tensor) -> Tensor:
        return g + partial_vjp(self.fn, [u, *inputs], [0], w)[0]

    def solve_map(self, g: Tensor, u: Tensor, *inputs: Tensor) -> Callable[[Tensor], Tensor]:
        with torch.enable_grad():
            alias = u.detach().requires_grad_(True)
            out = self.fn(alias, *inputs)

        def step(w: Tensor) -> Tensor:
            (v,) = torch.autograd.grad(out, alias, w, retain_graph=True, allow_unused=True)
            return g if v is None else g + v

        return step


class _ImplicitFixedPoint(torch.autograd.Function):
    """u* = fn(u*, *inputs), differentiable to any order w.r.t. ``inputs`` (see the module docstring).

    ``sink`` is a list that receives the stats of every solve (the forward one first)."""

    @staticmethod
    def forward(ctx, fn, u0, spec: SolveSpec, adjoint_spec: SolveSpec, sink: list, *inputs):  # type: ignore[override]
        # The iterations need no graph to the inputs; an adjoint map reuses one graph across them.
        detached = [t.detach() for t in inputs]
        step = fn.solve_map(*detached) if isinstance(fn, _AdjointMap) else (lambda u: fn(u, *detached))
        u, stats = spec(step, u0)
        sink.append(stats)
        ctx.fn, ctx.adjoint_spec, ctx.sink = fn, adjoint_spec, sink
        ctx.save_for_backward(u, *inputs)
        return u

    @staticmethod
    def backward(ctx, grad_u):  # type: ignore[override]
        u, *inputs = ctx.saved_tensors
        fn, spec, sink = ctx.fn, ctx.adjoint_spec, ctx.sink
        # w = g + (∂fn/∂u)ᵀ w, solved by this same Function, so its derivative is again an implicit solve.
        # It starts from g, the first term of its Neumann series.
        w = _ImplicitFixedPoint.apply(_AdjointMap(fn), grad_u, spec, spec, sink, grad_u, u, *inputs)
        # The partial VJP in the inputs alone (not through u's own dependence on them).
        grads = partial_vjp(fn, [u, *inputs], list(range(1, len(inputs) + 1)), w)
        return (None, None, None, None, None, *grads)


class BackwardMode(Protocol):
    def __call__(
        self, deq: "DEQ", x: Tensor, z0: Tensor, params: dict[str, Tensor]
    ) -> tuple[Tensor, SolverStats]: ...


@BACKWARDS.register("phantom")
def phantom_backward(deq: "DEQ", x: Tensor, z0: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, SolverStats]:
    with torch.no_grad():
        z, stats = deq.solve_spec(lambda z: deq.cell(z, x), z0)
    z = z.detach()
    for _ in range(deq.k):
        fz = deq.cell(z, x)
        z = fz if deq.tau == 1.0 else (1.0 - deq.tau) * z + deq.tau * fz
    return z, stats


@BACKWARDS.register("unroll")
def unroll_backward(deq: "DEQ", x: Tensor, z0: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, SolverStats]:
    return deq.solve_spec(lambda z: deq.cell(z, x), z0, record_graph=True)


@BACKWARDS.register("implicit")
def implicit_backward(deq: "DEQ", x: Tensor, z0: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, SolverStats]:
    if not (torch.is_grad_enabled() and (x.requires_grad or params)):
        with torch.no_grad():
            return deq.solve_spec(lambda z: deq.cell(z, x), z0)
    cell = deq.cell
    # A normalised layer enters as its Ŵ, computed once here with its graph to W (and the gain), rather than
    # as W, which every derivative level would normalise again (an SVD each, for "spectral"). A probe call of
    # the cell computes each Ŵ at the size it is used at (DEQ.forward holds them: held_normalization).
    with torch.enable_grad():
        cell(z0.detach(), x.detach())
    slots: list[tuple[CachedNormalization, object]] = []
    hats: list[Tensor] = []
    for prefix, layer in normalization_layers(cell):
        if layer._held and set(layer._parameters) <= {"weight", "gain_logit"}:
            own = {f"{prefix}.{n}" if prefix else n for n in layer._parameters}
            params = {n: p for n, p in params.items() if n not in own}
            for skey, hat in layer._held.items():
                slots.append((layer, skey))
                hats.append(hat)
    names = list(params)
    inputs = [x, *params.values(), *hats]

    def fn(z: Tensor, x_: Tensor, *values: Tensor) -> Tensor:
        given: dict[CachedNormalization, dict] = {}
        for (layer, skey), hat in zip(slots, values[len(names):]):
            given.setdefault(layer, {})[skey] = hat
        with normalization_overrides(list(given.items())):
            return functional_call(cell, dict(zip(names, values[:len(names)])), (z, x_))

    sink: list[SolverStats] = []
    deq.backward_stats = sink  # filled by the adjoint solves when a backward pass runs
    z = _ImplicitFixedPoint.apply(fn, z0.detach(), deq.solve_spec, deq.adjoint_spec, sink, *inputs)
    return z, sink.pop(0)  # the forward solve's stats; the adjoint solves append to ``sink`` later


# ---------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------
class DEQ(nn.Module):
    """A deep equilibrium layer around ``cell``: ``DEQ(cell, ...)(x, z0)`` returns z* = cell(z*, x).

    Args:
        cell: an nn.Module computing f(z, x).
        solver: forward solver name (:data:`deqsm.solvers.SOLVERS`).
        backward: ``phantom`` | ``unroll`` | ``implicit`` (:data:`BACKWARDS`).
        k, tau: phantom steps and their damping (paper: K = 2, τ = 1).
        tol, max_iter, stop_mode: the forward stopping rule.
        solver_options: the solver's own knobs, e.g. ``{"memory": 5}`` for Anderson.
        adjoint_solver, adjoint_tol, adjoint_max_iter, adjoint_stop_mode: the implicit mode's backward solves
            (default: the forward solver, a tolerance 10× tighter, twice the iterations, relative: a
            gradient's scale, e.g. 1/batch, must not decide how exactly it is solved).
        raise_on_nonconvergence: make a solve that misses ``tol`` an error instead of a stat.

    After a forward, ``last_stats`` holds the forward solve's :class:`SolverStats`; in implicit mode
    ``backward_stats`` collects the stats of the adjoint solves run by the latest backward pass.
    """

    def __init__(
        self,
        cell: nn.Module,
        *,
        solver: str = "anderson",
        backward: str = "phantom",
        k: int = 2,
        tau: float = 1.0,
        tol: float = 1e-5,
        max_iter: int = 50,
        stop_mode: str = "abs",
        solver_options: dict[str, float] | None = None,
        adjoint_solver: str | None = None,
        adjoint_tol: float | None = None,
        adjoint_max_iter: int | None = None,
        adjoint_stop_mode: str = "rel",
        raise_on_nonconvergence: bool = False,
    ) -> None:
        super().__init__()
        self.backward_mode = BACKWARDS.get(backward)
        if k < 1:
            raise ValueError(f"phantom steps k must be >= 1, got {k}")
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"phantom damping tau must be in (0, 1], got {tau}")
        self.cell = cell
        self.backward = backward
        self.k, self.tau = k, tau
        knobs = tuple(sorted((solver_options or {}).items()))
        self.solve_spec = SolveSpec(solver, tol, max_iter, stop_mode, raise_on_nonconvergence, knobs)
        adj_solver = adjoint_solver or solver
        self.adjoint_spec = SolveSpec(
            adj_solver,
            adjoint_tol if adjoint_tol is not None else tol / 10,
            adjoint_max_iter if adjoint_max_iter is not None else 2 * max_iter,
            adjoint_stop_mode,
            raise_on_nonconvergence,
            knobs if adj_solver == solver else (),
        )
        # Validate the solver name and its knobs now rather than at the first forward.
        self.solve_spec(lambda z: z * 0.0, torch.zeros(1, 1))
        self.adjoint_spec(lambda z: z * 0.0, torch.zeros(1, 1))
        self.last_stats: SolverStats | None = None
        self.backward_stats: list[SolverStats] = []

    def set_backward(self, backward: str, k: int | None = None) -> None:
        """Switch the backward mode (and phantom steps) of a built layer, e.g. to compare gradients."""
        self.backward_mode = BACKWARDS.get(backward)
        self.backward = backward
        if k is not None:
            if k < 1:
                raise ValueError(f"phantom steps k must be >= 1, got {k}")
            self.k = k

    def _fresh_normalization(self) -> None:
        # Weights written through ``.data`` (gradcheck's perturbations) keep their version counter, so a
        # normalisation cached by an earlier forward could be stale: cache within one forward only.
        for _, m in normalization_layers(self.cell):
            m._cached = None

    def taped_phantom_steps(self, x: Tensor, z0: Tensor, tape: Callable[[Tensor, str], Tensor]) -> Tensor:
        """The phantom backward's layers, made visible: solve without a graph, then K steps
        z ← σ(cell.preactivation(z, x)) with each activation applied by ``tape(u, activation_name)``, which
        records the pre-activation u (curvature propagation needs the layer structure,
        :class:`deqsm.losses.LayeredEnergy`). z_0 = z* is detached, a constant in x. Only ``phantom`` with
        τ = 1 is a finite stack of affine maps and activations; the cell must have ``preactivation`` and
        ``activation`` (as :class:`SoftplusCell`)."""
        if self.backward != "phantom" or self.tau != 1.0:
            raise ValueError("curvature propagation through a DEQ needs backward='phantom' with tau=1 "
                             f"(got backward={self.backward!r}, tau={self.tau}): only the phantom steps form "
                             "a finite stack of affine maps and activations")
        if not hasattr(self.cell, "preactivation"):
            raise TypeError(f"{type(self.cell).__name__} has no preactivation(z, x): its steps cannot be taped")
        self._fresh_normalization()
        with torch.no_grad():
            z, self.last_stats = self.solve_spec(lambda z: self.cell(z, x), z0)
        with held_normalization(self.cell):
            for _ in range(self.k):
                z = tape(self.cell.preactivation(z, x), self.cell.activation)
        return z

    def forward(self, x: Tensor, z0: Tensor) -> Tensor:
        if not torch.is_tensor(x) or not torch.is_tensor(z0):
            raise TypeError("DEQ expects tensors x and z0")
        if z0.shape[0] != x.shape[0]:
            raise ValueError(f"batch sizes differ: x has {x.shape[0]}, z0 has {z0.shape[0]}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("DEQ input contains NaN or Inf values")
        self._fresh_normalization()
        params = {n: p for n, p in self.cell.named_parameters() if p.requires_grad}
        with held_normalization(self.cell):  # one graph-carrying Ŵ per layer for all of this call
            z, stats = self.backward_mode(self, x, z0, params)
        self.last_stats = stats
        return z

    def extra_repr(self) -> str:
        s = self.solve_spec
        return f"solver={s.method}, backward={self.backward}, k={self.k}, tau={self.tau}, tol={s.tol}, max_iter={s.max_iter}"
