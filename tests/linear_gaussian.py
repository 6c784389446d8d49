"""A tractable latent-variable model for the ELBO and IW-bound tests: p(z) = N(0, I_d), p(x|z) = N(Wz + b, s² I_D),
so p(x) = N(b, WWᵀ + s²I) and the posterior p(z|x) = N(μ(x), (I + WᵀW / s²)⁻¹) are known exactly."""
from __future__ import annotations

import math

import torch

from deqsm.metrics.elbo import GaussianProposal

LOG_2PI = math.log(2 * math.pi)


class LinearGaussian:
    def __init__(self, d: int = 2, big_d: int = 3, s: float = 0.5, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.d, self.big_d, self.s = d, big_d, s
        self.w = torch.randn(big_d, d, generator=g, dtype=torch.float64)
        self.b = torch.randn(big_d, generator=g, dtype=torch.float64)
        eye = torch.eye(d, dtype=torch.float64)
        self.post_cov = torch.linalg.inv(eye + self.w.T @ self.w / s**2)
        self.post_chol = torch.linalg.cholesky(self.post_cov)

    def data(self, n: int, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.d, generator=g, dtype=torch.float64)
        return z @ self.w.T + self.b + self.s * torch.randn(n, self.big_d, generator=g, dtype=torch.float64)

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.w @ self.w.T + self.s**2 * torch.eye(self.big_d, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)

    def post_mean(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b) @ self.w / self.s**2 @ self.post_cov.T

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        mean = z @ self.w.T + self.b
        return (-0.5 * ((x.unsqueeze(1) - mean) ** 2).sum(-1) / self.s**2
                - 0.5 * self.big_d * math.log(2 * math.pi * self.s**2))

    def implicit_encoder(self, mean_scale: float, noise_scale: float):
        """An implicit sampler z = mean_scale · μ_post(x) + noise_scale · L ε (a Gaussian q we know)."""
        def sampler(x: torch.Tensor, n: int) -> torch.Tensor:
            eps = torch.randn(x.shape[0], n, self.d, dtype=torch.float64)
            return (mean_scale * self.post_mean(x)).unsqueeze(1) + noise_scale * eps @ self.post_chol.T
        return sampler

    def sheared_encoder(self, shear: float):
        """An implicit sampler with the posterior's mean and a sheared covariance L S Sᵀ Lᵀ (S = I + shear on
        the upper off-diagonal): wider along some directions, with the wrong correlations."""
        s_mat = torch.eye(self.d, dtype=torch.float64) + shear * torch.triu(torch.ones(self.d, self.d, dtype=torch.float64), 1)
        chol = self.post_chol @ s_mat

        def sampler(x: torch.Tensor, n: int) -> torch.Tensor:
            eps = torch.randn(x.shape[0], n, self.d, dtype=torch.float64)
            return self.post_mean(x).unsqueeze(1) + eps @ chol.T
        return sampler

    def posterior(self, x: torch.Tensor) -> GaussianProposal:
        """The exact posterior p(z|x) per row, as an explicit proposal."""
        return GaussianProposal(self.post_mean(x), self.post_chol.expand(x.shape[0], self.d, self.d))

    def exact_elbo(self, x: torch.Tensor, mean_scale: float, noise_scale: float) -> torch.Tensor:
        m = mean_scale * self.post_mean(x)
        cov = noise_scale**2 * self.post_cov
        resid = x - m @ self.w.T - self.b
        recon = (-0.5 * ((resid**2).sum(-1) + torch.trace(self.w @ cov @ self.w.T)) / self.s**2
                 - 0.5 * self.big_d * math.log(2 * math.pi * self.s**2))
        prior = -0.5 * ((m**2).sum(-1) + torch.trace(cov)) - 0.5 * self.d * LOG_2PI
        entropy = 0.5 * torch.logdet(2 * math.pi * math.e * cov)
        return recon + prior + entropy
