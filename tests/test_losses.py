"""Score-matching losses against closed forms on a Gaussian energy, and against each other."""
import pytest
import torch
from torch import nn

from deqsm.losses import LOSSES, get_loss, get_score_loss, sample_projections
from deqsm.models.energy_mlp import DEQEnergyMLP, ExplicitEnergyMLP
from deqsm.registry import UnknownNameError
from model_checks import assert_cp_unbiased

D = 4


class GaussianEnergy(nn.Module):
    """E(x) = ½ (x − μ)ᵀ P (x − μ), P = L Lᵀ; written as u = Lᵀ(x − μ), h = ½u², E = Σ h, so it is also a
    layered energy (σ'' = 1) for curvature propagation."""

    def __init__(self, gen):
        super().__init__()
        a = torch.randn(D, D, generator=gen)
        self.L = a / D**0.5 + torch.eye(D)
        self.mu = torch.randn(D, generator=gen)

    @property
    def precision(self):
        return self.L @ self.L.t()

    def energy_layers(self, x):
        u = (x - self.mu) @ self.L
        h = 0.5 * u**2
        return h.sum(1), [u], [h]

    def activation_second_derivative(self, u):
        return torch.ones_like(u)

    def forward(self, x):
        return self.energy_layers(x)[0]


class IndefiniteQuadratic(GaussianEnergy):
    """E(x) = Σ_j ±½u_j², u = Lᵀ(x − μ): the readout's signs make ∇²E = L diag(±1) Lᵀ indefinite."""

    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])

    def energy_layers(self, x):
        u = (x - self.mu) @ self.L
        h = 0.5 * u**2
        return (h * self.sign.to(h)).sum(1), [u], [h]


@pytest.fixture
def gaussian(float64):
    gen = torch.Generator().manual_seed(0)
    model = GaussianEnergy(gen)
    x = torch.randn(64, D, generator=gen) + model.mu
    return model, x


def sm_closed_form(model, x):
    p = model.precision
    s = -(x - model.mu) @ p
    return -torch.trace(p) + 0.5 * (s**2).sum(1).mean()


def test_sm_closed_form(gaussian):
    model, x = gaussian
    expected = sm_closed_form(model, x)
    for batched in (True, False):
        out = get_loss("sm", batched=batched)(model, x)
        assert torch.allclose(out.loss, expected, rtol=1e-12)
        assert torch.allclose(out.terms["trace"], -torch.trace(model.precision))


@pytest.mark.parametrize("name,noise", [("ssm", "rademacher"), ("ssm", "gaussian"), ("ssm", "sphere"),
                                        ("ssm_vr", "rademacher"), ("ssm_vr", "gaussian"), ("cp", None)])
def test_stochastic_losses_average_to_sm(gaussian, name, noise):
    model, x = gaussian
    target = float(sm_closed_form(model, x))
    opts = {} if noise is None else {"noise": noise}
    errors = []
    for particles in (1, 400):
        gen = torch.Generator().manual_seed(7)
        vals = torch.tensor([float(get_loss(name, n_particles=particles, generator=gen, **opts)(model, x).loss.detach())
                             for _ in range(5)])
        errors.append(abs(float(vals.mean()) - target))
    assert errors[1] < 0.03 * abs(target) + 1e-3, errors
    if name != "cp":  # CP on a quadratic is exact (all curvature coefficients ≥ 0 and E[z²] = 1 per draw
        assert errors[1] < errors[0]  # is not enough: it still varies); the others must improve with particles


def test_cp_matches_sm_on_softplus_mlp(float64):
    torch.manual_seed(0)
    model = ExplicitEnergyMLP(D, 16, 3)
    with torch.no_grad():
        model.net.readout.weight.mul_(torch.sign(torch.randn_like(model.net.readout.weight)))  # mixed-sign curvature
    x = torch.randn(32, D)
    exact = float(get_loss("sm")(model, x).terms["trace"].detach())
    assert_cp_unbiased(model, x, exact)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian", "sphere"])
