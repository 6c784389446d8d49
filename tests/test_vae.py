"""Implicit-encoder VAE (deqsm.models.vae) and the honest ELBO (deqsm.metrics.elbo)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deqsm.config import DEQSettings
from deqsm.losses import get_score_loss
from deqsm.metrics.elbo import estimate_elbo, kde_log_density, knn_entropy, select_bandwidth
from deqsm.metrics.memory import measure_step
from deqsm.models.vae import ImplicitEncoder, ImplicitVAE, LatentScoreNet, standard_normal_log_prob, vae_objective
from deqsm.registry import UnknownNameError
from deqsm.train import Callback, TrainSettings, fit
from linear_gaussian import LinearGaussian

def test_elbo_below_exact_loglik_linear_gaussian(float64):
    torch.manual_seed(0)
    model = LinearGaussian()
    x = model.data(8)
    log_px = model.log_px(x)
    # an encoder that is not the posterior: the ELBO has a real gap below log p(x)
    est = estimate_elbo(model.implicit_encoder(0.8, 0.7), model.log_likelihood, standard_normal_log_prob, x,
                        n_centres=512, n_eval=256, iw_samples=512)
    exact = model.exact_elbo(x, 0.8, 0.7)
    assert bool((exact < log_px).all())
    assert bool((est.elbo < log_px).all()), (est.elbo, log_px)
    assert float((est.elbo - exact).abs().mean()) < 0.1  # the KDE entropy is close to the Gaussian's
    assert bool((est.elbo_smoothed < log_px + 0.05).all())
    assert float(est.iw_loglik.mean()) <= float(log_px.mean()) + 3 * est.summary()["iw_loglik_mc_se"]
    assert float(est.iw_loglik.mean()) > float(est.elbo_smoothed.mean())  # IW is the tighter bound
    exact_entropy = 0.5 * torch.logdet(2 * math.pi * math.e * 0.49 * model.post_cov)
    assert abs(float(est.entropy.mean()) - float(exact_entropy)) < 0.1
    assert abs(float(est.entropy_knn.mean()) - float(exact_entropy)) < 0.15


def test_elbo_bounds_at_the_exact_posterior(float64):
    """With q = the posterior the true ELBO equals log p(x); the KDE-encoder bounds stay below it."""
    torch.manual_seed(1)
    model = LinearGaussian()
    x = model.data(8, seed=2)
    log_px = model.log_px(x)
    assert torch.allclose(model.exact_elbo(x, 1.0, 1.0), log_px, atol=1e-10)
    est = estimate_elbo(model.implicit_encoder(1.0, 1.0), model.log_likelihood, standard_normal_log_prob, x,
                        n_centres=512, n_eval=256, iw_samples=1024)
    assert float(est.elbo_smoothed.mean()) <= float(log_px.mean())
    assert abs(float(est.iw_loglik.mean()) - float(log_px.mean())) < 0.03
    assert abs(float(est.elbo.mean()) - float(log_px.mean())) < 0.1


def test_kde_log_density_matches_mixture(float64):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    points = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    h = torch.rand(2, 3, generator=g, dtype=torch.float64) + 0.2
    ours = kde_log_density(points, centres, h)
    for i in range(2):
        mix = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(torch.ones(7, dtype=torch.float64)),
            torch.distributions.Independent(torch.distributions.Normal(centres[i], h[i].expand(7, 3)), 1))
        assert torch.allclose(ours[i], mix.log_prob(points[i]), atol=1e-10)
    with pytest.raises(ValueError, match="bandwidth"):
        kde_log_density(points, centres, h[:, :2])


def test_bandwidth_selection_and_knn_entropy(float64):
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.1, 1.0, 3.0], dtype=torch.float64)
    sample = lambda n: torch.randn(1, n, 3, generator=g, dtype=torch.float64) * scale  # noqa: E731
    bandwidth, factor = select_bandwidth(sample(400), sample(400))
    assert bandwidth.shape == (1, 3) and 0.05 <= float(factor) <= 2.0
    assert bool((bandwidth[0, 1:] > bandwidth[0, :2].min()).all())  # per-dimension scale is followed
    exact = 0.5 * 3 * math.log(2 * math.pi * math.e) + scale.log().sum()
    assert abs(float(knn_entropy(sample(3000))) - float(exact)) < 0.1
    with pytest.raises(ValueError, match="bandwidth factors"):
        select_bandwidth(sample(10), sample(10), factors=[])


def test_estimate_elbo_rejects_bad_inputs(float64):
    model = LinearGaussian()
    x = model.data(2)
    with pytest.raises(ValueError, match="n_centres"):
        estimate_elbo(model.implicit_encoder(1, 1), model.log_likelihood, standard_normal_log_prob, x, n_centres=1)
    with pytest.raises(ValueError, match="sampler must return"):
        estimate_elbo(lambda x_, n: torch.zeros(x_.shape[0], n), model.log_likelihood, standard_normal_log_prob, x)


# ---------------------------------------------------------------------------------------------------
# The model and its alternating training
# ---------------------------------------------------------------------------------------------------
def tiny_vae(variant: str, backward: str = "phantom", depth: int = 2) -> ImplicitVAE:
    deq = DEQSettings(solver="anderson", backward=backward, tol=1e-6, max_iter=40)
    return ImplicitVAE(6, 2, width=8, score_variant=variant, score_width=8, deq=deq, score_depth=depth)


class LastStep(Callback):
    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics = metrics


# the paper's score nets (explicit depth 2, Aug-8, Aug-16) and the DEQ under every backward mode
TRAIN_CASES = ([("explicit", d, "phantom") for d in (2, 8, 16)]
               + [("deq", 2, b) for b in ("phantom", "unroll", "implicit")])


@pytest.mark.parametrize("loss", ["ssm", "ssm_vr"])
@pytest.mark.parametrize("variant,depth,backward", TRAIN_CASES)
def test_every_variant_trains_with_each_loss_and_backward(variant, depth, backward, loss):
    """One step of deqsm.train.fit on the VAE's objective (score loss + VAE surrogate, one optimiser)."""
    torch.manual_seed(0)
    model = tiny_vae(variant, backward, depth)
    x = (torch.rand(4, 6) > 0.5).float()
    before_score = [p.detach().clone() for p in model.score.parameters()]
    before_enc = [p.detach().clone() for p in model.encoder.parameters()]
    last = LastStep()
    result = fit(model, vae_objective(loss, {"n_particles": 2}, x), x, None,
                 TrainSettings(steps=1, batch_size=4, progress=False), [last])
    m = last.metrics
    assert math.isfinite(m["train_score_loss"]) and math.isfinite(m["train_vae_surrogate"])
    assert result.peak_bytes > 0 and m["step_ms"] > 0
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.score.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before_score, model.score.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_enc, model.encoder.parameters()))
    if variant == "deq":
        assert m["solver_nstep"] >= 1 and m["solver_abs_residual_max"] < 1e-4
    else:
        assert "solver_nstep" not in m


