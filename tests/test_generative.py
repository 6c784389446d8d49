"""The VAE and NCSN as pipeline models (their families in deqsm.models.vae and deqsm.models.ncsn): built
from a spec, trained by the common loop with every backward mode, evaluated by their own hooks; the VAE's
joint objective keeps the score network's and the VAE's gradients apart; bad data and bad losses fail
naming the problem."""
import pytest
import torch

from deqsm.deq import DEQ
from deqsm.experiments import VariantSpec, build, evaluate_variant, train_model
from deqsm.metrics.fid import gaussian_frechet_distance
from deqsm.models.ncsn import fd_feature_classifier
from deqsm.train import TrainSettings
from metric_references import (LOG_2PI, bernoulli_log_likelihood, gaussian_entropy,
                               latent_quadrature, posterior_matched_encoder)
from model_checks import assert_one_training_step

OPTIONS = {"vae": {"z_dim": 2, "hidden_width": 16, "val_elbo_samples": 8},
           "ncsn": {"sigma_max": 1.0, "sigma_min": 0.1, "sigma_levels": 3}}
LOSSES = {"vae": ["sm", "ssm", "ssm_vr"], "ncsn": ["dsm", "sm", "ssm", "ssm_vr"]}


def images(n=120, binary=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=gen)
    x = (x > 0.5).float() if binary else x
    a, b = int(0.6 * n), int(0.8 * n)
    return {"train": x[:a], "val": x[a:b], "test": x[b:]}


def spec(model, variant="deq", loss=None, depth=2, **kw):
    return VariantSpec(name=f"{model}-{variant}", model=model, variant=variant, depth=depth, width=8,
                          model_options=kw.pop("model_options", OPTIONS[model]),
                          loss={"name": loss or LOSSES[model][0]}, **kw)


@pytest.mark.parametrize("model,variant,loss",
                         [(m, v, l) for m in LOSSES for v in ("deq", "explicit") for l in LOSSES[m]])
def test_every_variant_and_loss_takes_a_training_step(model, variant, loss):
    data = images(binary=model == "vae")["train"]
    torch.manual_seed(0)
    net, objective = build(spec(model, variant, loss), data)
    assert_one_training_step(net, objective, data[:16])


@pytest.mark.parametrize("backward", ["phantom", "unroll", "implicit"])
@pytest.mark.parametrize("model", ["vae", "ncsn"])
def test_deq_variants_train_with_every_backward_mode(model, backward):
    splits = images(60, binary=model == "vae")
    s = spec(model, "deq", deq={"backward": backward, "max_iter": 30})
    net, result = train_model(s, splits, TrainSettings(steps=2, batch_size=16, eval_every=2, progress=False))
    deqs = [m for m in net.modules() if isinstance(m, DEQ)]
    assert deqs and all(m.backward == backward for m in deqs) and result.steps == 2
    assert all(torch.isfinite(v).all() for v in net.state_dict().values())


def test_vae_joint_objective_sends_each_loss_only_to_its_own_network():
    from deqsm.losses import get_score_loss

    data = images(binary=True)["train"][:32]
    torch.manual_seed(0)
    net, objective = build(spec("vae", "explicit", "ssm"), data)
    x = data.flatten(1)
    score_params, vae_params = list(net.score.parameters()), net.vae_parameters()
    torch.manual_seed(1)
    joint = objective(net, data).loss
    joint_score = torch.autograd.grad(joint, score_params, retain_graph=True)
    joint_vae = torch.autograd.grad(joint, vae_params)
    torch.manual_seed(1)  # the same draws, in the same order: the score part first, then the VAE part
    score_part = net.score_objective(x, get_score_loss("ssm")).loss
    vae_part = net.vae_objective(x).loss
    assert all(torch.allclose(a, b) for a, b in zip(joint_score, torch.autograd.grad(score_part, score_params,
                                                                                     retain_graph=True)))
    assert all(torch.allclose(a, b) for a, b in zip(joint_vae, torch.autograd.grad(vae_part, vae_params,
                                                                                   retain_graph=True)))
    assert all(g is None for g in torch.autograd.grad(vae_part, score_params, allow_unused=True)), \
        "the VAE surrogate sees s(x, z) without gradient"
    assert all(g is None for g in torch.autograd.grad(score_part, vae_params, allow_unused=True)), \
        "the score loss sees encoder samples without gradient"


