"""Effective depth of DEQ layers (deqsm.depth): the contraction estimate against exact references, the depth gain,
the gradient cosine, and the measurement inside training and evaluation."""
import dataclasses

import pytest
import torch

from deqsm.deq import DEQ, SoftplusCell
from deqsm.depth import (DEPTH_KEYS, depth_probe, effective_depth, layer_depth, local_lipschitz,
                         record_layer_inputs)
from deqsm.fidelity import backward_cosine
from deqsm.losses import get_loss
from deqsm.models.conv import ConvSoftplusCell, NormalizedConv2d
from deqsm.models.energy_mlp import build_energy_mlp
from deqsm.config import DEQSettings


def _dense_norms(cell, x, z):
    """‖∂f/∂z‖₂ per row from the dense Jacobian of one row at a time."""
    out = []
    for i in range(z.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda zz: cell(zz[None], x[i:i + 1])[0], z[i])
        out.append(torch.linalg.matrix_norm(jac.reshape(z[i].numel(), z[i].numel()), ord=2))
    return torch.stack(out)


def test_contraction_matches_the_dense_jacobian_of_a_small_cell():
    torch.manual_seed(0)
    cell = SoftplusCell(6, lam=1.2, norm="spectral").double()
    x, z = torch.randn(4, 6, dtype=torch.double), torch.randn(4, 6, dtype=torch.double)
    estimate = local_lipschitz(lambda z_: cell(z_, x), z, iters=200)
    torch.testing.assert_close(estimate, _dense_norms(cell, x, z), rtol=1e-6, atol=1e-9)


def test_contraction_equals_the_weight_norm_in_the_linear_regime():
    """Softplus' slope is 1 for large inputs: there ∂f/∂z = Ŵ and the contraction is ‖Ŵ‖₂ itself."""
    torch.manual_seed(1)
    for norm, lam in (("frobenius", 2.0), ("spectral", 1.05)):
        layer = DEQ(SoftplusCell(20, lam=lam, norm=norm).double(), tol=1e-10, max_iter=200)
        with torch.no_grad():
            layer.cell.linear.weight.abs_()  # Ŵ ≥ 0, so z* ≥ 0 and every pre-activation Ŵz* + x ≥ x
        x = 40.0 + torch.rand(8, 20, dtype=torch.double)  # pre-activations far in Softplus' linear part
        d = layer_depth(layer, x, torch.zeros_like(x), power_iters=300)
        expected = float(torch.linalg.matrix_norm(layer.cell.linear.normalized_weight().detach(), ord=2))
        assert d["weight_norm"] == pytest.approx(expected, rel=1e-9)
        assert d["contraction"] == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1 / 1.05, rel=1e-4)  # spectral: ‖Ŵ‖₂ = 1/λ


def test_frobenius_normalisation_makes_a_weak_contraction_and_a_one_layer_fixed_point():
    """The finding of issue 14: λ = 2 Frobenius gives ‖Ŵ‖₂ ≈ 2/(λ√n) and z* within a few % of one cell step; the
    spectral norm at λ close to 1 is a deeper equilibrium."""
    torch.manual_seed(0)
    x = torch.randn(256, 30)
    shallow = layer_depth(DEQ(SoftplusCell(30, lam=2.0, norm="frobenius"), tol=1e-4, max_iter=40), x,
                          torch.zeros_like(x))
    deep = layer_depth(DEQ(SoftplusCell(30, lam=1.05, norm="spectral"), tol=1e-4, max_iter=40), x, torch.zeros_like(x))
    assert shallow["weight_norm"] < 0.25 and shallow["contraction"] <= shallow["weight_norm"] + 1e-6
    assert shallow["depth_gain"] < 0.1 and shallow["iterations"] <= 8
    assert deep["contraction"] > 3 * shallow["contraction"] and deep["depth_gain"] > 3 * shallow["depth_gain"]
    assert deep["iterations"] > shallow["iterations"] and deep["converged"] == 1.0


