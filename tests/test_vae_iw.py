"""The VAE's headline, the importance-weighted bound on log p(x) (deqsm.metrics.elbo), checked against a
linear-Gaussian model whose log p(x) and posterior are known (tests/linear_gaussian.py)."""
from __future__ import annotations

import math
import types

import pytest
import torch
from pydantic import ValidationError

from deqsm.metrics.elbo import (DefensiveProposal, GaussianProposal, KDEProposal, estimate_elbo,
                                importance_weighted_bound)
from deqsm.models.vae import FAMILY, ImplicitVAE, VAEEvalOptions, evaluate_vae, standard_normal_log_prob, vae_objective
from linear_gaussian import LinearGaussian

DEFAULTS = VAEEvalOptions()


def default_estimate(model: LinearGaussian, sampler, x: torch.Tensor, **kw):
    """estimate_elbo at the VAE's default evaluation settings."""
    return estimate_elbo(sampler, model.log_likelihood, standard_normal_log_prob, x, n_centres=DEFAULTS.elbo_centres,
                         n_select=DEFAULTS.elbo_eval, n_eval=DEFAULTS.elbo_eval, iw_samples=DEFAULTS.iw_samples,
                         defensive_weight=DEFAULTS.iw_defensive_weight,
                         defensive_scale=DEFAULTS.iw_defensive_scale, **kw)


@pytest.fixture
def lg(float64):
    """8 latent, 16 observed dimensions, 16 rows of x: (model, x, log p(x))."""
    model = LinearGaussian(d=8, big_d=16, s=0.5)
    x = model.data(16, seed=3)
    return model, x, model.log_px(x)


@pytest.mark.parametrize("encoder", ["exact posterior", "too narrow", "sheared"])
def test_iw_bound_is_below_log_px_within_its_monte_carlo_error(lg, encoder):
    model, x, log_px = lg
    sampler = {"exact posterior": model.implicit_encoder(1.0, 1.0), "too narrow": model.implicit_encoder(1.0, 0.5),
               "sheared": model.sheared_encoder(1.0)}[encoder]
    torch.manual_seed(0)
    s = default_estimate(model, sampler, x).summary("test_")
    gap = s["test_iw_loglik"] - float(log_px.mean())
    assert 0 < s["test_iw_loglik_mc_se"] < 0.2
    assert gap <= 3 * s["test_iw_loglik_mc_se"], (gap, s["test_iw_loglik_mc_se"])
    assert gap > -0.5, "the defensive proposal keeps the bound close even for a poor encoder"
    assert s["test_elbo_smoothed"] <= float(log_px.mean()) + 0.05


def test_kde_elbo_is_above_log_px_where_the_iw_bound_is_not(lg):
    """Why the KDE ELBO is not the headline: with the exact posterior as encoder its KL(q ‖ q̂) bias puts it
    above log p(x), by many standard errors, at the same settings where the IW bound stays below."""
    model, x, log_px = lg
    torch.manual_seed(1)
    est = default_estimate(model, model.implicit_encoder(1.0, 1.0), x)
    excess = est.elbo - log_px
    se = float(excess.std() / math.sqrt(excess.shape[0]))
    assert float(excess.mean()) > 0.2 and float(excess.mean()) > 5 * se, (float(excess.mean()), se)
    s = est.summary()
    assert s["iw_loglik"] - float(log_px.mean()) <= 3 * s["iw_loglik_mc_se"]


def test_iw_bound_is_exact_with_the_exact_posterior_as_proposal(lg):
    model, x, log_px = lg
    torch.manual_seed(2)
    est = default_estimate(model, model.implicit_encoder(0.8, 0.7), x, proposal=model.posterior)
    assert float((est.iw_loglik - log_px).abs().max()) < 1e-6
    assert float(est.iw_loglik_mc_se.max()) < 1e-6
    assert est.summary()["iw_loglik_mc_se"] < 1e-6


