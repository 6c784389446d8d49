"""Checks shared by the model tests."""
from __future__ import annotations

import torch

from deqsm.losses import get_loss


def assert_one_training_step(net: torch.nn.Module, objective, batch: torch.Tensor) -> None:
    """``objective(net, batch)`` gives a finite loss whose backward reaches some parameter with a non-zero,
    finite gradient (and no parameter with a non-finite one)."""
    out = objective(net, batch)
    out.loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert torch.isfinite(out.loss) and any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


def assert_cp_unbiased(model, x, exact_trace, draws=400, seed=0, max_rel_se=0.05):
    """Curvature propagation's trace estimate is unbiased: ``draws`` one-particle estimates of the batch-mean
    tr ∇ₓs average to ``exact_trace`` within 4 standard errors (set from their own spread, not a fixed
    tolerance); the spread must be small enough for that to say something (se below ``max_rel_se`` |exact|)."""
    gen = torch.Generator().manual_seed(seed)
    loss = get_loss("cp", n_particles=1, generator=gen)
    est = torch.tensor([float(loss(model, x).terms["trace"].detach()) for _ in range(draws)])
    se = float(est.std() / draws**0.5)
    assert abs(float(est.mean()) - exact_trace) < 4 * se, (float(est.mean()), exact_trace, se)
    assert se < max_rel_se * abs(exact_trace), (se, exact_trace)
