"""How far generated samples are from a reference set, with their uncertainty, on precomputed feature rows.

All functions take feature rows (N, d) (e.g. :func:`deqsm.metrics.fid.image_features`), so the Fréchet
distance, its interval and the KID share one feature space and one pass of the extractor.

- :func:`fd_replicate_interval`: an interval for the FD that a *second, independent* set of generated
  samples of the same size would get against the same reference rows. It is a prediction interval for a
  replicate, not a confidence interval for the population FD: FD estimates at small n carry a large positive
  bias (two sets from one distribution are at FD ≈ tr-terms of order d/n, not 0), and a replicate carries the
  same bias, so only the spread matters. The naive percentile bootstrap of FD(real, fake*) is shifted: a
  resample with replacement holds ≈ 63% distinct rows, so its FD has a larger bias than FD(real, fake) and the
  interval sits above the value it is meant to cover. Here the bias cancels: for a replicate fake', FD' − FD is
  the difference of two i.i.d. draws, whose law is estimated by the differences FD*_a − FD*_b of independent
  bootstrap resamples a ≠ b (same bias, same spread); the interval is FD + their quantiles, clamped at 0.
- :func:`kernel_distance`: the KID (Bińkowski et al. 2018) of torchmetrics' ``KernelInceptionDistance``: the
  unbiased MMD² with the kernel (xᵀy/d + 1)³, averaged over random subsets; unbiased at any n (its mean over
  equal distributions is 0, and it can be negative), unlike the FD.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from deqsm.metrics.fid import GivenFeatures, frechet_distance_of_features

Tensor = torch.Tensor


def _check_rows(name: str, rows: Tensor, min_rows: int = 2) -> None:
    if rows.dim() != 2 or rows.shape[0] < min_rows:
        raise ValueError(f"{name} must be feature rows (N >= {min_rows}, d), got shape {tuple(rows.shape)}")
    if not bool(torch.isfinite(rows).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def _centred_factor(rows: Tensor) -> Tensor:
    """A with Σ = AᵀA for the unbiased covariance Σ of the rows (N, d): the centred rows / √(N − 1)."""
    return (rows - rows.mean(0)) / math.sqrt(rows.shape[0] - 1)


def frechet_to(real: Tensor) -> Callable[[Tensor], float]:
    """``fd(fake)``: the FD between the fixed rows ``real`` (N_r, d) and rows ``fake`` (N_f, d), float64, exact.

    The cross term tr((Σ_r Σ_f)^{1/2}) takes the cheaper of two exact forms: with d <= N_r, the d×d symmetric
    form tr((Σ_r^{1/2} Σ_f Σ_r^{1/2})^{1/2}); with d > N_r (e.g. 2048 Inception features of a few hundred
    images), the nuclear norm of the N_r×N_f matrix A_r A_fᵀ, whose singular values are the square roots of the
    non-zero eigenvalues of Σ_r Σ_f = A_rᵀ A_r A_fᵀ A_f. The real side is factorised once, so a bootstrap over
    the fake rows costs one small decomposition per resample.
    """
    _check_rows("real", real)
    real = real.double()
    mu_r, a_r = real.mean(0), _centred_factor(real)
    tr_r = float(a_r.pow(2).sum())
    gram = real.shape[1] > real.shape[0]
    if not gram:
        vals, vecs = torch.linalg.eigh(a_r.T @ a_r)
        root_r = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T

    def fd(fake: Tensor) -> float:
        if fake.dim() != 2 or fake.shape[1] != real.shape[1] or fake.shape[0] < 2:
            raise ValueError(f"fake must be feature rows (N >= 2, {real.shape[1]}), got shape {tuple(fake.shape)}")
        fake = fake.double().to(real.device)
        a_f = _centred_factor(fake)
        if gram:
            cross = torch.linalg.svdvals(a_r @ a_f.T).sum()
        else:
            cross = torch.linalg.eigvalsh(root_r @ (a_f.T @ a_f) @ root_r).clamp_min(0).sqrt().sum()
        return float((mu_r - fake.mean(0)).pow(2).sum() + tr_r + a_f.pow(2).sum() - 2 * cross)

    return fd


def fd_replicate_interval(real: Tensor, fake: Tensor, *, boots: int = 200, level: float = 0.9,
                          point: float | None = None, generator: torch.Generator | None = None) -> tuple[float, float]:
    """A ``level`` interval for FD(real, fake') of an independent replicate fake' of ``fake`` (same size, same
    source), ``real`` held fixed (see the module docstring): ``point`` + the (1 ∓ level)/2 quantiles of the
    differences FD*_a − FD*_b over all ordered pairs a ≠ b of ``boots`` resamples of the fake rows (with
    replacement, N_f rows each), the lower end clamped at 0.

    Args:
        real, fake: feature rows (N, d).
        boots: bootstrap resamples B (B(B − 1) differences; 200 → 39 800).
        level: the interval's nominal coverage of a replicate's FD.
        point: the FD the interval is centred on (e.g. torchmetrics' value); default: computed here.
        generator: random source of the resamples (CPU).
    """
    if boots < 2:
        raise ValueError(f"boots must be >= 2, got {boots}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    _check_rows("fake", fake)
    fd = frechet_to(real)
    point = fd(fake) if point is None else float(point)
    n = fake.shape[0]
    reps = torch.tensor([fd(fake[torch.randint(0, n, (n,), generator=generator).to(fake.device)])
                         for _ in range(boots)], dtype=torch.float64)
    diffs = (reps[:, None] - reps[None, :])[~torch.eye(boots, dtype=torch.bool)]
    low, high = torch.quantile(diffs, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return max(point + float(low), 0.0), max(point + float(high), 0.0)


@torch.no_grad()
def kernel_distance(real: Tensor, fake: Tensor, *, subsets: int = 100, subset_size: int = 100,
                    seed: int = 0) -> tuple[float, float]:
    """(KID, its std over subsets) of torchmetrics' ``KernelInceptionDistance`` on feature rows (N, d):
    ``subsets`` draws of min(``subset_size``, N_r, N_f) rows of each set without replacement (seeded by
    ``seed``, without touching the global random state), the unbiased MMD² of each, and their mean and std.

    The std is the spread of a KID computed at the subset size, not the standard error of the mean over
    subsets; when both sets have no more rows than the subset size, every subset holds all of them and it is 0.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_rows("real", real)
    _check_rows("fake", fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets must have equal d, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"subsets must be >= 1 and subset_size >= 2, got {subsets}, {subset_size}")
    size = min(subset_size, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():  # torchmetrics warns that it keeps every feature row: that is the point here
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=GivenFeatures(real.shape[1]), subsets=subsets, subset_size=size)
    kid.update(real.double(), real=True)
    kid.update(fake.double().to(real.device), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std)


def sample_distance_metrics(fd_name: str, kid_name: str, test: Tensor, samples: Tensor, reference: Tensor, *,
                            boots: int = 200, level: float = 0.9, kid_subsets: int = 100, kid_subset_size: int = 100,
                            seed: int = 0) -> dict[str, float]:
    """The distances of generated ``samples`` to the ``test`` rows, and of ``reference`` rows (training data,
    as many as samples: the floor a perfect model reaches at that n) to the same test rows, all on feature rows:

    ``<fd_name>`` and ``<fd_name>_train_vs_test`` (torchmetrics' FD), each followed by its ``_ci_low`` /
    ``_ci_high`` (:func:`fd_replicate_interval` at ``level``, ``boots`` resamples; none when ``boots`` is 0),
    then ``<kid_name>``, ``<kid_name>_std`` and ``<kid_name>_train_vs_test`` (:func:`kernel_distance`).
    """
    if samples.shape[0] != reference.shape[0]:
        raise ValueError(f"the reference must have as many rows as the samples (the floor at the same n), got "
                         f"{reference.shape[0]} and {samples.shape[0]}")
    if boots < 0:
        raise ValueError(f"boots must be >= 0 (0: no interval), got {boots}")
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, float] = {}
    for key, rows in ((fd_name, samples), (f"{fd_name}_train_vs_test", reference)):
        out[key] = frechet_distance_of_features(test, rows)
        if boots:
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = fd_replicate_interval(
                test, rows, boots=boots, level=level, point=out[key], generator=gen)
    out[kid_name], out[f"{kid_name}_std"] = kernel_distance(test, samples, subsets=kid_subsets,
                                                            subset_size=kid_subset_size, seed=seed)
    out[f"{kid_name}_train_vs_test"], _ = kernel_distance(test, reference, subsets=kid_subsets,
                                                          subset_size=kid_subset_size, seed=seed)
    return out
