"""DKEF: the closed-form α systems are the losses' exact quadratics, CP matches exact SM in expectation,
importance-sampled log Z agrees with numerical integration, finalise solves α, and a short fit recovers a
Gaussian's density."""
import math

import pytest
import torch

from deqsm.config import DEQSettings
from deqsm.losses import get_loss
from deqsm.metrics.density import importance_log_normaliser
from deqsm.metrics.proposals import GaussianProposal
from deqsm.models.dkef import ALPHA_SYSTEMS, DKEFObjective, build_dkef
from deqsm.train import TrainSettings, fit
from metric_references import grid_log_integral
from model_checks import assert_cp_unbiased

EXACT_DEQ = DEQSettings(tol=1e-12, max_iter=300)


def tiny(variant="explicit", dim=3, n_inducing=4, seed=0, **kw):
    torch.manual_seed(seed)
    train = torch.randn(40, dim)
    return build_dkef(dim, variant=variant, width=6, depth=2, deq=EXACT_DEQ, train=train, n_inducing=n_inducing, **kw), train


LOSS_CASES = [("sm", {}), ("ssm", {"n_particles": 2}), ("ssm_vr", {"noise": "gaussian"}), ("dsm", {"sigma": 0.3}),
              ("dsm", {"sigmas": [0.1, 0.5, 1.0]})]


@pytest.mark.parametrize("variant", ["explicit", "deq"])
@pytest.mark.parametrize("loss,opts", LOSS_CASES)
def test_alpha_system_is_the_loss_quadratic_in_alpha(float64, variant, loss, opts):
    """L(α) − L(0) = bᵀα + ½αᵀGα exactly, with the loss's own random draws (same generator seed)."""
    model, x = tiny(variant)

    def with_gen(seed=1):
        return {**opts, **({"generator": torch.Generator().manual_seed(seed)} if loss != "sm" else {})}

    def L(alpha):
        return float(get_loss(loss, **with_gen())(model.with_alpha(alpha), x[:10]).loss.detach())

    G, b = (t.detach() for t in model.alpha_system(x[:10], loss, with_gen()))
    assert torch.allclose(G, G.t())
    a = torch.randn(4)
    assert L(a) - L(torch.zeros(4)) == pytest.approx(float(b @ a + 0.5 * a @ G @ a), abs=1e-10)


def test_every_score_loss_has_an_alpha_system():
    assert set(ALPHA_SYSTEMS.names()) == {"sm", "ssm", "ssm_vr", "dsm", "cp"}


@pytest.mark.parametrize("variant", ["explicit", "deq"])
def test_layered_energy_matches_and_cp_estimates_the_sm_loss(float64, variant):
    model, x = tiny(variant)
    model.alpha.copy_(torch.randn(4))
    xb = x[:5]
    energy, pre, post = model.energy_layers(xb)
    assert torch.allclose(energy, model(xb), atol=1e-12)
    sm = get_loss("sm")(model, xb).scalars()
    cp = get_loss("cp", generator=torch.Generator().manual_seed(0))(model, xb).scalars()
    assert cp["norm"] == pytest.approx(sm["norm"], rel=1e-12)  # the ½‖s‖² term is exact in CP
    assert_cp_unbiased(model, xb, sm["trace"], draws=300, max_rel_se=0.15)  # unbiased: within 4 se of its spread