def posterior_encoder_vae(s, splits, rows):
    """The pipeline's VAE (untrained), its encoder network replaced by a Gaussian one whose mean is the exact
    posterior mean at each of ``rows`` (its covariance: their mean posterior covariance), and the exact log p(x)
    of those rows by quadrature over the 2-D latent space."""
    torch.manual_seed(0)
    net, objective = build(s, splits["train"])
    x = rows.flatten(1)
    log_px, post_mean, post_cov = latent_quadrature(net.decoder.logits, x)
    net.encoder.net = posterior_matched_encoder(x, post_mean, post_cov)
    return net, objective, log_px


def test_vae_validation_loss_is_minus_the_importance_weighted_bound():
    """Tuning and early stopping read a valid lower bound on log p(x), not the KDE ELBO (logged beside it): the
    loss lies above −log p(x) (exact, by quadrature) with the model's own encoder, and within a tenth of a nat of
    it when the encoder is the posterior (the importance-weighted bound is then nearly exact)."""
    data = images(binary=True)["val"]
    s = spec("vae", "deq", "ssm_vr")
    torch.manual_seed(0)
    net, objective = build(s, data)
    net.eval()
    log_px = float(latent_quadrature(net.decoder.logits, data.flatten(1))[0].mean())
    out = objective(net, data)
    assert out.loss.item() >= -log_px and "elbo" in out.terms  # an untrained encoder: a loose bound
    assert out.terms["kl"].item() > -1.0  # KDE KL can dip slightly below 0

    net, objective, log_px_rows = posterior_encoder_vae(s, {"train": data}, data)
    net.eval()
    log_px = float(log_px_rows.mean())
    out = objective(net, data)
    assert -log_px - 0.05 <= out.loss.item() <= -log_px + 0.1
    assert out.terms["iw_loglik"].item() == pytest.approx(-out.loss.item())


