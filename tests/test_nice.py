"""NICE: exact log-likelihood equals a brute-force change of variables, the flow inverts, the logit
Jacobian of bits/dim is right, CP matches exact SM in expectation, and short fits improve the model."""
import pytest
import torch

from deqsm.config import DEQSettings
from deqsm.losses import get_loss
from deqsm.metrics.density import bits_per_dim, logit_log_jacobian
from deqsm.models.nice import build_nice
from deqsm.train import TrainSettings, fit
from deqsm.train import mean_loss
from model_checks import assert_cp_unbiased

EXACT_DEQ = DEQSettings(tol=1e-12, max_iter=300)


def tiny(variant="explicit", dim=5, seed=0, deq=EXACT_DEQ, **kw):
    torch.manual_seed(seed)
    model = build_nice(dim, variant=variant, width=7, depth=2, deq=deq, train=torch.zeros(1, dim), **kw)
    with torch.no_grad():
        model.log_scale.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("variant", ["explicit", "deq"])
@pytest.mark.parametrize("dim", [4, 5])
def test_log_likelihood_equals_brute_force_change_of_variables(float64, variant, dim):
    model = tiny(variant, dim)
    x = torch.randn(3, dim)
    for row in x:
        jac = torch.autograd.functional.jacobian(lambda r: model.transform(r[None])[0], row)
        y = model.transform(row[None])[0]
        brute = (torch.distributions.Normal(0.0, 1.0).log_prob(y).sum() + torch.linalg.slogdet(jac)[1]).detach()
        assert float(model.log_prob(row[None])[0].detach()) == pytest.approx(float(brute), abs=1e-9)
    assert torch.allclose(model.inverse(model.transform(x)), x, atol=1e-9)


def test_image_shaped_input_and_samples(float64):
    model = tiny("explicit", 16)
    x = torch.randn(2, 1, 4, 4)
    assert torch.allclose(model.log_prob(x), model.log_prob(x.flatten(1)))
    s = get_loss("ssm")(model, x)  # the score has x's shape
    assert torch.isfinite(s.loss)
    assert model.sample(3).shape == (3, 16)


def test_logit_jacobian_and_bits_per_dim(float64):
    alpha = 0.05
    u = torch.rand(4, 3) * 0.98 + 0.01
    to_logit = lambda v: torch.logit(alpha + (1 - 2 * alpha) * v)  # noqa: E731
    y = to_logit(u)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(to_logit, u[i])
        assert float(logit_log_jacobian(y[i:i + 1], alpha)[0]) == pytest.approx(float(torch.linalg.slogdet(jac)[1]))
    # A density uniform on the pixel cube has log p(u) = 0: bpd = log2(levels) exactly.
    log_p_y = -logit_log_jacobian(y, alpha)
    assert torch.allclose(bits_per_dim(log_p_y, y, alpha=alpha, levels=256), torch.full((4,), 8.0))


@pytest.mark.parametrize("variant", ["explicit", "deq"])
def test_cp_estimates_the_exact_sm_loss(float64, variant):
    model = tiny(variant, 4)
    x = torch.randn(5, 4)
    energy, _, _ = model.energy_layers(x)
    assert torch.allclose(energy, model(x))
    sm = get_loss("sm")(model, x).scalars()
    cp = get_loss("cp", generator=torch.Generator().manual_seed(0))(model, x).scalars()
    assert cp["norm"] == pytest.approx(sm["norm"], rel=1e-12)  # the ½‖s‖² term is exact in CP
    assert_cp_unbiased(model, x, sm["trace"], draws=300)  # the trace: unbiased, within 4 se of its own spread


def test_cp_through_a_non_phantom_deq_says_why_it_cannot():
    model = tiny("deq", 4, deq=DEQSettings(backward="implicit"))
    with pytest.raises(ValueError, match="needs backward='phantom'"):
        get_loss("cp")(model, torch.randn(3, 4))


def correlated_gaussian(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    chol = torch.tensor([[1.0, 0, 0, 0], [0.8, 0.6, 0, 0], [0.0, 0.5, 0.5, 0], [0.3, 0.0, 0.4, 0.5]])
    return torch.randn(n, 4, generator=gen) @ chol.t() + 1.0


@pytest.mark.parametrize("variant", ["explicit", "deq"])
def test_short_ssm_fit_lowers_the_test_sm_loss(variant):
    data = correlated_gaussian(1400)
    train, val, test = data[:1000], data[1000:1200], data[1200:]
    model = tiny(variant, 4, deq=DEQSettings())
    sm = lambda: mean_loss(model, lambda m, x: get_loss("sm")(m, x), test, 200)["loss"]  # noqa: E731
    before = sm()
    fit(model, lambda m, x: get_loss("ssm")(m, x), train, val,
        TrainSettings(steps=120, batch_size=100, lr=1e-2, eval_every=40, progress=False))
    assert sm() < before - 0.5


def test_maximum_likelihood_fit_raises_the_test_log_likelihood():
    from deqsm.experiments import VariantSpec, build

    data = correlated_gaussian(1200, seed=1)
    spec = VariantSpec(name="nice-mle", model="nice", variant="explicit", width=7, loss={"name": "mle"})
    torch.manual_seed(0)
    model, objective = build(spec, data[:1000])
    test = data[1000:]
    before = float(model.log_prob(test).mean().detach())
    fit(model, objective, data[:1000], None,
        TrainSettings(steps=100, batch_size=100, lr=1e-2, eval_every=50, progress=False))
    after = float(model.log_prob(test).mean().detach())
    true = torch.distributions.MultivariateNormal(torch.ones(4), scale_tril=torch.tensor(
        [[1.0, 0, 0, 0], [0.8, 0.6, 0, 0], [0.0, 0.5, 0.5, 0], [0.3, 0.0, 0.4, 0.5]]))
    assert after > before + 1.0
    assert after > float(true.log_prob(test).mean()) - 0.3