def test_a_cell_constant_in_z_has_no_depth():
    layer = DEQ(SoftplusCell(5), tol=1e-8)
    with torch.no_grad():
        layer.cell.linear.weight.zero_()  # Ŵ = 0: f(z, x) = softplus(x) whatever z
    x = torch.randn(7, 5)
    d = layer_depth(layer, x, torch.zeros_like(x))
    assert d["contraction"] == 0.0 and d["depth_gain"] == 0.0 and d["weight_norm"] == 0.0


def test_conv_operator_norm_bounds_and_matches_power_iteration_on_the_convolution():
    torch.manual_seed(2)
    for norm in ("frobenius", "operator"):
        conv = NormalizedConv2d(4, lam=1.5, norm=norm).double()
        size = (8, 8)
        bound = float(conv.operator_norm(size).detach())
        z = torch.randn(3, 4, *size, dtype=torch.double)
        power = local_lipschitz(conv, z, iters=500)  # the map is linear: its norm at any z, per image
        assert float(power.max()) <= bound * (1 + 1e-9)
        assert float(power.max()) >= 0.9 * bound  # the enlarged-grid bound is tight in practice
        if norm == "operator":
            assert bound == pytest.approx(1 / 1.5, rel=1e-4)
    cell = ConvSoftplusCell(4, lam=1.5, norm="operator").double()
    layer = DEQ(cell, tol=1e-10, max_iter=300)
    u = 40.0 + torch.rand(2, 4, *size, dtype=torch.double)
    d = layer_depth(layer, u, torch.zeros_like(u), power_iters=300)
    assert d["contraction"] == pytest.approx(float(local_lipschitz(cell.conv, u, iters=300).mean()), rel=1e-6)


def test_record_layer_inputs_caps_rows_and_removes_its_hooks():
    model = build_energy_mlp(3, variant="deq", width=8, depth=1, deq=DEQSettings(), train=torch.randn(10, 3))
    layer = model.deq
    seen = record_layer_inputs(model, lambda: [model(torch.randn(40, 3)) for _ in range(3)], max_rows=100)
    x, z0 = seen["net.deq"]
    assert x.shape == (100, 8) and z0.shape == (100, 8) and not x.requires_grad
    assert not layer._forward_pre_hooks


_SSM = get_loss("ssm")


def _ssm(model, x):
    torch.manual_seed(0)  # the same projections for every call
    return _SSM(model, x)


def test_effective_depth_of_a_deq_model_and_nothing_for_an_explicit_one():
    torch.manual_seed(0)
    train = torch.randn(64, 3)
    deq = build_energy_mlp(3, variant="deq", width=16, depth=1, deq=DEQSettings(), train=train)
    out = effective_depth(deq, _ssm, train)
    assert set(out) == set(DEPTH_KEYS)
    assert 0 < out["deq_contraction"] <= out["deq_weight_norm"] + 1e-6 < 1
    assert 0.99 < out["deq_grad_cosine"] <= 1 + 1e-9  # phantom K = 2 at a weak contraction: nearly exact
    explicit = build_energy_mlp(3, variant="explicit", width=16, depth=2, deq=DEQSettings(), train=train)
    assert effective_depth(explicit, _ssm, train) == {} and depth_probe(explicit, _ssm, train) == {}


def test_backward_cosine_is_exact_for_implicit_and_improves_with_phantom_steps():
    torch.manual_seed(0)
    train = torch.randn(32, 3, dtype=torch.double)
    settings = DEQSettings(norm="spectral", lam=1.05, tol=1e-10, max_iter=200)
    model = build_energy_mlp(3, variant="deq", width=12, depth=1, deq=settings, train=train.float()).double()
    cosines = []
    for k in (1, 8):
        model.deq.set_backward("phantom", k)
        cosines.append(backward_cosine(model, _ssm, train))
    assert cosines[0] < cosines[1] <= 1 + 1e-12
    model.deq.set_backward("implicit")
    assert backward_cosine(model, _ssm, train) == 1.0
    assert model.deq.backward == "implicit"  # the layer's own mode is restored