@pytest.mark.parametrize("dim,lim,n", [(1, 16.0, 4001), (2, 14.0, 301)])
def test_importance_sampled_log_z_agrees_with_numerical_integration(float64, dim, lim, n):
    model, _ = tiny("explicit", dim=dim, n_inducing=5, seed=dim, q0_scale=1.5)
    model.alpha.copy_(torch.tensor([1.5, -1.0, 2.0, 0.5, -0.8]))
    exact = grid_log_integral(model.log_unnormalised, lim, 2 * lim / (n - 1), dim)  # n nodes per axis
    assert abs(exact) > 0.05  # the kernels move log Z away from q0's 0
    est = importance_log_normaliser(model.log_unnormalised, GaussianProposal(dim, 2.0), n_samples=40_000, batch_size=7000,
                                    generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert 0 < est.se < 0.05
    assert abs(est.log_z - exact) < 4 * est.se + 1e-3


def test_importance_sampling_of_a_gaussian_has_zero_error_when_proposal_is_exact(float64):
    log_q = lambda x: -0.5 * (x / 2).pow(2).sum(1) - 2 * math.log(2) - math.log(2 * math.pi)  # noqa: E731
    est = importance_log_normaliser(lambda x: log_q(x) + 3.0, GaussianProposal(2, 2.0), n_samples=1000, batch_size=300)
    assert est.log_z == pytest.approx(3.0, abs=1e-9) and est.se < 1e-9 and est.ess == pytest.approx(1000)
    assert est.max_weight == pytest.approx(1e-3)


def test_finalise_solves_the_accumulated_system(float64):
    model, x = tiny("explicit")
    model.fit_alpha(x, "sm", batch_size=7)  # uneven batches: G and b are weighted by rows
    G, b = model.alpha_system(x, "sm")
    lam = 10 ** float(model.log10_lambda.detach())
    residual = (G + lam * torch.eye(4)) @ model.alpha + b
    assert float(residual.abs().max()) < 1e-8
    sm = lambda a: float(get_loss("sm")(model.with_alpha(a), x).loss.detach())  # noqa: E731
    assert sm(model.alpha) < sm(torch.zeros(4))


def test_objective_splits_training_batches_and_refits_alpha_for_evaluation():
    model, x = tiny("explicit")
    objective = DKEFObjective("ssm", {}, x)
    model.train()
    out = objective(model, x[:8])
    out.loss.backward()
    assert model.log10_lambda.grad is not None and model.z.grad is not None  # gradients through the solve
    with pytest.raises(ValueError, match=">= 2 rows"):
        objective(model, x[:1])
    model.eval()
    assert float(model.alpha.abs().sum()) == 0
    objective(model, x[:8])
    fitted = model.alpha.clone()
    assert float(fitted.abs().sum()) > 0
    objective(model, x[:8])  # weights unchanged: no refit
    assert torch.equal(model.alpha, fitted)
    with pytest.raises(ValueError, match="cannot be trained by 'mle'"):
        DKEFObjective("mle", {}, x)


def test_short_fit_recovers_a_gaussian_density():
    torch.manual_seed(0)
    mean, chol = torch.tensor([0.5, -0.3]), torch.tensor([[1.0, 0.0], [0.6, 0.5]])
    true = torch.distributions.MultivariateNormal(mean, scale_tril=chol)
    data = true.sample((1600,))
    train, val, test = data[:1000], data[1000:1200], data[1200:]
    model = build_dkef(2, variant="explicit", width=16, depth=2, deq=DEQSettings(), train=train, n_inducing=20)
    objective = DKEFObjective("sm", {}, train)
    fit(model, objective, train, val, TrainSettings(steps=150, batch_size=100, lr=1e-2, eval_every=50, progress=False))
    model.fit_alpha(train, "sm")
    est = importance_log_normaliser(lambda x: -model(x), GaussianProposal(2), n_samples=20_000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loglik = float((-model(test)).mean()) - est.log_z
    true_loglik = float(true.log_prob(test).mean())
    assert est.se < 0.02
    assert abs(loglik - true_loglik) < 0.15, (loglik, true_loglik)


def test_the_ridge_is_fitted_on_validation_data(float64):
    """The finalise step's λ selection: its shortcut objective b_valᵀα + ½αᵀG_valα is the exact SM loss on the
    validation rows up to a constant (checked at two λ against the loss itself), and from a bad trained λ
    (log10 λ = 3: α ≈ 0, the base density) it moves to a λ with a lower validation loss."""
    from deqsm.experiments import VariantSpec, finalize

    torch.manual_seed(0)
    data = torch.cat([torch.randn(150, 2) * 0.4 + 1.5, torch.randn(150, 2) * 0.4 - 1.5])
    data = data[torch.randperm(300)]
    train, val = data[:200], data[200:]
    model = build_dkef(2, variant="explicit", width=8, depth=2, deq=EXACT_DEQ, train=train, n_inducing=10,
                       log10_lambda=3.0, lambda_on_validation=True)
    model.eval()

    def val_loss(log10_lam):
        with torch.no_grad():
            model.log10_lambda.fill_(log10_lam)
        model.fit_alpha(train, "sm")
        return float(get_loss("sm")(model.with_alpha(model.alpha), val).loss.detach())

    low, high = val_loss(-3.0), val_loss(1.0)
    info = model.select_lambda(train, val, "sm", grid=torch.tensor([-3.0, 1.0]))
    # select_lambda scored the trained value (1.0, set by the last val_loss call) and the grid
    assert info["log10_lambda_trained"] == 1.0
    assert info["lambda_val_objective"] - info["lambda_val_objective_trained"] == pytest.approx(
        min(low, high) - high, rel=1e-8, abs=1e-10)
    assert info["log10_lambda"] == (-3.0 if low < high else 1.0)

    with torch.no_grad():
        model.log10_lambda.fill_(3.0)
    spec = VariantSpec(name="explicit-2", model="dkef", width=8, variant="explicit", depth=2, loss={"name": "sm"})
    chosen = finalize(spec, model, train, val)
    assert chosen["log10_lambda_trained"] == 3.0 and chosen["log10_lambda"] < 3.0
    assert chosen["lambda_val_objective"] < chosen["lambda_val_objective_trained"]
    assert float(model.log10_lambda.detach()) == chosen["log10_lambda"]
    base = val_loss(3.0)
    assert val_loss(chosen["log10_lambda"]) < base
    model.lambda_on_validation = False  # the default: the trained λ is kept
    assert finalize(spec, model, train, val) == {} and float(model.log10_lambda.detach()) == chosen["log10_lambda"]