def test_validation_loss_is_minus_a_valid_bound(lg):
    """vae_objective in evaluation mode: loss = −(IW bound at val_elbo_samples), the same number estimate_elbo
    gives with those settings and draws, below log p(x) within its Monte-Carlo error; the KDE ELBO is logged."""
    model, x, log_px = lg
    n = 32
    stub = types.SimpleNamespace(training=False, val_elbo_samples=n, log_likelihood=model.log_likelihood,
                                 log_prior=standard_normal_log_prob,
                                 encoder=types.SimpleNamespace(sample=model.implicit_encoder(1.0, 0.5)))
    torch.manual_seed(3)
    out = vae_objective("ssm", {}, x)(stub, x)
    torch.manual_seed(3)
    est = estimate_elbo(stub.encoder.sample, model.log_likelihood, standard_normal_log_prob, x, n_centres=n,
                        n_select=n // 2, n_eval=n // 2, iw_samples=n, batch_size=x.shape[0])
    s = est.summary()
    assert float(out.loss) == pytest.approx(-s["iw_loglik"], rel=1e-12)
    assert float(out.terms["iw_loglik"]) == pytest.approx(s["iw_loglik"], rel=1e-12)
    assert float(out.terms["elbo"]) == pytest.approx(s["elbo"], rel=1e-12)
    assert float(out.loss) >= -float(log_px.mean()) - 3 * s["iw_loglik_mc_se"]


def test_importance_weighted_bound_and_its_error_are_stable(float64):
    g = torch.Generator().manual_seed(0)
    log_w = torch.randn(3, 50, generator=g)
    bound, se = importance_weighted_bound(log_w)
    w = log_w.exp()
    assert torch.allclose(bound, w.mean(1).log(), atol=1e-12)
    assert torch.allclose(se, w.std(1) / math.sqrt(50) / w.mean(1), atol=1e-12)
    far, far_se = importance_weighted_bound(log_w - 1e4)  # exp underflows; the shift by the max does not
    assert torch.allclose(far, bound - 1e4, atol=1e-8) and torch.allclose(far_se, se, atol=1e-12)
    assert bool(importance_weighted_bound(log_w[:, :1])[1].isnan().all())  # one draw: no error estimate


def test_summary_aggregates_the_standard_errors(lg):
    model, x, _ = lg
    torch.manual_seed(4)
    est = estimate_elbo(model.implicit_encoder(1.0, 1.0), model.log_likelihood, standard_normal_log_prob, x,
                        n_centres=64, n_select=32, n_eval=32, iw_samples=32)
    s = est.summary("test_")
    n = x.shape[0]
    assert s["test_iw_loglik"] == pytest.approx(float(est.iw_loglik.mean()))
    assert s["test_iw_loglik_mc_se"] == pytest.approx(float(est.iw_loglik_mc_se.pow(2).sum().sqrt()) / n)
    assert s["test_iw_loglik_se"] == pytest.approx(float(est.iw_loglik.std()) / math.sqrt(n))
    assert "test_iw_loglik" not in estimate_elbo(model.implicit_encoder(1.0, 1.0), model.log_likelihood,
                                                 standard_normal_log_prob, x, n_centres=8, n_select=4,
                                                 n_eval=4).summary("test_")
    with pytest.raises(ValueError, match="defensive_weight must be in \\[0, 1\\), got 1.0"):
        estimate_elbo(model.implicit_encoder(1.0, 1.0), model.log_likelihood, standard_normal_log_prob, x,
                      iw_samples=4, defensive_weight=1.0)


def test_proposals_have_exact_densities(float64):
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(2, 400, 3, generator=g) @ torch.tensor([[1.0, 0.5, 0.0], [0.0, 2.0, 0.3], [0.0, 0.0, 0.2]])
    gauss = GaussianProposal.moment_matched(samples, scale=2.0)
    z = torch.randn(2, 5, 3, generator=g)
    for i in range(2):
        cov = torch.cov(samples[i].T)
        ref = torch.distributions.MultivariateNormal(samples[i].mean(0), 4.0 * cov)
        assert torch.allclose(gauss.log_prob(z)[i], ref.log_prob(z[i]), atol=1e-5)
    kde = KDEProposal(samples[:, :10], torch.full((2, 3), 0.3))
    mix = DefensiveProposal(kde, gauss, 0.25)
    assert torch.allclose(mix.log_prob(z), torch.log(0.75 * kde.log_prob(z).exp() + 0.25 * gauss.log_prob(z).exp()))
    far = DefensiveProposal(GaussianProposal(torch.zeros(1, 1), torch.ones(1, 1, 1)),
                            GaussianProposal(torch.full((1, 1), 100.0), torch.ones(1, 1, 1)), 0.25)
    torch.manual_seed(0)
    assert float((far.sample(4000) > 50).double().mean()) == pytest.approx(0.25, abs=0.03)
    with pytest.raises(ValueError, match="scale must be > 0, got 0"):
        GaussianProposal.moment_matched(samples, scale=0)


def test_moment_matched_gaussian_from_fewer_samples_than_dimensions_in_float32():
    """The validation bound fits it to val_elbo_samples (>= 4) draws in z_dim dimensions, in float32."""
    g = torch.Generator().manual_seed(0)
    samples = (torch.randn(64, 4, 8, generator=g) * torch.rand(64, 1, 8, generator=g) * 10
               + 100 * torch.randn(64, 1, 8, generator=g)).float()
    gauss = GaussianProposal.moment_matched(samples, scale=3.0)
    z = gauss.sample(16)
    assert z.dtype == torch.float32 and bool(torch.isfinite(gauss.log_prob(z)).all())


def test_eval_options_and_headline():
    assert DEFAULTS.iw_samples >= 1
    assert FAMILY.headline.key == "test_iw_loglik" and FAMILY.headline.higher_is_better
    with pytest.raises(ValidationError, match="iw_samples must be >= 1 \\(got 0\\): the VAE's headline"):
        VAEEvalOptions(iw_samples=0)


def test_evaluate_vae_reports_the_bound_and_its_errors():
    torch.manual_seed(0)
    model = ImplicitVAE(6, 2, width=8, score_variant="explicit", score_width=8)
    test = (torch.rand(10, 6) > 0.5).float()
    spec = types.SimpleNamespace(loss=types.SimpleNamespace(name="ssm", options={}))
    opts = VAEEvalOptions(elbo_centres=16, elbo_eval=8, iw_samples=16, memory_batch=4)
    m, _ = evaluate_vae(model, {"test": test}, opts, spec)
    assert all(math.isfinite(m[k]) for k in ("test_iw_loglik", "test_iw_loglik_se", "test_iw_loglik_mc_se",
                                             "test_elbo", "test_elbo_smoothed"))
    assert m["test_iw_loglik_mc_se"] > 0 and m["test_iw_loglik_se"] > 0
    assert m["test_iw_loglik"] < 0


def _kde_reference(points, centres, bandwidth):
    """log q̂ in float64 from the differences themselves (no |a|² + |b|² − 2ab): the reference."""
    p, c, h = points.double(), centres.double(), bandwidth.double()
    sq = ((p[:, :, None, :] - c[:, None, :, :]) / h[:, None, None, :]).pow(2).sum(-1)
    d, m = p.shape[2], c.shape[1]
    return (torch.logsumexp(-0.5 * sq, dim=-1) - h.log().sum(-1, keepdim=True) - 0.5 * d * math.log(2 * math.pi)
            - math.log(m))


def test_kde_density_stays_exact_when_the_bandwidth_is_tiny_against_the_centres():
    """A collapsed encoder (samples within ~1e-6 of a mean ~0.05, as a diverged VAE's were) gets bandwidths ~1e-7.
    In float32 with cdist's matrix-product distances the KDE scored such points thousands of nats too low, and a
    proposal that underrates its own draws inflates the importance-weighted "bound" (it read +66 nats on binary
    digits, where log p(x) <= 0)."""
    gen = torch.Generator().manual_seed(0)
    mean = torch.tensor([0.05, 0.069, -0.069, 0.065, -0.046, -0.040, -0.038, -0.045])
    centres = (mean + 1e-6 * torch.randn(2, 256, 8, generator=gen)).float()
    bandwidth = torch.full((2, 8), 1.5e-7)
    kde = KDEProposal(centres, bandwidth)
    draws = kde.sample(64)
    got = kde.log_prob(draws)
    assert got.dtype == torch.float64
    assert torch.allclose(got, _kde_reference(draws, centres, bandwidth), atol=1e-6, rtol=0)
