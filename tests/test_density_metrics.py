"""The density metrics' numbers against independent references: the Fisher divergence against its closed form
between Gaussians, and the importance-sampling standard error of log Ẑ against the spread of log Ẑ over seeds."""
import math

import pytest
import torch

from deqsm.metrics.density import fisher_divergence, importance_log_normaliser, true_score_function
from deqsm.metrics.proposals import GaussianProposal

D = 3


def gaussians(gen):
    """A model energy E(x) = ½(x − μ)ᵀP(x − μ) and a true density N(m, Σ) that differ in mean and shape."""
    a = torch.randn(D, D, generator=gen) / D**0.5
    precision = a @ a.t() + 0.5 * torch.eye(D)
    mu = torch.randn(D, generator=gen)
    b = torch.randn(D, D, generator=gen) / D**0.5 + torch.eye(D)
    cov, m = b @ b.t(), torch.randn(D, generator=gen)
    energy = lambda x: 0.5 * torch.einsum("bi,ij,bj->b", x - mu, precision, x - mu)  # noqa: E731
    true = torch.distributions.MultivariateNormal(m, covariance_matrix=cov)
    return energy, precision, mu, true


def test_fisher_divergence_equals_its_closed_form_between_gaussians(float64):
    """s_model − s_true = −P(x − μ) + Σ⁻¹(x − m) = A x + c, A = Σ⁻¹ − P, c = Pμ − Σ⁻¹m; under x ~ N(m, Σ),
    ½ E‖A x + c‖² = ½ [tr(A Σ Aᵀ) + ‖A m + c‖²]."""
    gen = torch.Generator().manual_seed(0)
    energy, precision, mu, true = gaussians(gen)
    cov_inv = torch.linalg.inv(true.covariance_matrix)
    a, c = cov_inv - precision, precision @ mu - cov_inv @ true.loc
    closed = 0.5 * float(torch.trace(a @ true.covariance_matrix @ a.t()) + ((a @ true.loc + c) ** 2).sum())
    x = true.sample((40_000,))
    per_row = 0.5 * ((x @ a.t() + c) ** 2).sum(1)  # the same quantity, row by row, by hand
    got = fisher_divergence(energy, true_score_function(true), x, batch_size=7_000)  # batches that do not divide N
    assert got == pytest.approx(float(per_row.mean()), rel=1e-10)
    se = float(per_row.std()) / math.sqrt(x.shape[0])
    assert abs(got - closed) < 4 * se and se < 0.02 * closed, (got, closed, se)
    # at the truth it is zero; with the model's score of the wrong sign it is not
    exact_energy = lambda x_: -true.log_prob(x_)  # noqa: E731
    assert fisher_divergence(exact_energy, true_score_function(true), x[:500]) == pytest.approx(0.0, abs=1e-20)
    assert fisher_divergence(lambda x_: true.log_prob(x_), true_score_function(true), x[:500]) > 1.0


@pytest.mark.parametrize("scale", [1.5, 2.5])
def test_importance_standard_error_matches_the_spread_of_log_z_over_seeds(scale):
    """p̃(x) = exp(−½‖x − m‖²/s² + c) has log Z = c + (d/2) log(2π s²). Over 200 independent seeds the reported
    se of log Ẑ is, on average, the standard deviation of log Ẑ itself (within the ~10 % that 200 seeds can
    tell), and log Ẑ is unbiased to O(se²)."""
    d, s, c = 2, 0.8, 1.3
    m = torch.tensor([0.4, -0.3])
    log_p = lambda x: -0.5 * ((x - m) ** 2).sum(1) / s**2 + c  # noqa: E731
    true_log_z = c + 0.5 * d * math.log(2 * math.pi * s**2)
    est = [importance_log_normaliser(log_p, GaussianProposal(d, scale), n_samples=1_000, batch_size=400,
                                     generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
           for seed in range(200)]
    log_z = torch.tensor([e.log_z for e in est], dtype=torch.float64)
    reported = sum(e.se for e in est) / len(est)
    spread = float(log_z.std())
    assert 0.8 < reported / spread < 1.25, (reported, spread)
    assert abs(float(log_z.mean()) - true_log_z) < 4 * spread / math.sqrt(len(est)), (float(log_z.mean()), true_log_z)
