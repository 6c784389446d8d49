"""The VAE and NCSN as pipeline models (their families in deqsm.models.vae and deqsm.models.ncsn): built
from a spec, trained by the common loop with every backward mode, evaluated by their own hooks; the VAE's
joint objective keeps the score network's and the VAE's gradients apart; bad data and bad losses fail
naming the problem."""
import pytest
import torch

from deqsm.deq import DEQ
from deqsm.experiments import VariantSpec, build, evaluate_variant, train_model
from deqsm.train import TrainSettings
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


@pytest.mark.parametrize("model,variant,loss", [(m, v, l) for m in LOSSES for v in ("deq", "explicit") for l in LOSSES[m]])
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


def test_vae_validation_loss_is_minus_the_importance_weighted_bound():
    data = images(binary=True)["val"]
    torch.manual_seed(0)
    net, objective = build(spec("vae", "deq", "ssm_vr"), data)
    net.eval()
    out = objective(net, data)
    # tuning and early stopping read a valid lower bound on log p(x), not the KDE ELBO (logged beside it)
    assert out.loss.item() == pytest.approx(-out.terms["iw_loglik"].item())
    assert out.terms["iw_loglik"].item() < 0 and "elbo" in out.terms
    assert out.terms["kl"].item() > -1.0  # KDE KL can dip slightly below 0


def test_vae_and_ncsn_evaluate_with_their_own_metrics_and_samples():
    splits = images(100, binary=True)
    torch.manual_seed(0)
    s = spec("vae", "deq", "ssm_vr")
    net, _ = build(s, splits["train"])
    metrics, samples = evaluate_variant(s, net, splits, {"elbo_centres": 16, "elbo_eval": 8, "memory_batch": 8})
    assert metrics["test_elbo"] == pytest.approx(metrics["test_recon"] + metrics["test_log_prior"] + metrics["test_entropy"])
    assert metrics["score_step_peak_bytes"] > 0 and metrics["params"] > metrics["score_net_params"] > 0
    assert samples.shape == (64, 1, 8, 8) and 0 <= float(samples.min()) and float(samples.max()) <= 1
    assert "test_loglik" not in metrics

    splits = images(100)
    labels = {"train": torch.arange(60) % 10, "test": torch.arange(20) % 10}
    s = spec("ncsn", "deq", "dsm")
    net, _ = build(s, splits["train"])
    opts = {"fd_samples": 20, "langevin_steps": 2, "classifier_epochs": 1}
    metrics, samples = evaluate_variant(s, net, splits, opts, labels=labels)
    assert metrics["fd_digits_cnn"] > 0 and metrics["fd_samples"] == 20 and metrics["test_loss"] > 0
    assert samples.shape == (20, 1, 8, 8) and 0 <= float(samples.min()) and float(samples.max()) <= 1
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
