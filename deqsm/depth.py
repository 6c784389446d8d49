"""Effective depth of a model's DEQ layers, measured at their fixed points.

A DEQ layer z* = f(z*, x) is a deep network only when f is far from a constant map in z: with a weak
contraction (‖∂f/∂z‖ ≪ 1) the solver stops after a few iterations and z* is, within a few per cent, one
application of the cell, f(z₀, x) — a one-hidden-layer net. For each DEQ layer of a model this measures:

- ``contraction``: the local Lipschitz constant of z ↦ f(z, x) at z*, ‖∂f/∂z(z*, x)‖₂, by power iteration on
  JᵀJ (two vector-Jacobian products per iteration, never the dense Jacobian), per row of the batch, then averaged over rows;
- ``weight_norm``: the normalised weight's spectral norm ‖Ŵ‖₂ (a convolution's operator norm on the images it
  is applied to: :meth:`deqsm.normalization.CachedNormalization.operator_norm`). Softplus is 1-Lipschitz, so
  the contraction is at most this (equal in the linear regime, where Softplus' slope is near 1);
- ``iterations``: forward solver iterations to the layer's tolerance from its usual start z₀;
- ``depth_gain``: ‖z* − f(z₀, x)‖ / ‖z*‖ per row, averaged: how far the equilibrium is from one cell step
  (0: the DEQ is a one-layer net);
- ``grad_cosine`` (whole model, :func:`effective_depth` and :func:`grad_cosine`): cosine of the loss's parameter
  gradient under the layers' own backward mode with the exact implicit one
  (:func:`deqsm.fidelity.backward_cosine`).

Every cell here acts on each batch row (each image) independently, which the per-row power iteration assumes.
The layers' inputs (x, z₀) are those of one evaluation of the model's objective on the given rows, recorded by
forward pre-hooks (:func:`record_layer_inputs`), so any model family is measured the same way.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from deqsm.deq import DEQ
from deqsm.normalization import CachedNormalization

Tensor = torch.Tensor
Objective = Callable[[nn.Module, Tensor], Any]

# Keys of :func:`effective_depth` (and, but for the cosine, of :func:`depth_probe`), as they appear in metrics.
DEPTH_KEYS = ("deq_contraction", "deq_weight_norm", "deq_iterations", "deq_depth_gain", "deq_grad_cosine")


def deq_layers(model: nn.Module) -> list[tuple[str, DEQ]]:
    """The model's DEQ layers with their module names (empty for an explicit model)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DEQ)]


def _row_norms(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1)


def _per_row(scale: Tensor, like: Tensor) -> Tensor:
    return scale.view(-1, *([1] * (like.dim() - 1)))


def local_lipschitz(f: Callable[[Tensor], Tensor], z: Tensor, iters: int = 30, seed: int = 0) -> Tensor:
    """‖∂f/∂z‖₂ at ``z``, per row of the batch (shape (B,)), by ``iters`` power iterations on JᵀJ: v ← JᵀJv /
    ‖JᵀJv‖, then σ = ‖Jv‖. ``f`` must map each row on its own (a block-diagonal Jacobian). Power iteration
    approaches σ_max from below; 30 iterations from a random start (seeded) are plenty for the gaps seen
    here."""
    if iters < 1:
        raise ValueError(f"power iterations must be >= 1, got {iters}")
    gen = torch.Generator(device=z.device).manual_seed(seed)
    v = torch.randn(z.shape, generator=gen, dtype=z.dtype, device=z.device)
    v = v / _per_row(_row_norms(v).clamp_min(1e-30), v)
    with torch.enable_grad():
        # Reverse mode only (forward-mode AD costs seconds of set-up per process): Jᵀu is linear in u, and its
        # VJP with v is Jv (the "double-backward" trick).
        z = z.detach().requires_grad_(True)
        fz = f(z)
        u = torch.zeros_like(fz, requires_grad=True)
        (jt_u,) = torch.autograd.grad(fz, z, u, create_graph=True)
        for i in range(iters + 1):
            (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)
            if i == iters:
                break
            (jtjv,) = torch.autograd.grad(fz, z, jv, retain_graph=True)
            norms = _row_norms(jtjv)
            if not bool(torch.isfinite(norms).all()):
                raise FloatingPointError("power iteration on the DEQ cell's Jacobian produced non-finite values")
            v = jtjv / _per_row(norms.clamp_min(1e-30), jtjv)
    return _row_norms(jv).detach()


