"""Generated densities whose true log-density and score are known: a d-dimensional Gaussian and Gaussian
mixtures (2-D toys — grid, rings, moons — and d-dimensional random mixtures).

Every mixture is a mixture of isotropic Gaussians, so the manifest's ``info.true_density`` (family,
weights, means, standard deviations; for the Gaussian its mean and covariance) fully determines
log p and ∇ₓ log p (:func:`deqsm.data.store.true_density` rebuilds it as a torch distribution).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from deqsm.data.base import DATASETS, SPLITS, Context, DatasetSpec, Prepared


class GeneratedSpec(DatasetSpec):
    n_train: int = Field(5000, ge=1)
    n_val: int = Field(1000, ge=1)
    n_test: int = Field(1000, ge=1)
    dtype: Literal["float32", "float64"] = "float32"

    def package(self, x: np.ndarray, labels: np.ndarray | None, true_density: dict) -> Prepared:
        """Cut iid samples into splits, in that order."""
        bounds = np.cumsum([0, self.n_train, self.n_val, self.n_test])
        cut = {s: slice(bounds[i], bounds[i + 1]) for i, s in enumerate(SPLITS)}
        return Prepared(x={s: x[c].astype(self.dtype) for s, c in cut.items()},
                        y=None if labels is None else {s: labels[c].astype(np.int64) for s, c in cut.items()},
                        columns=[f"x{i}" for i in range(x.shape[1])], info={"true_density": true_density})

    @property
    def n_total(self) -> int:
        return self.n_train + self.n_val + self.n_test


@DATASETS.register("gaussian")
class Gaussian(GeneratedSpec):
    """N(μ, Σ) in ``dim`` dimensions: Σ is the identity or a random rotation of eigenvalues spaced
    geometrically from 1 down to 1/condition."""

    dim: int = Field(2, ge=1)
    mean: list[float] | None = Field(None, description="μ (length dim); null: zeros")
    covariance: Literal["identity", "random"] = "random"
    condition: float = Field(10.0, ge=1, description="max/min eigenvalue of a random covariance")

    @model_validator(mode="after")
    def _mean_length(self) -> "Gaussian":
        if self.mean is not None and len(self.mean) != self.dim:
            raise ValueError(f"mean has {len(self.mean)} entries, dim is {self.dim}")
        return self

    def load(self, ctx: Context) -> Prepared:
        rng = ctx.rng(1)
        mean = np.zeros(self.dim) if self.mean is None else np.asarray(self.mean, np.float64)
        if self.covariance == "identity":
            cov = np.eye(self.dim)
        else:
            q, r = np.linalg.qr(rng.standard_normal((self.dim, self.dim)))
            q *= np.sign(np.diag(r))  # a Haar-distributed rotation
            cov = (q * np.geomspace(1.0, 1.0 / self.condition, self.dim)) @ q.T
            cov = (cov + cov.T) / 2
        x = mean + rng.standard_normal((self.n_total, self.dim)) @ np.linalg.cholesky(cov).T
        return self.package(x, None, {"family": "gaussian", "mean": mean.tolist(), "covariance": cov.tolist()})


@DATASETS.register("mixture")
class Mixture(GeneratedSpec):
    """An equal-weight mixture of isotropic Gaussians (std ``std``) whose means form a shape:
    grid (grid_size² points, unit spacing), rings (ring k of radius k holds k·ring_components means),
    moons (two interleaved half circles as in scikit-learn's make_moons, arc_components means each),
    gaussians (n_components means ~ N(0, spread² I) in ``dim`` dimensions). Labels: the component."""

    shape: Literal["grid", "rings", "moons", "gaussians"] = "rings"
    std: float = Field(0.1, gt=0)
    dim: int = Field(2, ge=1, description="only for shape: gaussians; the 2-D shapes need 2")
    grid_size: int = Field(5, ge=1)
    rings: int = Field(3, ge=1)
    ring_components: int = Field(8, ge=1)
    arc_components: int = Field(16, ge=2)
    n_components: int = Field(8, ge=1)
    spread: float = Field(3.0, gt=0)

    @model_validator(mode="after")
    def _planar(self) -> "Mixture":
        if self.shape != "gaussians" and self.dim != 2:
            raise ValueError(f"shape {self.shape!r} is 2-D: dim must be 2 (got {self.dim})")
        return self

    def means(self, rng: np.random.Generator) -> np.ndarray:
        if self.shape == "grid":
            ticks = np.arange(self.grid_size) - (self.grid_size - 1) / 2
            return np.stack(np.meshgrid(ticks, ticks, indexing="ij"), -1).reshape(-1, 2)
        if self.shape == "rings":
            parts = []
            for k in range(1, self.rings + 1):
                angle = 2 * np.pi * np.arange(k * self.ring_components) / (k * self.ring_components)
                parts.append(k * np.stack([np.cos(angle), np.sin(angle)], 1))
            return np.concatenate(parts)
        if self.shape == "moons":
            t = np.linspace(0, np.pi, self.arc_components)
            outer = np.stack([np.cos(t), np.sin(t)], 1)
            inner = np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1)
            return np.concatenate([outer, inner]) - [0.5, 0.25]
        return self.spread * rng.standard_normal((self.n_components, self.dim))

    def load(self, ctx: Context) -> Prepared:
        rng = ctx.rng(1)
        means = self.means(rng)
        k = len(means)
        labels = rng.integers(0, k, self.n_total)
        x = means[labels] + self.std * rng.standard_normal((self.n_total, means.shape[1]))
        return self.package(x, labels, {"family": "gaussian_mixture", "weights": [1.0 / k] * k,
                                        "means": means.tolist(), "stds": [self.std] * k})
