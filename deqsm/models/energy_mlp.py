"""MLP energy networks E(x), explicit (depth L) and DEQ (one weight-tied Softplus layer), the building
block of the paper's comparisons: equal width, the DEQ "deep" by iteration, the explicit net by stacking.

Both expose their layer structure (:class:`deqsm.losses.LayeredEnergy`) so curvature propagation applies.
The readout is linear, E(x) = wᵀ h + b, so all curvature sits in the Softplus activations.
"""
from __future__ import annotations

import torch
from torch import nn

from deqsm.deq import DEQ, SoftplusCell

Tensor = torch.Tensor


def softplus_second_derivative(u: Tensor) -> Tensor:
    sig = torch.sigmoid(u)
    return sig * (1 - sig)


class ExplicitEnergyMLP(nn.Module):
    """E(x) = wᵀ h_L + b, h_l = Softplus(W_l h_{l−1} + b_l), h_0 = x: ``depth`` hidden layers."""

    def __init__(self, in_dim: int, width: int, depth: int) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        dims = [in_dim] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = nn.Softplus()
        self.readout = nn.Linear(width, 1)

    def energy_layers(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        h = x.flatten(1)
        pre, post = [], []
        for layer in self.layers:
            u = layer(h)
            h = self.act(u)
            pre.append(u)
            post.append(h)
        return self.readout(h).squeeze(-1), pre, post

    def activation_second_derivative(self, u: Tensor) -> Tensor:
        return softplus_second_derivative(u)

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        for layer in self.layers:
            h = self.act(layer(h))
        return self.readout(h).squeeze(-1)


class DEQEnergyMLP(nn.Module):
    """E(x) = wᵀ z* + b with z* = Softplus(Ŵ z* + U x + c): one weight-tied layer at its fixed point.

    ``deq_options`` go to :class:`deqsm.deq.DEQ` (solver, backward, k, tau, tol, max_iter, ...).
    """

    def __init__(self, in_dim: int, width: int, *, lam: float = 2.0, norm: str = "frobenius", **deq_options) -> None:
        super().__init__()
        self.width = width
        self.inject = nn.Linear(in_dim, width)
        self.deq = DEQ(SoftplusCell(width, lam=lam, norm=norm), **deq_options)
        self.readout = nn.Linear(width, 1)

    def features(self, x: Tensor) -> Tensor:
        u = self.inject(x.flatten(1))
        return self.deq(u, torch.zeros(u.shape, dtype=u.dtype, device=u.device))

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.features(x)).squeeze(-1)

    def energy_layers(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """The phantom steps are the layers: u_k = Ŵ z_{k−1} + U x + c, z_k = Softplus(u_k) (τ = 1),
        with z_0 = z* detached (a constant in x). Other modes have no finite layer structure."""
        if self.deq.backward != "phantom" or self.deq.tau != 1.0:
            raise ValueError("curvature propagation through a DEQ needs backward='phantom' with tau=1 "
                             f"(got backward={self.deq.backward!r}, tau={self.deq.tau})")
        inj = self.inject(x.flatten(1))
        cell = self.deq.cell
        with torch.no_grad():
            z, stats = self.deq.solve_spec(lambda z: cell(z, inj), torch.zeros_like(inj))
        self.deq.last_stats = stats
        pre, post = [], []
        for _ in range(self.deq.k):
            u = cell.linear(z) + inj
            z = cell.act(u)
            pre.append(u)
            post.append(z)
        return self.readout(z).squeeze(-1), pre, post

    def activation_second_derivative(self, u: Tensor) -> Tensor:
        return softplus_second_derivative(u)