def test_the_probe_leaves_the_random_state_and_the_training_mode_alone():
    torch.manual_seed(3)
    model = build_energy_mlp(2, variant="deq", width=8, depth=1, deq=DEQSettings(), train=torch.randn(10, 2))
    model.train()
    x = torch.randn(16, 2)
    state = torch.random.get_rng_state()
    depth_probe(model, _ssm, x)
    assert torch.equal(state, torch.random.get_rng_state()) and model.training


def test_a_vae_score_network_is_measured_though_its_evaluation_objective_never_calls_it():
    """The VAE's evaluation-mode objective is its bound (no score network): the probe runs the training objective."""
    from deqsm.models.vae import build_vae, vae_objective

    torch.manual_seed(0)
    train = (torch.rand(64, 16) > 0.5).float()
    model = build_vae(16, variant="deq", width=16, depth=1, deq=DEQSettings(), train=train, z_dim=2, hidden_width=16,
                      val_elbo_samples=4)
    model.eval()
    out = effective_depth(model, vae_objective("ssm_vr", {}, train), train)
    assert set(out) == set(DEPTH_KEYS) and 0 < out["deq_contraction"] < 1 and out["deq_grad_cosine"] > 0.9
    assert not model.training


# ---------------------------------------------------------------------------------------------------
# A learned gain: Ŵ = sigmoid(g)/λ · W/‖W‖ (deq.gain: learned)
# ---------------------------------------------------------------------------------------------------
def test_a_learned_gain_starts_below_its_bound_and_sets_the_spectral_norm():
    from deqsm.normalization import GAIN_INIT, NormalizedLinear

    layer = NormalizedLinear(10, lam=1.05, norm="spectral", learn_gain=True).double()
    with torch.no_grad():
        assert float(layer.gain()) == pytest.approx(GAIN_INIT / 1.05)
        assert float(layer.operator_norm()) == pytest.approx(GAIN_INIT / 1.05, rel=1e-5)
        layer.gain_logit.fill_(-2.0)  # a new gain (its version changes): the cached weight follows it
        assert float(layer.operator_norm()) == pytest.approx(float(torch.sigmoid(torch.tensor(-2.0))) / 1.05, rel=1e-5)
    fixed = NormalizedLinear(10, lam=1.05, norm="spectral")
    assert fixed.gain_logit is None and [n for n, _ in fixed.named_parameters()] == ["weight"]


def test_the_gain_is_trained_and_stays_in_its_bound_at_every_step():
    """Training moves the gain, and the layer stays a contraction (‖Ŵ‖₂ = γ < 1/λ) after every optimiser step, even
    at a learning rate that throws the gain logit far."""
    from deqsm.train import Callback, TrainSettings, fit

    torch.manual_seed(0)
    settings = DEQSettings(norm="spectral", lam=1.05, gain="learned")
    model = build_energy_mlp(2, variant="deq", width=16, depth=1, deq=settings, train=torch.randn(8, 2))
    linear = model.net.deq.cell.linear
    start = float(linear.gain_logit.detach())
    norms = []

    class Watch(Callback):
        def on_step(self, step, metrics):
            with torch.no_grad():
                norms.append(float(linear.operator_norm()))

    data = torch.randn(256, 2) * 0.5
    fit(model, _ssm, data, data[:64], TrainSettings(steps=60, batch_size=64, lr=0.3, eval_every=30, progress=False),
        [Watch()])
    assert len(norms) == 60 and max(norms) < 1 / 1.05
    assert abs(float(linear.gain_logit.detach()) - start) > 0.1  # the gain was learned


