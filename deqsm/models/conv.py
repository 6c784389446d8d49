"""Convolutional blocks of the NCSN score network: its DEQ core (one weight-tied, normalised convolution at
its fixed point), the explicit core (L untied copies of the same block) and the residual injection.

Well-posedness of the DEQ: for a k×k convolution with zero padding, ‖W ⋆ ·‖₂ ≤ k · ‖W_flat‖₂ ≤ k · ‖W‖_F
(each output pixel sees k² input pixels), so with ``norm`` frobenius / spectral the weight is normalised by
λ · k · ‖W‖ (that norm of the flattened kernel). The bound is loose: a trained 16-channel core normalised so
with λ = 2 measured ‖Ŵ ⋆ ·‖₂ ≈ 0.17 on 8×8 images, a third of the 1/λ = 0.5 it may reach, so the
DEQ was a weak contraction. ``norm: operator`` normalises by the convolution's operator norm itself,
computed exactly for the circular convolution on the image grid enlarged by k − 1
(:func:`conv_operator_norm`), which bounds the zero-padded one: ‖Ŵ ⋆ ·‖₂ ≤ 1/λ with (almost) no slack.
With λ > 1 and the 1-Lipschitz Softplus the cell is a contraction and its fixed point unique.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from deqsm.config import DEQSettings
from deqsm.deq import DEQ
from deqsm.normalization import NORMALIZATIONS, CachedNormalization

Tensor = torch.Tensor


def conv_operator_norm(weight: Tensor, size: tuple[int, int]) -> Tensor:
    """An upper bound, tight in practice, of ‖W ⋆ ·‖₂ for the 'same' zero-padded convolution (``F.conv2d``
    with padding k // 2) of ``weight`` (C_out, C_in, k, k) on images of ``size`` (H, W), differentiable in
    the weight.

    The zero-padded convolution is a crop of the full linear convolution, which equals the circular one on
    the (H + k − 1) × (W + k − 1) grid (no wrap-around), whose operator norm is exactly the largest σ_max of
    the kernel's C_out × C_in transform over that grid's frequencies."""
    k_h, k_w = weight.shape[-2:]
    grid = (size[0] + k_h - 1, size[1] + k_w - 1)
    spectrum = torch.fft.fft2(weight, s=grid)  # (C_out, C_in, H', W')
    blocks = spectrum.permute(2, 3, 0, 1).reshape(-1, weight.shape[0], weight.shape[1])
    return torch.linalg.matrix_norm(blocks, ord=2).max()


class NormalizedConv2d(CachedNormalization):
    """A bias-free 'same' convolution z ↦ Ŵ ⋆ z with ‖Ŵ ⋆ ·‖₂ ≤ 1/λ: Ŵ = W / (λ k (‖W‖ + ε)) for ``norm``
    frobenius / spectral (a bound through the flattened kernel), W / (λ (‖W ⋆ ·‖₂ + ε)) for ``operator``
    (:func:`conv_operator_norm` on the input's image size)."""

    def __init__(self, channels: int, kernel_size: int = 3, *, lam: float = 2.0, norm: str = "frobenius",
                 learn_gain: bool = False) -> None:
        super().__init__()
        if not lam > 1.0:
            raise ValueError(f"normalisation lambda must be > 1 for a contraction, got {lam}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.lam, self.norm, self.kernel_size = lam, norm, kernel_size
        self._normalize = NORMALIZATIONS.get(norm)
        self.weight = nn.Parameter(torch.empty(channels, channels, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self._init_gain(learn_gain)

    def _size_key(self, size: tuple[int, ...] | None) -> tuple[int, ...] | None:
        return size if self.norm == "operator" else None  # the operator norm depends on the image size

    def _compute(self, size: tuple[int, ...] | None) -> Tensor:
        learned = self.gain_logit is not None  # γ = sigmoid(g) / λ instead of 1/λ (CachedNormalization)
        if self.norm == "operator":
            if size is None:
                raise ValueError("norm 'operator' needs the image size (H, W) the convolution is applied to")
            if learned:
                return self.weight / (conv_operator_norm(self.weight, size) + 1e-6) * self.gain()
            return self.weight / (self.lam * (conv_operator_norm(self.weight, size) + 1e-6))
        # The factor k makes the flattened-kernel norm bound the operator norm of the convolution.
        if learned:
            return self._normalize(self.weight, self.kernel_size) * self.gain()
        return self._normalize(self.weight, self.lam * self.kernel_size)

    def operator_norm(self, size: tuple[int, ...] | None = None) -> Tensor:
        """‖Ŵ ⋆ ·‖₂ on images of ``size`` (H, W): :func:`conv_operator_norm` of the normalised kernel."""
        if size is None or len(size) != 2:
            raise ValueError(f"a convolution's operator norm needs the image size (H, W), got {size}")
        return conv_operator_norm(self.normalized_weight(size), size)

    def forward(self, z: Tensor) -> Tensor:
        return F.conv2d(z, self.normalized_weight(tuple(z.shape[-2:])), padding=self.kernel_size // 2)


class ConvSoftplusCell(nn.Module):
    """f(z, u) = Softplus(Ŵ ⋆ z + u): the DEQ cell of the NCSN core (a contraction in z)."""

    def __init__(self, channels: int, kernel_size: int = 3, *, lam: float = 2.0, norm: str = "frobenius",
                 learn_gain: bool = False) -> None:
        super().__init__()
        self.conv = NormalizedConv2d(channels, kernel_size, lam=lam, norm=norm, learn_gain=learn_gain)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        return F.softplus(self.conv(z) + u)


class ResidualBlock(nn.Module):
    """h + conv(softplus(conv(softplus(h)))): the injection g(y) of the NCSN core."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.conv2(F.softplus(self.conv1(F.softplus(h))))


class DEQCore(nn.Module):
    """z* = Softplus(Ŵ ⋆ z* + u) by a :class:`deqsm.deq.DEQ` (solver and backward mode from ``deq``)."""

    def __init__(self, channels: int, deq: DEQSettings) -> None:
        super().__init__()
        self.deq = DEQ(ConvSoftplusCell(channels, lam=deq.lam, norm=deq.norm, learn_gain=deq.gain == "learned"),
                       **deq.layer_options())

    def forward(self, u: Tensor) -> Tensor:
        return self.deq(u, torch.zeros_like(u))


class ExplicitCore(nn.Module):
    """z_l = Softplus(W_l ⋆ z_{l−1} + u), l = 1…depth, z_0 = Softplus(u): the DEQ's block, untied and
    unnormalised (starting from z = 0 would leave W_1 without effect or gradient)."""

    def __init__(self, channels: int, depth: int) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"explicit depth must be >= 1, got {depth}")
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(depth))

    def forward(self, u: Tensor) -> Tensor:
        z = F.softplus(u)
        for conv in self.convs:
            z = F.softplus(conv(z) + u)
        return z