def test_score_net_variants_depths():
    deq = DEQSettings()
    depth = {d: sum(isinstance(m, nn.Linear) for m in LatentScoreNet(4, 2, variant="explicit", width=8, deq=deq,
                                                                      depth=d).modules())
             for d in (2, 8, 16)}
    assert depth == {2: 3, 8: 9, 16: 17}  # hidden layers + read-out
    with pytest.raises(UnknownNameError, match="unknown network variant 'aug4'; known: deq, explicit"):
        LatentScoreNet(4, 2, variant="aug4")


def score_step_bytes(model: ImplicitVAE, x: torch.Tensor) -> int:
    _, mem = measure_step(lambda: model.score_objective(x, get_score_loss("ssm_vr")).loss,
                          list(model.score.parameters()), x.device)
    return mem.autograd_saved_bytes


def test_deq_score_net_keeps_less_memory_than_deep_explicit():
    """The claim the benchmark measures, on a small net: the DEQ score step holds less than Aug-16's."""
    torch.manual_seed(0)
    x = (torch.rand(16, 6) > 0.5).float()
    saved = {name: score_step_bytes(ImplicitVAE(6, 2, width=32, score_variant=variant, score_width=32,
                                                score_depth=depth), x)
             for name, variant, depth in (("deq", "deq", 2), ("aug16", "explicit", 16))}
    assert saved["deq"] * 3 < saved["aug16"], saved


def test_entropy_surrogate_gives_the_entropy_gradient(float64):
    """A linear implicit encoder z = A x + B ε has q = N(Ax, BBᵀ) and H = log|det B| + const. With the exact
    score in place of the network, the VAE objective's gradient in B must be −∂H/∂B = −B⁻ᵀ, plus the
    (shared) reconstruction and prior terms."""
    torch.manual_seed(0)
    x_dim, z_dim, n = 3, 2, 100000
    model = ImplicitVAE(x_dim, z_dim, width=8)
    lin = nn.Linear(x_dim + z_dim, z_dim, dtype=torch.float64)
    with torch.no_grad():
        lin.weight[:, x_dim:] = torch.tensor([[0.7, 0.2], [-0.1, 0.5]])
    model.encoder.net = lin
    b_mat = lambda: lin.weight[:, x_dim:]  # noqa: E731

    class ExactScore(nn.Module):
        def forward(self, x, z):
            mean = x @ lin.weight[:, :x_dim].T + lin.bias
            cov = b_mat() @ b_mat().T
            return -torch.linalg.solve(cov, (z - mean).T).T

    model.score = ExactScore()
    model.double()
    x = torch.randn(1, x_dim).expand(n, x_dim).contiguous()

    def grad_of(loss_fn):
        lin.zero_grad()
        loss_fn().backward()
        return lin.weight.grad[:, x_dim:].clone()

    g_model = grad_of(lambda: model.vae_objective(x, torch.Generator().manual_seed(3)).loss)

    def reference():
        z = model.encoder(x, torch.Generator().manual_seed(3))
        recon_prior = (model.log_likelihood(x, z) + model.log_prior(z)).mean()
        return -(recon_prior + torch.logdet(b_mat()))

    g_ref = grad_of(reference)
    assert torch.allclose(g_model, g_ref, atol=0.03), (g_model, g_ref)


def test_encoder_sampling_and_errors():
    enc = ImplicitEncoder(5, 3, width=8)
    z = enc.sample(torch.zeros(2, 5), 7)
    assert z.shape == (2, 7, 3)
    assert float(z.detach().std(dim=1).min()) > 0  # noise makes samples differ
    with pytest.raises(ValueError, match="eps_dim"):
        ImplicitEncoder(5, 3, eps_dim=2)
    with pytest.raises(ValueError, match="input features"):
        enc(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="the VAE's score network trains by sm, ssm, ssm_vr; got loss 'dsm'"):
        vae_objective("dsm", {}, torch.zeros(2, 6))


def test_sample_grid_values_are_probabilities():
    model = tiny_vae("explicit")
    s = model.sample(5, torch.Generator().manual_seed(0))
    assert s.shape == (5, 6) and bool(((s >= 0) & (s <= 1)).all())
