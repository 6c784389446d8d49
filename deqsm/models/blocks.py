"""Building blocks shared by the experiment models (DKEF feature nets, NICE coupling nets): an MLP that
is either ``explicit`` (L stacked Softplus layers) or ``deq`` (one weight-tied Softplus layer at its fixed
point, the paper's eq. 5: z* = σ(Ŵ z* + U x + c)), and a :class:`LayerTape` that records the layer
structure curvature propagation needs (:class:`deqsm.losses.LayeredEnergy`).

Both MLPs read out linearly, so with equal width the DEQ has the parameters of an explicit depth-2 net
(one hidden-to-hidden matrix) while being "deep" by iteration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from deqsm.config import DEQSettings
from deqsm.deq import DEQ, SoftplusCell
from deqsm.models.conv import DEQCore, ExplicitCore
from deqsm.registry import Registry

Tensor = torch.Tensor


def _softplus_second(u: Tensor) -> Tensor:
    s = torch.sigmoid(u)
    return s * (1 - s)


# name → (σ, σ''): the elementwise activations our energies are made of.
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "softplus": (F.softplus, _softplus_second),
    "square": (torch.square, lambda u: torch.full_like(u, 2.0)),
    "exp": (torch.exp, torch.exp),
}


class SecondDerivatives:
    """σ''(u) for pre-activations recorded by a :class:`LayerTape`, looked up by tensor identity. Holds
    only ids and activation names, so a model can keep it between calls without keeping the latest
    graph alive (and stays picklable)."""

    def __init__(self) -> None:
        self.kinds: dict[int, str] = {}

    def __call__(self, u: Tensor) -> Tensor:
        try:
            return ACTIVATIONS[self.kinds[id(u)]][1](u)
        except KeyError:
            raise ValueError("this pre-activation was not recorded by the latest energy_layers call") from None


class LayerTape:
    """Records each elementwise activation h = σ(u) of one energy evaluation, in order.

    :class:`deqsm.losses.LayeredEnergy` asks the model for σ''(u) given only u; our energies mix
    activations (Softplus in the nets, a square in Gaussian terms, exp in kernels), so σ'' is looked up
    by the identity of the recorded pre-activation tensor (:attr:`second_derivative`), which is alive
    while the loss that asks runs.
    """

    def __init__(self) -> None:
        self.pre: list[Tensor] = []
        self.post: list[Tensor] = []
        self.second_derivative = SecondDerivatives()

    def __call__(self, u: Tensor, kind: str) -> Tensor:
        h = ACTIVATIONS[kind][0](u)
        self.pre.append(u)
        self.post.append(h)
        self.second_derivative.kinds[id(u)] = kind
        return h


def no_layers_recorded(u: Tensor) -> Tensor:
    raise ValueError("call energy_layers(x) before activation_second_derivative(u)")


class ExplicitMLP(nn.Module):
    """x ↦ W_out h_L + b_out, h_l = Softplus(W_l h_{l−1} + b_l), h_0 = x: ``depth`` hidden layers."""

    def __init__(self, in_dim: int, width: int, out_dim: int, depth: int) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"explicit depth must be >= 1, got {depth}")
        dims = [in_dim] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.readout = nn.Linear(width, out_dim)

    def forward(self, x: Tensor, tape: LayerTape | None = None) -> Tensor:
        h = x
        for layer in self.layers:
            h = F.softplus(layer(h)) if tape is None else tape(layer(h), "softplus")
        return self.readout(h)


class DEQMLP(nn.Module):
    """x ↦ W_out z* + b_out with z* = Softplus(Ŵ z* + U x + c) (the paper's eq. 5; g(y) = U y + c).

    With a tape, the layer structure is that of the phantom steps (:meth:`deqsm.deq.DEQ.taped_phantom_steps`):
    curvature propagation needs ``backward="phantom"`` with τ = 1.
    """

    def __init__(self, in_dim: int, width: int, out_dim: int, *, lam: float = 2.0, norm: str = "frobenius",
                 learn_gain: bool = False, **deq_options) -> None:
        super().__init__()
        self.inject = nn.Linear(in_dim, width)
        self.deq = DEQ(SoftplusCell(width, lam=lam, norm=norm, learn_gain=learn_gain), **deq_options)
        self.readout = nn.Linear(width, out_dim)

    def forward(self, x: Tensor, tape: LayerTape | None = None) -> Tensor:
        u = self.inject(x)
        if tape is None:
            return self.readout(self.deq(u, torch.zeros_like(u)))
        return self.readout(self.deq.taped_phantom_steps(u, torch.zeros_like(u), tape))


@dataclass(frozen=True)
class NetVariant:
    """How a variant builds each kind of network deqsm's models are made of."""

    mlp: Callable[..., nn.Module]  # (in_dim, width, out_dim, *, depth, deq) -> in_dim → out_dim MLP
    conv: Callable[..., nn.Module]  # (channels, *, depth, deq) -> a core u ↦ z on (B, channels, H, W)


# The variant of every network (params.yaml's ``variant``): ``explicit`` stacks ``depth`` layers; ``deq`` is
# one weight-tied layer at its fixed point (``depth`` ignored), solved and differentiated as ``deq`` says.
VARIANTS: Registry[NetVariant] = Registry("network variant")
VARIANTS.register("explicit")(NetVariant(
    mlp=lambda in_dim, width, out_dim, *, depth, deq: ExplicitMLP(in_dim, width, out_dim, depth),
    conv=lambda channels, *, depth, deq: ExplicitCore(channels, depth)))
VARIANTS.register("deq")(NetVariant(
    mlp=lambda in_dim, width, out_dim, *, depth, deq: DEQMLP(in_dim, width, out_dim, lam=deq.lam, norm=deq.norm,
                                                             learn_gain=deq.gain == "learned",
                                                             **deq.layer_options()),
    conv=lambda channels, *, depth, deq: DEQCore(channels, deq)))


def make_net(variant: str, in_dim: int, width: int, out_dim: int, *, depth: int, deq: DEQSettings) -> nn.Module:
    """An MLP ``in_dim → out_dim`` of the given variant (``explicit``: ``depth`` hidden layers; ``deq``)."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return VARIANTS.get(variant).mlp(in_dim, width, out_dim, depth=depth, deq=deq)


def make_conv_core(variant: str, channels: int, *, depth: int, deq: DEQSettings) -> nn.Module:
    """A convolutional core of the given variant (NCSN's: :mod:`deqsm.models.conv`)."""
    return VARIANTS.get(variant).conv(channels, depth=depth, deq=deq)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
