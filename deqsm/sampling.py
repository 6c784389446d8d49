"""Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1), the NCSN sampler.

For a noise-conditional score s(x, σ) ≈ ∇ₓ log p_σ(x) (p_σ = the data convolved with N(0, σ²I)) and a
decreasing ladder σ_1 > … > σ_L, each level runs T steps of unadjusted Langevin dynamics

    α_i = ε · σ_i² / σ_L²,     x ← x + (α_i / 2) s(x, σ_i) + √α_i · z,   z ~ N(0, I),

starting from where the previous level stopped. The step size scales with σ_i² so that the
signal-to-noise ratio of the update is the same at every level. Optionally (``denoise=True``, the
"final denoising step" of later NCSN work) the chain's end is moved by one Tweedie step
x + σ_L² s(x, σ_L); it is off by default so that the sampler is the standard algorithm.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch

Tensor = torch.Tensor
NoiseScoreFn = Callable[[Tensor, Tensor], Tensor]


def geometric_sigmas(sigma_max: float, sigma_min: float, levels: int) -> list[float]:
    """The NCSN noise ladder: ``levels`` values from ``sigma_max`` down to ``sigma_min``, geometrically spaced."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if not (sigma_max > 0 and sigma_min > 0):
        raise ValueError(f"sigma_max and sigma_min must be positive, got {sigma_max}, {sigma_min}")
    if sigma_min > sigma_max:
        raise ValueError(f"sigma_min ({sigma_min}) must not exceed sigma_max ({sigma_max})")
    if levels == 1:
        return [float(sigma_max)]
    ratio = math.log(sigma_min / sigma_max) / (levels - 1)
    return [float(sigma_max * math.exp(ratio * i)) for i in range(levels)]


def largest_pairwise_distance(x: Tensor, *, max_rows: int = 5000, seed: int = 0, chunk: int = 1024) -> float:
    """NCSNv2's rule for σ_1 (Song & Ermon 2020, technique 1: σ_1 as large as the largest Euclidean distance
    between two training points, so that the first level can move a sample anywhere on the data): the largest
    distance between two rows of ``x`` (N, ...), flattened, in float64. Exact for N <= ``max_rows``; above, over
    ``max_rows`` rows drawn without replacement (seeded by ``seed``), which can only underestimate it."""
    if x.dim() < 2 or x.shape[0] < 2:
        raise ValueError(f"x must hold at least 2 rows (N, ...), got shape {tuple(x.shape)}")
    if max_rows < 2:
        raise ValueError(f"max_rows must be >= 2, got {max_rows}")
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[0] > max_rows:
        flat = flat[torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows].to(x.device)]
    flat = flat.double()
    return max(float(torch.cdist(flat[i:i + chunk], flat).max()) for i in range(0, flat.shape[0], chunk))


def _check_ladder(sigmas: Sequence[float]) -> list[float]:
    ladder = [float(s) for s in sigmas]
    if not ladder or any(not s > 0 for s in ladder):
        raise ValueError(f"sigmas must be a non-empty list of positive numbers, got {list(sigmas)}")
    if any(b > a for a, b in zip(ladder[:-1], ladder[1:])):
        raise ValueError(f"sigmas must be non-increasing (largest first), got {ladder}")
    return ladder


@torch.no_grad()
def annealed_langevin(
    score_fn: NoiseScoreFn,
    x0: Tensor,
    sigmas: Sequence[float],
    *,
    step_lr: float = 2e-5,
    steps_per_level: int = 100,
    denoise: bool = False,
    clamp: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
    trace_every: int | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Run annealed Langevin dynamics from ``x0``.

    Args:
        score_fn: ``score_fn(x, sigma)`` with ``sigma`` of shape (B,), returning ∇ₓ log p_σ(x), shaped like x.
        x0: the initial batch (NCSN: uniform noise on the data range).
        sigmas: the noise ladder, largest first (the same ladder the model was trained on).
        step_lr: ε, the step size at the smallest σ.
        steps_per_level: T, Langevin steps per noise level.
        denoise: finish with x + σ_L² s(x, σ_L) (off: the standard algorithm).
        clamp: clip the returned samples to this range (only the output; the chain itself is not clipped).
        generator: random source of the Langevin noise.
        trace_every: keep a copy of the chain every this many steps (for pictures of the annealing).

    Returns:
        (samples, trace): the final batch and the recorded intermediate batches (empty without ``trace_every``).
    """
    ladder = _check_ladder(sigmas)
    if not step_lr > 0:
        raise ValueError(f"step_lr must be positive, got {step_lr}")
    if steps_per_level < 1:
        raise ValueError(f"steps_per_level must be >= 1, got {steps_per_level}")
    if not torch.is_tensor(x0) or not x0.is_floating_point() or x0.dim() < 2:
        raise ValueError("x0 must be a floating-point batch of shape (B, ...)")
    x = x0.clone()
    trace: list[Tensor] = []
    sigma_last = ladder[-1]
    count = 0
    for sigma in ladder:
        alpha = step_lr * (sigma / sigma_last) ** 2
        sig = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        for _ in range(steps_per_level):
            score = score_fn(x, sig)
            if score.shape != x.shape:
                raise ValueError(f"score_fn returned shape {tuple(score.shape)} for x of shape {tuple(x.shape)}")
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = x + 0.5 * alpha * score + math.sqrt(alpha) * noise
            count += 1
            if trace_every is not None and count % trace_every == 0:
                trace.append(x.clone())
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError("annealed Langevin diverged (non-finite samples): lower step_lr")
    if denoise:
        sig = torch.full((x.shape[0],), sigma_last, dtype=x.dtype, device=x.device)
        x = x + sigma_last**2 * score_fn(x, sig)
    if clamp is not None:
        x = x.clamp(*clamp)
    return x, trace


def save_image_grid(images: Tensor, path: str | Path, nrow: int = 8, min_size: int = 32) -> Path:
    """Images (B, C, H, W) in [0, 1] → a PNG grid (written atomically), small images upscaled (nearest,
    an integer factor) to at least ``min_size`` pixels so that 8×8 digits are visible."""
    from torchvision.utils import save_image

    path = Path(path)
    scale = max(1, min_size // max(images.shape[-2:]))
    big = torch.nn.functional.interpolate(images.detach().float().cpu().clamp(0, 1), scale_factor=scale, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    save_image(big, str(tmp), nrow=nrow, padding=2, pad_value=0.5)
    tmp.replace(path)
    return path