@pytest.mark.parametrize("particles", [1, 3])
def test_sliced_losses_per_draw_equal_hand_computed_values(gaussian, noise, particles):
    """With the projections fixed (the same seeded draw), each sliced loss is a known number per draw: for
    s(x) = −P(x − μ), ∂s/∂x = −P, so vᵀ(∂s/∂x)v = −vᵀPv; the norm term is ½(vᵀs)² (ssm) or ½‖s‖² (ssm_vr)."""
    model, x = gaussian
    xr = x.repeat(particles, 1)
    v = sample_projections(xr, noise, torch.Generator().manual_seed(11))
    s = -(xr - model.mu) @ model.precision
    curvature = -torch.einsum("bi,ij,bj->b", v, model.precision, v)
    norms = {"ssm": 0.5 * (v * s).sum(1) ** 2, "ssm_vr": 0.5 * (s**2).sum(1)}
    for name, norm in norms.items():
        out = get_loss(name, noise=noise, n_particles=particles, generator=torch.Generator().manual_seed(11))(model, x)
        got = out.scalars()
        assert got["curvature"] == pytest.approx(float(curvature.mean()), rel=1e-12)
        assert got["norm"] == pytest.approx(float(norm.mean()), rel=1e-12), name
        assert got["loss"] == pytest.approx(float((curvature + norm).mean()), rel=1e-12), name
    assert float(norms["ssm"].mean()) != pytest.approx(float(norms["ssm_vr"].mean()), rel=1e-3)  # they differ


def test_sliced_loss_of_a_score_network_per_draw_against_a_brute_force_jacobian(float64):
    """A score net with a non-symmetric Jacobian: vᵀ J v per sample from torch.autograd.functional.jacobian."""
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(D, 7, generator=gen), torch.randn(7, D, generator=gen)
    score_fn = lambda x_: torch.tanh(x_ @ a) @ b  # noqa: E731
    x = torch.randn(6, D, generator=gen)
    v = sample_projections(x, "rademacher", torch.Generator().manual_seed(2))
    jac = torch.stack([torch.autograd.functional.jacobian(lambda r: score_fn(r[None])[0], row) for row in x])
    s = score_fn(x)
    curvature = torch.einsum("bi,bij,bj->b", v, jac, v)
    for name, norm in (("ssm", 0.5 * (v * s).sum(1) ** 2), ("ssm_vr", 0.5 * (s**2).sum(1))):
        out = get_score_loss(name, generator=torch.Generator().manual_seed(2))(score_fn, x)
        assert float(out.loss.detach()) == pytest.approx(float((curvature + norm).mean()), rel=1e-12), name


def test_cp_matches_sm_through_a_mixed_sign_hessian(float64):
    """Negative curvature coefficients (the imaginary part Q of CP's V = P + iQ) carry a real share of the trace
    here: a sign error on Q² moves the mean by many standard errors."""
    model = IndefiniteQuadratic(torch.Generator().manual_seed(0))
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(1))
    exact = -float(torch.trace(model.L @ torch.diag(model.sign.to(model.L)) @ model.L.t()))  # tr ∇ₓs = −tr ∇²E
    assert_cp_unbiased(model, x, exact)


def test_dsm_closed_form(gaussian):
    """Data x ~ N(μ, I), model precision P: E ½‖s(x̃) + ε/σ‖² = ½[tr(P²) + ‖I/σ − σP‖_F²];
    with a σ ladder and σ² weights: ½ E_σ[σ² tr(P²) + ‖I − σ²P‖_F²]."""
    model, _ = gaussian
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200_000, D, generator=gen) + model.mu
    p, eye = model.precision, torch.eye(D)
    sigma = 0.5
    expected = 0.5 * (torch.trace(p @ p) + ((eye / sigma - sigma * p) ** 2).sum())
    got = get_loss("dsm", sigma=sigma, generator=gen)(model, x).loss
    assert abs(float(got.detach() / expected) - 1) < 0.01
    ladder = [1.0, 0.5, 0.25]
    expected = sum(0.5 * (s**2 * torch.trace(p @ p) + ((eye - s**2 * p) ** 2).sum()) for s in ladder) / 3
    got = get_loss("dsm", sigmas=ladder, generator=gen)(model, x).loss
    assert abs(float(got.detach() / expected) - 1) < 0.01


