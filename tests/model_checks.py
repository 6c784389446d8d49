"""Checks shared by the model tests."""
from __future__ import annotations

import torch


def assert_one_training_step(net: torch.nn.Module, objective, batch: torch.Tensor) -> None:
    """``objective(net, batch)`` gives a finite loss whose backward reaches some parameter with a non-zero,
    finite gradient (and no parameter with a non-finite one)."""
    out = objective(net, batch)
    out.loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert torch.isfinite(out.loss) and any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
