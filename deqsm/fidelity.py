"""Phantom-vs-exact gradient fidelity (the paper's appendix C, done with an exact reference).

For a model containing DEQ layers, the parameter gradient of a loss under the ``phantom`` backward mode
with K steps is compared to the one under the exact, differentiable ``implicit`` mode: cosine similarity
of the update directions and relative error; for energy models also the relative error of the score
s(x) = −∇ₓE(x) itself (phantom steps change the forward output slightly, not only its derivatives).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from deqsm.deq import DEQ
from deqsm.depth import deq_layers
from deqsm.losses import LossOutput

Tensor = torch.Tensor


def _deq_layers(model: nn.Module) -> list[DEQ]:
    layers = [m for _, m in deq_layers(model)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no DEQ layer: gradient fidelity compares DEQ backward modes")
    return layers


def _flat_grad(model: nn.Module, objective: Callable[[nn.Module, Tensor], LossOutput], x: Tensor,
               seed: int) -> Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)  # the same projections / noise for every mode
    loss = objective(model, x).loss
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    # float64: a float32 cosine of long vectors can round past 1
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]).double()


def _score(model: nn.Module, x: Tensor) -> Tensor | None:
    x = x.detach().requires_grad_(True)
    try:
        e = model(x)
    except (TypeError, NotImplementedError):  # not an energy model (a VAE, a noise-conditional score net)
        return None
    if e.dim() != 1 or e.shape[0] != x.shape[0]:
        return None
    return -torch.autograd.grad(e.sum(), x)[0]


@contextmanager
def _restored_backward(layers: list[DEQ]) -> Iterator[None]:
    """Within: switch the layers' backward modes at will; after: each layer's own mode and K again."""
    saved = [(m.backward, m.k) for m in layers]
    try:
        yield
    finally:
        for m, (backward, k) in zip(layers, saved):
            m.set_backward(backward, k)


def gradient_fidelity(model: nn.Module, objective: Callable[[nn.Module, Tensor], LossOutput], x: Tensor,
                      ks: Sequence[int] = (1, 2, 4, 8), seed: int = 0) -> list[dict[str, float]]:
    """One row per K: cosine(phantom-K gradient, exact gradient), their relative error, score error."""
    layers = _deq_layers(model)
    with _restored_backward(layers):
        for m in layers:
            m.set_backward("implicit")
        exact = _flat_grad(model, objective, x, seed)
        exact_score = _score(model, x)
        rows = []
        for k in ks:
            for m in layers:
                m.set_backward("phantom", k)
            g = _flat_grad(model, objective, x, seed)
            row = {"k": float(k),
                   "grad_cosine": float(torch.nn.functional.cosine_similarity(g, exact, dim=0)),
                   "grad_rel_error": float((g - exact).norm() / exact.norm().clamp_min(1e-30))}
            score = _score(model, x) if exact_score is not None else None
            if score is not None:
                row["score_rel_error"] = float((score - exact_score).norm() / exact_score.norm().clamp_min(1e-30))
            rows.append(row)
        return rows


def backward_cosine(model: nn.Module, objective: Callable[[nn.Module, Tensor], LossOutput], x: Tensor,
                    seed: int = 0) -> float:
    """Cosine of the loss's parameter gradient under the DEQ layers' own backward modes (as trained: phantom
    with its K, unroll, or implicit) with the exact implicit one, on the rows ``x``. Layers that all train
    with ``implicit`` compute the exact gradient itself: 1.0 without a second computation."""
    layers = _deq_layers(model)
    if all(m.backward == "implicit" for m in layers):
        return 1.0
    trained = _flat_grad(model, objective, x, seed)
    with _restored_backward(layers):
        for m in layers:
            m.set_backward("implicit")
        exact = _flat_grad(model, objective, x, seed)
    return float(torch.nn.functional.cosine_similarity(trained, exact, dim=0))