@pytest.mark.parametrize("name", ["sm", "ssm", "ssm_vr", "dsm"])
def test_loss_through_implicit_deq_equals_converged_unroll(name, float64):
    torch.manual_seed(2)
    values = {}
    for mode in ("implicit", "unroll"):
        torch.manual_seed(2)
        model = DEQEnergyMLP(3, 6, lam=1.5, backward=mode, tol=1e-13, max_iter=400)
        x = torch.randn(5, 3)
        opts = {"batched": False} if name == "sm" else {"generator": torch.Generator().manual_seed(0)}
        out = get_loss(name, **opts)(model, x)
        # the readout bias shifts E by a constant: no score loss depends on it
        params = [p for n, p in model.named_parameters() if n != "net.readout.bias"]
        grads = torch.autograd.grad(out.loss, params)
        values[mode] = (out.loss.detach(), torch.cat([g.flatten() for g in grads]))
    (li, gi), (lu, gu) = values["implicit"], values["unroll"]
    assert abs(float(li - lu)) <= 1e-9 * abs(float(lu))
    assert float((gi - gu).norm() / gu.norm()) <= 1e-6


def test_every_loss_runs_on_deq_and_explicit():
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    for model in (ExplicitEnergyMLP(5, 8, 2), DEQEnergyMLP(5, 8, backward="phantom")):
        for name in LOSSES.names():
            out = get_loss(name)(model, x)
            out.loss.backward()
            assert torch.isfinite(out.loss)
            for n, p in model.named_parameters():  # the readout bias shifts E by a constant: no gradient
                assert (p.grad is None) == (n == "net.readout.bias"), n
                assert p.grad is None or bool(torch.isfinite(p.grad).all())
            model.zero_grad()


def test_score_network_entry_point(float64):
    # a score net that outputs s(x) = −P(x − μ) directly gives the same loss as the energy model
    gen = torch.Generator().manual_seed(0)
    model = GaussianEnergy(gen)
    x = torch.randn(16, D, generator=gen)
    score_fn = lambda x_: -(x_ - model.mu) @ model.precision  # noqa: E731
    for name in ("sm", "ssm", "ssm_vr", "dsm"):
        a = get_score_loss(name, generator=torch.Generator().manual_seed(1))(score_fn, x) if name != "sm" else get_score_loss(name)(score_fn, x)
        b = get_loss(name, generator=torch.Generator().manual_seed(1))(model, x) if name != "sm" else get_loss(name)(model, x)
        assert torch.allclose(a.loss, b.loss)
    sig_seen = []
    cond = lambda x_, s: (sig_seen.append(s), -x_)[1]  # noqa: E731
    get_score_loss("dsm", sigmas=[1.0, 0.1], noise_conditional=True)(cond, x)
    assert sig_seen[0].shape == (16,) and set(sig_seen[0].tolist()) <= {1.0, 0.1}
    with pytest.raises(ValueError, match="needs an energy model"):
        get_score_loss("cp")


def test_bad_input():
    model = ExplicitEnergyMLP(3, 4, 1)
    with pytest.raises(UnknownNameError, match="unknown loss 'ssmvr'; known: cp, dsm, sm, ssm, ssm_vr"):
        get_loss("ssmvr")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['n_particle'\] for loss 'ssm'"):
        get_loss("ssm", n_particle=2)
    with pytest.raises(ValueError, match="unknown projection noise 'uniform'"):
        get_loss("ssm", noise="uniform")
    with pytest.raises(ValueError, match="NaN or Inf"):
        get_loss("ssm")(model, torch.tensor([[0.0, float("inf"), 1.0]]))
    with pytest.raises(TypeError, match="floating-point"):
        get_loss("ssm")(model, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"energies of shape \(2,\)"):
        get_loss("ssm")(lambda x: x.sum(), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="cp needs an energy made of affine maps"):
        get_loss("cp")(lambda x: x.sum(1), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="backward='phantom'"):
        get_loss("cp")(DEQEnergyMLP(3, 4, backward="implicit"), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="n_particles"):
        get_loss("ssm", n_particles=0)(model, torch.zeros(2, 3))
