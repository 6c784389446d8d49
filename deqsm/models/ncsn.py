"""Noise-conditional score networks (NCSN, Song & Ermon 2019) with a DEQ core, and their annealed losses.

The network (for small images, e.g. 8×8 digits), ``s(x, σ) = head(z) / σ``:

    h  = stem(x) + e(σ)                      a 3×3 convolution, plus a learned embedding of log σ per channel
    u  = h + conv(softplus(conv(softplus(h))))   the injection g(y): one residual block (the paper's NCSN choice)
    z  = the core, fed u at every step:
         ``deq``      z* = softplus(Ŵ ⋆ z* + u), one weight-tied convolution at its fixed point (the paper's
                      eq. 5 with a convolution for W), solved by a registered solver, differentiated by a
                      registered backward mode (phantom: the paper's Algorithm 1);
         ``explicit`` z_l = softplus(W_l ⋆ z_{l−1} + u), l = 1…L, from z_0 = softplus(u) (the block applied
                      to z = 0, as the DEQ's first iterate): the same block, L untied copies (unnormalised
                      weights, as the paper's baselines).

Output division by σ (the NCSNv2 parameterisation) makes ‖s‖ ∝ 1/σ, as the true score's is.

Well-posedness of the DEQ: for a k×k convolution with zero padding, ‖W ⋆ ·‖₂ ≤ k · ‖W_flat‖₂ ≤ k · ‖W‖_F
(each output pixel sees k² input pixels), so with ``norm`` frobenius / spectral the weight is normalised by
λ · k · ‖W‖ (that norm of the flattened kernel). The bound is loose: a trained 16-channel core normalised so
with λ = 2 measured ‖Ŵ ⋆ ·‖₂ ≈ 0.17 on 8×8 images, a third of the 1/λ = 0.5 it may reach, so the
DEQ was a weak contraction. ``norm: operator`` normalises by the convolution's operator norm itself,
computed exactly for the circular convolution on the image grid enlarged by k − 1
(:func:`conv_operator_norm`), which bounds the zero-padded one: ‖Ŵ ⋆ ·‖₂ ≤ 1/λ with (almost) no slack.
With λ > 1 and the 1-Lipschitz Softplus the cell is a contraction and its fixed point unique.

Losses (:func:`annealed_score_loss`): each sample draws σ from the ladder and x̃ = x + σε.

- ``dsm``: ½‖σ s(x̃, σ) + ε‖² (σ²-weighted DSM; :func:`deqsm.losses.denoising_score_matching`).
- ``ssm`` / ``ssm_vr`` / ``sm``: the σ²-weighted score-matching loss of p_σ at x̃ (annealed SSM of the
  NCSN paper). It is computed by the plain loss of :mod:`deqsm.losses` in the rescaled variable
  u = x̃ / σ, whose score is s_u(u) = σ s(σu, σ): then vᵀ(∂s_u/∂u)v = σ² vᵀ(∂s/∂x̃)v and ½‖s_u‖² = σ² ½‖s‖²,
  so every term picks up exactly the weight σ².
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from deqsm.config import DEQSettings
from deqsm.deq import DEQ, NORMALIZATIONS, CachedNormalization
from deqsm.losses import LOSSES, LossOutput, get_score_loss
from deqsm.registry import Registry

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

    def __init__(self, channels: int, kernel_size: int = 3, *, lam: float = 2.0, norm: str = "frobenius") -> None:
        super().__init__()
        if not lam > 1.0:
            raise ValueError(f"normalisation lambda must be > 1 for a contraction, got {lam}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.lam, self.norm, self.kernel_size = lam, norm, kernel_size
        self._normalize = NORMALIZATIONS.get(norm)
        self.weight = nn.Parameter(torch.empty(channels, channels, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def _size_key(self, size: tuple[int, ...] | None) -> tuple[int, ...] | None:
        return size if self.norm == "operator" else None  # the operator norm depends on the image size

    def _compute(self, size: tuple[int, ...] | None) -> Tensor:
        if self.norm == "operator":
            if size is None:
                raise ValueError("norm 'operator' needs the image size (H, W) the convolution is applied to")
            return self.weight / (self.lam * (conv_operator_norm(self.weight, size) + 1e-6))
        # The factor k makes the flattened-kernel norm bound the operator norm of the convolution.
        return self._normalize(self.weight, self.lam * self.kernel_size)

    def forward(self, z: Tensor) -> Tensor:
        return F.conv2d(z, self.normalized_weight(tuple(z.shape[-2:])), padding=self.kernel_size // 2)


class ConvSoftplusCell(nn.Module):
    """f(z, u) = Softplus(Ŵ ⋆ z + u): the DEQ cell of the NCSN core (a contraction in z)."""

    def __init__(self, channels: int, kernel_size: int = 3, *, lam: float = 2.0, norm: str = "frobenius") -> None:
        super().__init__()
        self.conv = NormalizedConv2d(channels, kernel_size, lam=lam, norm=norm)

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
        self.deq = DEQ(ConvSoftplusCell(channels, lam=deq.lam, norm=deq.norm), **deq.layer_options())

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


NCSN_CORES: Registry[Callable[..., nn.Module]] = Registry("NCSN core")


@NCSN_CORES.register("deq")
def _deq_core(channels: int, *, depth: int, deq: DEQSettings) -> nn.Module:
    return DEQCore(channels, deq)


@NCSN_CORES.register("explicit")
def _explicit_core(channels: int, *, depth: int, deq: DEQSettings) -> nn.Module:
    return ExplicitCore(channels, depth)


class NCSN(nn.Module):
    """s(x, σ) for image batches (B, C, H, W) and noise levels σ of shape (B,) (see the module docstring).

    Args:
        in_channels: image channels.
        channels: feature channels of the core.
        variant: ``deq`` or ``explicit`` (:data:`NCSN_CORES`).
        depth: blocks of the explicit core (ignored by ``deq``).
        deq: solver / backward settings of the DEQ core (default :class:`deqsm.config.DEQSettings`).
    """

    def __init__(self, in_channels: int = 1, channels: int = 32, *, variant: str = "deq", depth: int = 4,
                 deq: DEQSettings | None = None) -> None:
        super().__init__()
        if in_channels < 1 or channels < 1:
            raise ValueError(f"in_channels and channels must be >= 1, got {in_channels}, {channels}")
        self.variant = variant
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.embed = nn.Linear(1, channels)
        self.inject = ResidualBlock(channels)
        self.core = NCSN_CORES.get(variant)(channels, depth=depth, deq=deq or DEQSettings())
        self.head = nn.Conv2d(channels, in_channels, 3, padding=1)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"NCSN expects images (B, C, H, W), got shape {tuple(x.shape)}")
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
        h = self.stem(x) + self.embed(sigma.log().unsqueeze(1))[:, :, None, None]
        z = self.core(self.inject(h))
        return self.head(z) / sigma.view(-1, 1, 1, 1)


def annealed_score_loss(name: str, sigmas: Sequence[float], *, generator: torch.Generator | None = None,
                        **options) -> Callable[[nn.Module, Tensor], LossOutput]:
    """``loss_fn(model, x)`` for a noise-conditional score model ``model(x, σ)``: the σ²-weighted loss
    ``name`` (``dsm``, ``ssm``, ``ssm_vr``, ``sm``) averaged over σ drawn uniformly from ``sigmas`` per sample.

    ``options`` go to the underlying loss (e.g. ``noise``, ``n_particles`` for the sliced losses).
    """
    ladder = [float(s) for s in sigmas]
    if not ladder or any(not s > 0 for s in ladder):
        raise ValueError(f"sigmas must be a non-empty list of positive numbers, got {list(sigmas)}")
    if name == "dsm":
        if "sigma" in options or "sigmas" in options or "noise_conditional" in options:
            raise TypeError("annealed dsm sets sigma / sigmas / noise_conditional itself; do not pass them")
        inner = get_score_loss("dsm", sigmas=ladder, noise_conditional=True, generator=generator, **options)

        def dsm_loss(model: nn.Module, x: Tensor) -> LossOutput:
            return inner(model, x)

        return dsm_loss

    spec = LOSSES.get(name)
    if not spec.on_score:
        raise ValueError(f"loss {name!r} needs an energy model; annealed score losses: dsm, sm, ssm, ssm_vr")
    if generator is not None and name in ("ssm", "ssm_vr"):
        options = {**options, "generator": generator}
    inner = get_score_loss(name, **options)
    table = torch.tensor(ladder)

    def loss_fn(model: nn.Module, x: Tensor) -> LossOutput:
        if x.dim() < 2:
            raise ValueError(f"x must be batched, shape (B, ...), got shape {tuple(x.shape)}")
        x = x.detach()
        batch = x.shape[0]
        draw_on = generator.device if generator is not None else x.device
        idx = torch.randint(0, len(ladder), (batch,), generator=generator, device=draw_on)
        sig = table.to(device=draw_on, dtype=x.dtype)[idx].to(x.device)
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=draw_on).to(x.device)
        shape = (-1, *([1] * (x.dim() - 1)))
        u = (x + sig.view(shape) * eps) / sig.view(shape)

        def rescaled_score(u_: Tensor) -> Tensor:
            # u_ may hold n_particles tiled copies of the batch (deqsm.losses repeats along dim 0).
            s_r = sig.repeat(u_.shape[0] // batch)
            return s_r.view(shape) * model(s_r.view(shape) * u_, s_r)

        return inner(rescaled_score, u)

    loss_fn.__name__ = f"annealed_{name}_loss"
    return loss_fn