def test_vae_and_ncsn_evaluate_with_their_own_metrics_and_samples():
    splits = images(100, binary=True)
    s = spec("vae", "deq", "ssm_vr")
    # the encoder q(z|x) = N(m(x), L Lᵀ) with m(x) the posterior mean: every ELBO term has a reference
    net, _, log_px_rows = posterior_encoder_vae(s, splits, splits["test"])
    metrics, samples = evaluate_variant(s, net, splits, {"elbo_centres": 16, "elbo_eval": 8, "memory_batch": 8})
    x = splits["test"].flatten(1).double()
    enc = net.encoder.net
    m, tril = x @ enc.a.double().T + enc.b.double(), enc.scale_tril.double()
    log_px = float(log_px_rows.mean())
    n_eval = 8 * x.shape[0]  # the estimates' draws: elbo_eval per test row
    # E_q log N(z; 0, I) in closed form; E_q log p(x|z) by plain Monte Carlo with draws of our own
    log_prior = float((-0.5 * (m.pow(2).sum(1) + (tril @ tril.T).trace()) - LOG_2PI).mean())
    z = m.unsqueeze(1) + torch.randn(x.shape[0], 4000, 2, dtype=torch.float64,
                                     generator=torch.Generator().manual_seed(1)) @ tril.T
    with torch.no_grad():
        recon_draws = bernoulli_log_likelihood(x.unsqueeze(1), net.decoder.logits(z.float()))
    z_prior = -0.5 * (z.pow(2).sum(-1) + 2 * LOG_2PI)
    recon, entropy = float(recon_draws.mean()), gaussian_entropy(tril)
    recon_se = float(recon_draws.var(1).mean().sqrt()) / n_eval ** 0.5
    prior_se = float(z_prior.var(1).mean().sqrt()) / n_eval ** 0.5
    entropy_se = 1 / n_eval ** 0.5  # sd of −log q(z) of a 2-D Gaussian: √(d/2) = 1
    assert abs(metrics["test_log_prior"] - log_prior) <= 4 * prior_se
    assert abs(metrics["test_recon"] - recon) <= 4 * recon_se
    # the KDE entropy is a cross-entropy, biased upwards by KL(q ‖ q̂) (16 centres in 2-D: about 0.4 nats)
    assert entropy - 4 * entropy_se <= metrics["test_entropy"] <= entropy + 1.0
    elbo = recon + log_prior + entropy  # the encoder's exact ELBO (up to the Monte-Carlo recon)
    assert elbo <= log_px  # the references agree with each other: ELBO = log p(x) − KL(q ‖ posterior)
    tol = 4 * (recon_se ** 2 + prior_se ** 2 + entropy_se ** 2) ** 0.5
    assert elbo - tol <= metrics["test_elbo"] <= elbo + 1.0 + tol
    # the bounds: elbo_smoothed ≤ iw_loglik ≤ log p(x), the IW bound nearly exact with the posterior's moments
    mc_se = metrics["test_iw_loglik_mc_se"]
    assert log_px - 0.1 <= metrics["test_iw_loglik"] <= log_px + 3 * mc_se
    assert metrics["test_elbo_smoothed"] <= metrics["test_iw_loglik"] + 3 * mc_se
    assert metrics["test_iw_loglik_se"] == pytest.approx(float(log_px_rows.std()) / x.shape[0] ** 0.5, rel=0.1)
    assert metrics["score_step_peak_bytes"] > 0 and metrics["params"] > metrics["score_net_params"] > 0
    assert metrics["score_net_params"] == sum(p.numel() for p in net.score.parameters())
    assert samples.shape == (64, 1, 8, 8) and 0 <= float(samples.min()) and float(samples.max()) <= 1
    assert "test_loglik" not in metrics

    splits = images(100)
    labels = {"train": torch.arange(60) % 10, "test": torch.arange(20) % 10}
    s = spec("ncsn", "deq", "dsm")
    net, _ = build(s, splits["train"])
    opts = {"fd_samples": 20, "langevin_steps": 2, "classifier_epochs": 1}
    metrics, samples = evaluate_variant(s, net, splits, opts, labels=labels)
    assert metrics["fd_samples"] == 20 and metrics["test_loss"] > 0
    assert samples.shape == (20, 1, 8, 8) and 0 <= float(samples.min()) and float(samples.max()) <= 1
    # the FD of the returned samples to the test images, in closed form on the same classifier's features
    classifier = fd_feature_classifier(splits["train"], labels["train"], 0, 1)
    with torch.no_grad():
        feats = [classifier.features(t.float()).double() for t in (splits["test"], samples)]
    closed = gaussian_frechet_distance(*(v for f in feats for v in (f.mean(0), torch.cov(f.T))))  # not torchmetrics
    assert metrics["fd_digits_cnn"] == pytest.approx(closed, rel=1e-4)
    assert metrics["fd_digits_cnn_ci_low"] <= metrics["fd_digits_cnn"] <= metrics["fd_digits_cnn_ci_high"]
    with pytest.raises(ValueError, match="needs the training split's labels"):
        evaluate_variant(s, net, splits, opts)


def test_bad_data_and_losses_fail_naming_the_problem():
    with pytest.raises(ValueError, match="binarised data"):
        build(spec("vae"), images()["train"])
    with pytest.raises(ValueError, match=r"image data \(N, C, H, W\)"):
        build(spec("ncsn"), torch.rand(50, 64))
    with pytest.raises(ValueError, match="trains by sm, ssm, ssm_vr; got loss 'dsm'"):
        build(spec("vae", loss="dsm"), images(binary=True)["train"])
    with pytest.raises(ValueError, match="unknown model_options"):
        spec("ncsn", model_options={"sigma_lvls": 3})
    with pytest.raises(ValueError, match="unknown network variant 'aug8'; known: deq, explicit"):
        from deqsm.models.vae import LatentScoreNet  # the paper's Aug-8 is explicit with depth 8
        LatentScoreNet(4, 2, variant="aug8")
