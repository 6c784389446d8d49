"""Importance-sampling proposals for log Z of an unnormalised density (:func:`deqsm.metrics.density.
importance_log_normaliser`): exact densities that can be sampled, in float64 on the CPU (draws that do not
depend on the device the model runs on).

- :class:`GaussianProposal`: the broad N(0, s² I) of the paper (s = 2 on whitened data). It knows nothing of
  the model, so a model whose mass sits in a small part of its support gets few useful samples.
- :class:`DefensiveKDEProposal`: (1 − w) · KDE + w · N(0, s² I), a Gaussian kernel density estimate on rows
  where the model's mass is expected (its training rows: the model was fit to them) made *defensive*
  (Hesterberg 1995) by the broad Gaussian: wherever the KDE misses mass, q ≥ w · N(0, s² I), so the weights
  p̃/q stay within 1/w of those of the broad proposal alone.
- :func:`kde_centres`: the kernels' centres, a subset of the training rows. The bandwidth is chosen with
  the model (:func:`deqsm.metrics.density.pilot_bandwidth`), among multiples of :func:`scott_factor`.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch

Tensor = torch.Tensor

# Kernel bandwidths a pilot run compares, as multiples of Scott's factor n^(−1/(d+4)): from far narrower than
# the data's spread (a sharp model of clustered data) to about that of the broad proposal.
SCOTT_MULTIPLES = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0)
_PAIRS_PER_CHUNK = 1 << 22  # (row, centre) pairs per chunk of a KDE log-density: bounds its memory


class Proposal(Protocol):
    """An exact, samplable density in R^dim: ``sample`` → (n, dim) float64, ``log_prob`` → (n,) float64."""

    dim: int

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...

    def log_prob(self, x: Tensor) -> Tensor: ...


class GaussianProposal:
    """N(0, scale² I) in R^dim."""

    def __init__(self, dim: int, scale: float = 2.0) -> None:
        if dim < 1:
            raise ValueError(f"the proposal dimension must be >= 1, got {dim}")
        if not scale > 0:
            raise ValueError(f"the proposal scale must be positive, got {scale}")
        self.dim, self.scale = dim, float(scale)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.scale * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)

    def log_prob(self, x: Tensor) -> Tensor:
        x = x.double().flatten(1)
        return (-0.5 * (x / self.scale).pow(2).sum(1) - self.dim * math.log(self.scale)
                - 0.5 * self.dim * math.log(2 * math.pi))


class _KDE:
    """(1/n) Σ_i N(x; c_i, h² Σ) with Σ = L Lᵀ the centres' covariance (plus a small jitter, so that it is
    positive definite even for n ≤ dim): kernels shaped like the data, scaled by the bandwidth factor h."""

    def __init__(self, centres: Tensor, bandwidth: float) -> None:
        if centres.dim() != 2 or centres.shape[0] < 2:
            raise ValueError(f"a kernel density estimate needs >= 2 rows of shape (n, dim), got {tuple(centres.shape)}")
        if not bandwidth > 0:
            raise ValueError(f"the kernel bandwidth must be positive, got {bandwidth}")
        c = centres.double()
        d = c.shape[1]
        cov = torch.atleast_2d(torch.cov(c.t()))
        jitter = 1e-6 * float(cov.diagonal().mean().clamp_min(1e-12))
        self.chol = torch.linalg.cholesky(cov + jitter * torch.eye(d, dtype=torch.float64))
        self.centres, self.bandwidth, self.dim = c, float(bandwidth), d
        self._white_centres = self._whiten(c)
        self._log_norm = (-math.log(c.shape[0]) - d * math.log(self.bandwidth)
                          - float(self.chol.diagonal().log().sum()) - 0.5 * d * math.log(2 * math.pi))

    def _whiten(self, x: Tensor) -> Tensor:
        """L⁻¹ x per row, divided by h: the kernels' squared distance is then Euclidean."""
        return torch.linalg.solve_triangular(self.chol, x.t(), upper=False).t() / self.bandwidth

    def sample_at(self, index: Tensor, eps: Tensor) -> Tensor:
        """Kernel draws c_index + h L ε for standard normal ε."""
        return self.centres[index] + self.bandwidth * eps @ self.chol.t()

    def log_prob(self, x: Tensor) -> Tensor:
        u = self._whiten(x.double().flatten(1))
        rows = max(1, _PAIRS_PER_CHUNK // self._white_centres.shape[0])
        parts = [torch.logsumexp(-0.5 * torch.cdist(chunk, self._white_centres).pow(2), 1)
                 for chunk in u.split(rows)]
        return torch.cat(parts) + self._log_norm


class DefensiveKDEProposal:
    """(1 − defensive_weight) · KDE(centres, bandwidth) + defensive_weight · N(0, scale² I).

    The KDE's kernels are N(c_i, h² Σ) with Σ the centres' covariance; ``bandwidth`` is h (a factor, not a
    length). What it is not: a fit of the *model*: it follows the data the model was trained on, and the
    broad component is what keeps the weights bounded where model and data disagree.
    """

    def __init__(self, centres: Tensor, bandwidth: float, *, scale: float = 2.0, defensive_weight: float = 0.1) -> None:
        if not 0 < defensive_weight < 1:
            raise ValueError(f"the defensive weight must be in (0, 1), got {defensive_weight}")
        self.kde = _KDE(centres.flatten(1), bandwidth)
        self.dim = self.kde.dim
        self.broad = GaussianProposal(self.dim, scale)
        self.defensive_weight = float(defensive_weight)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        broad = torch.rand(n, generator=generator, dtype=torch.float64) < self.defensive_weight
        index = torch.randint(0, self.kde.centres.shape[0], (n,), generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return torch.where(broad[:, None], self.broad.scale * eps, self.kde.sample_at(index, eps))

    def log_prob(self, x: Tensor) -> Tensor:
        return torch.logaddexp(math.log(self.defensive_weight) + self.broad.log_prob(x),
                               math.log1p(-self.defensive_weight) + self.kde.log_prob(x))


def scott_factor(n: int, dim: int) -> float:
    """Scott's rule for a KDE with the data's covariance: h = n^(−1/(d+4))."""
    return n ** (-1.0 / (dim + 4))


def kde_centres(train: Tensor, max_rows: int = 2000, seed: int = 0) -> Tensor:
    """Up to ``max_rows`` training rows (a seeded random subset; the KDE's cost grows with its centres),
    flattened, float64 on the CPU."""
    if max_rows < 2:
        raise ValueError(f"the data proposal needs >= 2 kernel centres, got max_rows = {max_rows}")
    rows = train.flatten(1).double().cpu()
    if rows.shape[0] > max_rows:
        rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]]
    return rows