def test_the_exact_implicit_gradient_reaches_the_gain():
    """The implicit backward differentiates every parameter of the cell, the gain included: its derivative of a
    fixed-point functional matches central finite differences (float64)."""
    torch.manual_seed(0)
    layer = DEQ(SoftplusCell(6, lam=1.05, norm="spectral", learn_gain=True).double(), backward="implicit",
                tol=1e-12, max_iter=300)
    x = torch.randn(4, 6, dtype=torch.double)
    g = layer.cell.linear.gain_logit
    (grad,) = torch.autograd.grad(layer(x, torch.zeros_like(x)).pow(2).sum(), g)
    h = 1e-6
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            g.add_(sign * h)
            values.append(float(layer(x, torch.zeros_like(x)).pow(2).sum()))
            g.sub_(sign * h)
    assert float(grad) == pytest.approx((values[0] - values[1]) / (2 * h), rel=1e-5)


def test_a_conv_cell_with_a_learned_gain_is_bounded_by_its_operator_norm():
    from deqsm.models.conv import NormalizedConv2d

    conv = NormalizedConv2d(3, lam=1.2, norm="operator", learn_gain=True).double()
    with torch.no_grad():
        conv.gain_logit.fill_(0.0)  # γ = 0.5 / λ
        assert float(conv.operator_norm((8, 8))) == pytest.approx(0.5 / 1.2, rel=1e-4)


# The solver and gradient settings the README recommends for a contraction near 1 (issue 14, item 2): Anderson
# (memory 5) to tol 1e-4 within 100 iterations, and the exact implicit backward, its adjoint solves to the same
# tolerance relative to the gradient's norm. (Phantom is no substitute here: trained the same way, its gradient's
# cosine with the exact one was 0.991 at K = 16, 0.971 at K = 24, 0.9998 at K = 32: not monotone in K.)
NEAR_ONE = dict(solver="anderson", tol=1e-4, max_iter=100, adjoint_tol=1e-4, adjoint_stop_mode="rel")


def test_a_cell_at_lambda_1_01_converges_and_its_trained_gradient_is_exact(float64):
    """λ = 1.01 (‖Ŵ‖₂ = 0.99) with the injection's bias putting the Softplus near its linear regime: a deep cell
    (local contraction ≥ 0.8, measured: 0.85-0.87). Under the recommended settings every solve of a short SSM
    training run converges, and at the end the trained backward's parameter gradient has cosine ≥ 0.99 with the
    exact one (an implicit gradient solved to 1e-12)."""
    import copy

    from deqsm.models.energy_mlp import DEQEnergyMLP

    torch.manual_seed(0)
    model = DEQEnergyMLP(3, 12, lam=1.01, norm="spectral", backward="implicit", **NEAR_ONE)
    with torch.no_grad():
        model.net.inject.bias.fill_(3.0)
    data = torch.cat([torch.randn(128, 3) * 0.3 + 1.0, torch.randn(128, 3) * 0.3 - 1.0])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(20):
        batch = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(step))[:64]]
        opt.zero_grad()
        _ssm(model, batch).loss.backward()
        opt.step()
        assert model.deq.last_stats.converged, f"forward solve missed tol at step {step}"
        assert model.deq.backward_stats and all(s.converged for s in model.deq.backward_stats), step
    (x, z0), = record_layer_inputs(model, lambda: model(data[:64])).values()
    assert layer_depth(model.deq, x, z0)["contraction"] >= 0.8

    def grad(m):
        m.zero_grad()
        _ssm(m, data[:64]).loss.backward()
        return torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])

    exact = copy.deepcopy(model)
    exact.deq.solve_spec = dataclasses.replace(exact.deq.solve_spec, tol=1e-12, max_iter=400)
    exact.deq.adjoint_spec = dataclasses.replace(exact.deq.adjoint_spec, tol=1e-12, max_iter=800)
    cos = float(torch.nn.functional.cosine_similarity(grad(model), grad(exact), dim=0))
    assert cos >= 0.99, cos