def record_layer_inputs(model: nn.Module, run: Callable[[], Any],
                        max_rows: int = 256) -> dict[str, tuple[Tensor, Tensor]]:
    """``run()`` with a forward pre-hook on every DEQ layer of ``model``: per layer name, the (x, z₀) it was
    called with (detached; several calls' rows concatenated, at most ``max_rows`` rows)."""
    seen: dict[str, list[tuple[Tensor, Tensor]]] = {}
    handles = []
    for name, layer in deq_layers(model):
        def hook(module, args, name=name):
            x, z0 = args[0], args[1]
            calls = seen.setdefault(name, [])
            rows = sum(c[0].shape[0] for c in calls)
            if rows < max_rows and (not calls or x.shape[1:] == calls[0][0].shape[1:]):
                calls.append((x.detach()[:max_rows - rows], z0.detach()[:max_rows - rows]))
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {name: (torch.cat([x for x, _ in calls]), torch.cat([z for _, z in calls])) for name, calls in seen.items()}


def layer_depth(layer: DEQ, x: Tensor, z0: Tensor, *, power_iters: int = 30, seed: int = 0) -> dict[str, float]:
    """The effective depth of one DEQ layer at inputs (x, z₀): contraction, weight_norm, iterations, depth_gain
    and converged (1.0 when every row met the layer's tolerance); see the module docstring."""
    layer._fresh_normalization()
    with torch.no_grad():
        z_star, stats = layer.solve_spec(lambda z: layer.cell(z, x), z0)
        one_step = layer.cell(z0, x)
        gain = (_row_norms(z_star - one_step) / _row_norms(z_star).clamp_min(1e-30)).mean()
    sigma = local_lipschitz(lambda z: layer.cell(z, x), z_star, power_iters, seed)
    size = tuple(x.shape[2:]) or None  # images: the spatial size the convolution's operator norm is taken on
    with torch.no_grad():
        norms = [float(m.operator_norm(size)) for m in layer.cell.modules() if isinstance(m, CachedNormalization)]
    out = {"contraction": float(sigma.mean()), "iterations": float(stats.nstep), "depth_gain": float(gain),
           "converged": float(stats.converged)}
    if norms:
        out["weight_norm"] = max(norms)
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@contextmanager
def _as_trained(model: nn.Module, x: Tensor, seed: int) -> Iterator[None]:
    """Within: ``model`` in training mode (the objective the DEQ is trained by: a VAE's evaluation-mode objective
    is its bound, which never calls the score network) and the random state seeded by ``seed``; after: the
    model's mode and the caller's random state as they were."""
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield
    finally:
        model.train(was_training)


def depth_probe(model: nn.Module, objective: Objective, x: Tensor, *, power_iters: int = 30,
                seed: int = 0) -> dict[str, float]:
    """``deq_contraction``, ``deq_weight_norm``, ``deq_iterations`` and ``deq_depth_gain`` of ``model``'s DEQ
    layers (each the mean over layers) at the inputs they receive when ``objective`` is evaluated on ``x``;
    ``{}`` for a model without DEQ layers. Cheap enough for every evaluation during training (one objective
    evaluation, one solve and ``power_iters`` pairs of VJPs of one cell per layer). The objective's own random
    draws use ``seed`` and leave the caller's random state as it was. It runs in training mode, as the DEQ is
    trained (a VAE's evaluation-mode objective is its bound, which never calls the score network); the model's
    mode is restored."""
    layers = dict(deq_layers(model))
    if not layers:
        return {}
    with _as_trained(model, x, seed):
        inputs = record_layer_inputs(model, lambda: objective(model, x))
        per_layer = [layer_depth(layers[name], xi, zi, power_iters=power_iters, seed=seed)
                     for name, (xi, zi) in inputs.items()]
    if not per_layer:
        return {}
    out = {f"deq_{k}": _mean([d[k] for d in per_layer]) for k in ("contraction", "iterations", "depth_gain")}
    norms = [d["weight_norm"] for d in per_layer if "weight_norm" in d]
    if norms:
        out["deq_weight_norm"] = _mean(norms)
    return out


def grad_cosine(model: nn.Module, objective: Objective, x: Tensor, *, seed: int = 0) -> float:
    """:func:`deqsm.fidelity.backward_cosine` on the rows ``x`` in training mode (see :func:`depth_probe`), with the
    objective's draws from ``seed`` and the caller's random state and the model's mode left as they were."""
    from deqsm.fidelity import backward_cosine

    with _as_trained(model, x, seed):
        return backward_cosine(model, objective, x, seed=seed)


def effective_depth(model: nn.Module, objective: Objective, x: Tensor, *, grad_rows: int = 64, power_iters: int = 30,
                    seed: int = 0) -> dict[str, float]:
    """:func:`depth_probe` on the rows ``x`` and ``deq_grad_cosine`` on the first ``grad_rows`` of them: every
    key of :data:`DEPTH_KEYS` for a model with DEQ layers, ``{}`` for one without."""
    out = depth_probe(model, objective, x, power_iters=power_iters, seed=seed)
    if out:
        out["deq_grad_cosine"] = grad_cosine(model, objective, x[:grad_rows], seed=seed)
    return out
