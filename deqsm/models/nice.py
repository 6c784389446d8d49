"""NICE, an additive coupling flow (Dinh et al. 2014), as the paper's section 4.3 trains it by score matching.

x (already dequantised and logit-transformed by data preparation) is permuted (even indices first, then
odd), passed through additive couplings that alternate halves, y_b ← y_b + m_i(y_a), and scaled, y ← e^s ⊙ y.
Couplings have unit Jacobian, so by change of variables the exact log-likelihood is

    log p(x) = log N(f(x); 0, I) + Σ_j s_j,

and the energy E = −log p is normalised. Coupling nets m_i are ``explicit`` (depth L) or ``deq`` (a DEQ
block, 1000 hidden units in the paper). Trained by sm / ssm / ssm_vr / dsm / cp on E, or by maximum
likelihood (the reference).

Curvature propagation applies: E = ½‖y‖² + const is a square after affine maps and the coupling nets'
Softplus layers (for a DEQ coupling, its phantom steps), which :meth:`NICE.energy_layers` records.
Bits/dim of the pixels, accounting for the logit transform, are in :func:`deqsm.metrics.density.bits_per_dim`.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from deqsm.config import DEQSettings
from deqsm.models.blocks import LayerTape, make_net, no_layers_recorded
from deqsm.models.density import DensityEvalOptions, energy_objective, evaluate_density
from deqsm.models.family import ModelFamily

Tensor = torch.Tensor


class NICE(nn.Module):
    """``NICE(dim, nets)``: ``nets[i]`` maps the conditioning half to the updated half (alternating:
    even i updates the second half from the first, odd i the first from the second)."""

    def __init__(self, dim: int, nets: list[nn.Module]) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"NICE needs dim >= 2 to split into halves, got {dim}")
        if not nets:
            raise ValueError("NICE needs at least one coupling")
        self.dim = dim
        self.half = dim // 2
        self.register_buffer("perm", torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)]))
        self.register_buffer("inv_perm", torch.argsort(self.perm))
        self.nets = nn.ModuleList(nets)
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def _couple(self, y: Tensor, i: int, sign: float, tape: LayerTape | None = None) -> Tensor:
        a, b = y[:, :self.half], y[:, self.half:]
        if i % 2 == 0:
            return torch.cat([a, b + sign * self.nets[i](a, tape)], 1)
        return torch.cat([a + sign * self.nets[i](b, tape), b], 1)

    def transform(self, x: Tensor, tape: LayerTape | None = None) -> Tensor:
        """f(x), shape (B, dim); its log-determinant is ``log_scale.sum()`` for every x."""
        y = x.flatten(1)[:, self.perm]
        for i in range(len(self.nets)):
            y = self._couple(y, i, 1.0, tape)
        return y * self.log_scale.exp()

    def inverse(self, y: Tensor) -> Tensor:
        y = y * torch.exp(-self.log_scale)
        for i in reversed(range(len(self.nets))):
            y = self._couple(y, i, -1.0)
        return y[:, self.inv_perm]

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density of x (its logit-space value when data are logit-transformed), shape (B,)."""
        y = self.transform(x)
        return -0.5 * y.pow(2).sum(1) - 0.5 * self.dim * math.log(2 * math.pi) + self.log_scale.sum()

    def forward(self, x: Tensor) -> Tensor:
        """The (normalised) energy −log p(x)."""
        return -self.log_prob(x)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        y = torch.randn(n, self.dim, generator=generator, device=self.log_scale.device)
        return self.inverse(y.to(self.log_scale.dtype))

    def energy_layers(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        tape = LayerTape()
        self._second_derivative = tape.second_derivative
        y = self.transform(x, tape)
        energy = 0.5 * tape(y, "square").sum(1) + 0.5 * self.dim * math.log(2 * math.pi) - self.log_scale.sum()
        return energy, tape.pre, tape.post

    def activation_second_derivative(self, u: Tensor) -> Tensor:
        return getattr(self, "_second_derivative", no_layers_recorded)(u)


def build_nice(dim: int, *, variant: str, width: int, depth: int, deq: DEQSettings, train: Tensor,
               n_couplings: int = 4) -> NICE:
    """NICE with ``n_couplings`` couplings (4 in NICE and the paper) whose nets are of ``variant``."""
    if n_couplings < 1:
        raise ValueError(f"n_couplings must be >= 1, got {n_couplings}")
    half = dim // 2
    sizes = [(half, dim - half) if i % 2 == 0 else (dim - half, half) for i in range(n_couplings)]
    return NICE(dim, [make_net(variant, a, width, b, depth=depth, deq=deq) for a, b in sizes])


FAMILY = ModelFamily("nice", build=build_nice, objective=energy_objective,
                     evaluate=partial(evaluate_density, normalised=True), eval_options=DensityEvalOptions,
                     normalised=True, loss_on_data=True)
