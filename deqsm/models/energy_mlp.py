"""MLP energy networks E(x), explicit (depth L) and DEQ (one weight-tied Softplus layer), the building
block of the paper's comparisons: equal width, the DEQ "deep" by iteration, the explicit net by stacking.

Both are the nets of :mod:`deqsm.models.blocks` with a scalar readout, E(x) = wᵀ h + b, so all curvature
sits in the Softplus activations; both expose their layer structure (:class:`deqsm.losses.LayeredEnergy`,
recorded by a :class:`~deqsm.models.blocks.LayerTape`) so curvature propagation applies.
"""
from __future__ import annotations

import torch
from torch import nn

from deqsm.config import DEQSettings
from deqsm.deq import DEQ
from deqsm.models.blocks import ACTIVATIONS, DEQMLP, ExplicitMLP, LayerTape, make_net
from deqsm.models.density import DensityEvalOptions, energy_objective, evaluate_density
from deqsm.models.family import ModelFamily

Tensor = torch.Tensor


class EnergyMLP(nn.Module):
    """E(x) = net(x) for an MLP ``net`` with one output (inputs flattened)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    @property
    def deq(self) -> DEQ | None:
        """The DEQ layer of a DEQ net (its solver stats, backward mode), else None."""
        return getattr(self.net, "deq", None)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1)).squeeze(-1)

    def energy_layers(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """E(x) with every pre-activation and activation in order (a DEQ: its phantom steps)."""
        tape = LayerTape()
        energy = self.net(x.flatten(1), tape).squeeze(-1)
        return energy, tape.pre, tape.post

    def activation_second_derivative(self, u: Tensor) -> Tensor:
        return ACTIVATIONS["softplus"][1](u)  # every activation of these nets is a Softplus


class ExplicitEnergyMLP(EnergyMLP):
    """E(x) = wᵀ h_L + b, h_l = Softplus(W_l h_{l−1} + b_l), h_0 = x: ``depth`` hidden layers."""

    def __init__(self, in_dim: int, width: int, depth: int) -> None:
        super().__init__(ExplicitMLP(in_dim, width, 1, depth))


class DEQEnergyMLP(EnergyMLP):
    """E(x) = wᵀ z* + b with z* = Softplus(Ŵ z* + U x + c): one weight-tied layer at its fixed point.

    ``deq_options`` go to :class:`deqsm.deq.DEQ` (solver, backward, k, tau, tol, max_iter, ...).
    """

    def __init__(self, in_dim: int, width: int, *, lam: float = 2.0, norm: str = "frobenius", **deq_options) -> None:
        super().__init__(DEQMLP(in_dim, width, 1, lam=lam, norm=norm, **deq_options))


def build_energy_mlp(dim: int, *, variant: str, width: int, depth: int, deq: DEQSettings, train: Tensor) -> EnergyMLP:
    """The benchmark energy MLP of the variant (unnormalised)."""
    return EnergyMLP(make_net(variant, dim, width, 1, depth=depth, deq=deq))


FAMILY = ModelFamily("energy_mlp", build=build_energy_mlp, objective=energy_objective, evaluate=evaluate_density,
                     eval_options=DensityEvalOptions, loss_on_data=True)
