"""NCSN with a DEQ core (deqsm.models.ncsn), annealed Langevin dynamics (deqsm.sampling) and Fréchet
distances through torchmetrics (deqsm.metrics.fid)."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deqsm.config import DEQSettings
from deqsm.metrics.fid import (DigitsCNN, GivenFeatures, build_frechet_metric, classifier_accuracy,
                               frechet_distance, frechet_distance_of_features, gaussian_frechet_distance,
                               train_digits_cnn)
from deqsm.models.conv import NormalizedConv2d, conv_operator_norm
from deqsm.models.ncsn import NCSN, annealed_score_loss, build_ncsn
from deqsm.registry import UnknownNameError
from deqsm.sampling import annealed_langevin, geometric_sigmas, largest_pairwise_distance

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """Many steps on small tensors: a second OpenMP thread only adds synchronisation (and, on a shared
    machine, spin-waiting behind other processes)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------------
# Annealed Langevin dynamics
# ---------------------------------------------------------------------------------------------------
def test_langevin_with_exact_gaussian_score_recovers_mean_and_covariance(float64, one_thread):
    """The score of N(μ, Σ) perturbed by N(0, σ²I) is −(Σ + σ²I)⁻¹(x − μ); the chain must end at
    N(μ, Σ + σ_L² I) (up to the O(α) bias of unadjusted Langevin, < 1% here)."""
    mu = torch.tensor([1.0, -2.0])
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.8]])
    sigmas = geometric_sigmas(1.0, 0.1, 5)
    precisions = {s: torch.linalg.inv(cov + s**2 * torch.eye(2)) for s in sigmas}

    def score(x, sigma):
        return -(x - mu) @ precisions[float(sigma[0])].T

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(20000, 2, generator=g) * 8 - 4
    x, trace = annealed_langevin(score, x0, sigmas, step_lr=0.01, steps_per_level=400, generator=g, trace_every=500)
    assert len(trace) == 4
    target = cov + sigmas[-1] ** 2 * torch.eye(2)
    assert torch.allclose(x.mean(0), mu, atol=0.03)
    assert torch.allclose(torch.cov(x.T), target, atol=0.04, rtol=0.03)


def test_langevin_step_schedule_and_denoise(float64, one_thread):
    """With a zero score the chain moves by √α_i z only, so one step per level gives variance
    Σ_i α_i = ε Σ_i σ_i²/σ_L²: this checks the step-size schedule."""
    sigmas = [2.0, 1.0, 0.5]
    g = torch.Generator().manual_seed(0)
    x, _ = annealed_langevin(lambda x, s: torch.zeros_like(x), torch.zeros(40000, 1), sigmas, step_lr=0.01,
                             steps_per_level=1, generator=g)
    expected = 0.01 * sum((s / 0.5) ** 2 for s in sigmas)
    assert abs(float(x.var()) - expected) < 0.03 * expected
    # denoise adds σ_L² s(x, σ_L): with s ≡ 1 that is a shift of σ_L²
    x1, _ = annealed_langevin(lambda x, s: torch.ones_like(x), torch.zeros(3, 1), [0.5], step_lr=1e-12,
                              steps_per_level=1, denoise=True)
    assert torch.allclose(x1, torch.full((3, 1), 0.25), atol=1e-5)


def test_sampler_and_ladder_errors():
    assert geometric_sigmas(1.0, 0.01, 3) == pytest.approx([1.0, 0.1, 0.01])
    with pytest.raises(ValueError, match="sigma_min"):
        geometric_sigmas(0.1, 1.0, 3)
    with pytest.raises(ValueError, match="non-increasing"):
        annealed_langevin(lambda x, s: x, torch.zeros(2, 1), [0.1, 1.0])
    with pytest.raises(ValueError, match="score_fn returned shape"):
        annealed_langevin(lambda x, s: x[:, :1], torch.zeros(2, 3), [1.0], steps_per_level=1)
    with pytest.raises(FloatingPointError, match="step_lr"):
        annealed_langevin(lambda x, s: 1e3 * x, torch.ones(2, 1), [1.0], step_lr=10.0, steps_per_level=200)


# ---------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------
def gaussian_sample(mean, cov, n, g):
    return mean + torch.randn(n, mean.shape[0], generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T


def test_torchmetrics_frechet_distance_equals_closed_form():
    g = torch.Generator().manual_seed(0)
    d = 4
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    b = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov1, cov2 = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64), b @ b.T / d + 0.2 * torch.eye(d, dtype=torch.float64)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    x1, x2 = gaussian_sample(mu1, cov1, 100000, g), gaussian_sample(mu2, cov2, 100000, g)
    fd = frechet_distance_of_features(x1, x2)
    # exactly the closed form of the two sets' Gaussians (sample means, unbiased covariances: no rescaling)
    empirical = gaussian_frechet_distance(x1.mean(0), torch.cov(x1.T), x2.mean(0), torch.cov(x2.T))
    assert fd == pytest.approx(empirical, rel=1e-8)
    # and, up to sampling error, the closed form of the true Gaussians
    assert fd == pytest.approx(gaussian_frechet_distance(mu1, cov1, mu2, cov2), rel=0.02)


def test_closed_form_for_commuting_covariances():
    """Diagonal covariances: FD = ‖μ1 − μ2‖² + Σ (√a_k − √b_k)²."""
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([4.0, 1.0, 0.25])
    expected = 1 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert gaussian_frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, abs=1e-9)
    g = torch.Generator().manual_seed(1)
    x1 = gaussian_sample(mu1.double(), torch.diag(a).double(), 200000, g)
    x2 = gaussian_sample(mu2.double(), torch.diag(b).double(), 200000, g)
    assert frechet_distance_of_features(x1, x2) == pytest.approx(expected, rel=0.02)
    assert frechet_distance_of_features(x1, x1) == pytest.approx(0.0, abs=1e-6)


def test_frechet_metric_selection_is_offline_and_named(tmp_path):
    classifier = DigitsCNN()
    fd = build_frechet_metric("auto", classifier=classifier)
    assert fd.name == "fd_digits_cnn" and "Inception unavailable" in fd.note
    fd2 = build_frechet_metric("auto", inception_weights=tmp_path / "missing.pth", classifier=classifier)
    assert fd2.name == "fd_digits_cnn" and "not found" in fd2.note
    with pytest.raises(FileNotFoundError, match="extractor 'inception' needs"):
        build_frechet_metric("inception", inception_weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="needs a trained DigitsCNN"):
        build_frechet_metric("digits_cnn")
    with pytest.raises(ValueError, match="known: auto, digits_cnn, inception"):
        build_frechet_metric("clip")
    imgs = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(fd, imgs, imgs) == pytest.approx(0.0, abs=1e-4)
    assert frechet_distance(fd, imgs, 1 - imgs) > 0
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(fd, imgs, imgs[:1])
    with pytest.raises(ValueError, match=r"expected feature rows \(B, 3\)"):
        GivenFeatures(3)(torch.zeros(2, 4))


def test_digits_classifier_learns(one_thread):
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y = torch.tensor(labels)
    model = train_digits_cnn(x[:1200], y[:1200], epochs=4, seed=0)
    assert classifier_accuracy(model, x[1200:], y[1200:]) > 0.85
    assert model.features(x[:3]).shape == (3, model.num_features)


# ---------------------------------------------------------------------------------------------------
# The network and its losses
# ---------------------------------------------------------------------------------------------------
def test_normalized_conv_is_a_contraction():
    torch.manual_seed(0)
    conv = NormalizedConv2d(4, 3, lam=1.5)
    with torch.no_grad():
        conv.weight.mul_(50)  # the normalisation, not the init, must guarantee it
    z = torch.randn(64, 4, 6, 6)
    with torch.no_grad():
        ratio = conv(z).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)
    assert float(ratio.max()) <= 1 / 1.5 + 1e-6
    # power iteration on the (linear) map: its operator norm is below 1/λ too
    v = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        for _ in range(100):
            v = torch.nn.functional.conv_transpose2d(conv(v), conv.normalized_weight(), padding=1)
            v = v / v.norm()
        assert float(conv(v).norm()) <= 1 / 1.5 + 1e-6


def _power_norm(weight: torch.Tensor, size: int, iters: int = 1000) -> float:
    """‖W ⋆ ·‖₂ of the zero-padded 'same' convolution on size × size images, by power iteration."""
    F = torch.nn.functional
    v = torch.randn(1, weight.shape[1], size, size, dtype=weight.dtype, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for _ in range(iters):
            v = F.conv_transpose2d(F.conv2d(v, weight, padding=1), weight, padding=1)
            v = v / v.norm()
        return float(F.conv2d(v, weight, padding=1).norm())


@pytest.mark.parametrize("channels,size", [(1, 4), (4, 8), (16, 8), (3, 5)])
def test_conv_operator_norm_bounds_the_convolution_tightly(channels, size):
    torch.manual_seed(channels)
    w = torch.randn(channels, channels, 3, 3, dtype=torch.float64)
    bound, actual = float(conv_operator_norm(w, (size, size))), _power_norm(w, size)
    assert actual <= bound * (1 + 1e-9), "an upper bound"
    assert bound <= 1.25 * actual, "and a tight one (the zero padding makes small images the loosest case)"
    if channels >= 4:
        assert 3 * float(w.norm()) > 2 * bound, "k·‖W‖_F, the frobenius normalisation's bound, is far looser"


def test_conv_operator_norm_is_differentiable():
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w_: conv_operator_norm(w_, (3, 3)), (w,))


def test_operator_normalised_conv_reaches_its_limit_and_no_further():
    torch.manual_seed(0)
    lam = 1.5
    tight, loose = NormalizedConv2d(4, 3, lam=lam, norm="operator"), NormalizedConv2d(4, 3, lam=lam)
    loose.weight.data.copy_(tight.weight.data)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        first = tight.normalized_weight((8, 8))
        assert tight.normalized_weight((8, 8)) is first, "the graph-free solve normalises once per weight and size"
        assert tight.normalized_weight((6, 6)) is not first
        tight(z)  # forward normalises for the input's own size
    norm_tight, norm_loose = _power_norm(tight.normalized_weight((8, 8)), 8), _power_norm(loose.normalized_weight(), 8)
    assert 0.9 / lam <= norm_tight <= 1 / lam + 1e-6
    assert norm_loose < 0.6 * norm_tight, "the flattened-kernel bound leaves most of the contraction unused"
    with pytest.raises(ValueError, match="needs the image size"):
        torch.set_grad_enabled(True)
        tight.normalized_weight()


def test_ncsn_core_norm_option_reaches_the_deq_core():

    train = torch.rand(8, 1, 8, 8)
    model = build_ncsn(64, variant="deq", width=3, depth=1, deq=DEQSettings(), train=train, core_norm="operator")
    assert model.core.deq.cell.conv.norm == "operator"
    out = model(train, torch.full((8,), 0.5))
    out.square().sum().backward()
    assert torch.isfinite(model.core.deq.cell.conv.weight.grad).all()
    with pytest.raises(ValueError, match="unknown weight normalisation 'exact'"):
        build_ncsn(64, variant="deq", width=3, depth=1, deq=DEQSettings(), train=train, core_norm="exact")


def tiny_ncsn(variant: str, backward: str = "phantom") -> NCSN:
    deq = DEQSettings(solver="anderson", backward=backward, tol=1e-6, max_iter=40)
    return NCSN(1, 3, variant=variant, depth=2, deq=deq)


NCSN_CASES = [("explicit", "phantom")] + [("deq", b) for b in ("phantom", "unroll", "implicit")]


@pytest.mark.parametrize("loss", ["ssm", "ssm_vr", "dsm"])
@pytest.mark.parametrize("variant,backward", NCSN_CASES)
def test_every_variant_trains_with_each_loss_and_backward(variant, backward, loss):
    torch.manual_seed(0)
    model = tiny_ncsn(variant, backward)
    loss_fn = annealed_score_loss(loss, [1.0, 0.3, 0.1], generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    out = loss_fn(model, torch.rand(3, 1, 4, 4))
    assert bool(torch.isfinite(out.loss))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if variant == "deq":
        assert model.core.deq.last_stats.abs_residual_max < 1e-4


def test_annealed_sliced_loss_is_sigma_squared_weighted(float64):
    """For s(x, σ) = −c x (c fixed), the σ²-weighted SSM-VR terms are −σ² c d (Rademacher v) and
    σ² · ½ c² ‖x̃‖², x̃ = x + σε: rebuild σ and ε from the same seed and compare."""
    c = 0.7

    class LinearScore(torch.nn.Module):
        def forward(self, x, sigma):
            return -c * x

    sigmas = [2.0, 0.5]
    x = torch.rand(6, 1, 2, 2)
    out = annealed_score_loss("ssm_vr", sigmas, generator=torch.Generator().manual_seed(5))(LinearScore(), x)
    g = torch.Generator().manual_seed(5)
    sig = torch.tensor(sigmas)[torch.randint(0, 2, (6,), generator=g)]
    eps = torch.randn(x.shape, generator=g)
    x_noisy = x + sig.view(-1, 1, 1, 1) * eps
    d = 4
    assert float(out.terms["curvature"].detach()) == pytest.approx(float((-(sig**2) * c * d).mean()), rel=1e-10)
    norm = 0.5 * c**2 * x_noisy.flatten(1).pow(2).sum(1) * sig**2
    assert float(out.terms["norm"].detach()) == pytest.approx(float(norm.mean()), rel=1e-10)


def test_annealed_dsm_minimiser_is_the_noisy_score(float64):
    """For data at one point x0 = 0 the perturbed score is −x/σ², so σ s(x̃) + ε = 0 exactly and the
    σ²-weighted DSM loss is 0; any other scale does worse."""
    x0 = torch.zeros(4000, 1, 2, 2)

    class TrueScore(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale

        def forward(self, x, sigma):
            return -self.scale * x / sigma.view(-1, 1, 1, 1) ** 2

    loss = annealed_score_loss("dsm", [1.0, 0.1], generator=torch.Generator().manual_seed(0))
    assert float(loss(TrueScore(1.0), x0).loss.detach()) == pytest.approx(0.0, abs=1e-12)
    assert float(loss(TrueScore(0.8), x0).loss.detach()) > 0.05


def test_ncsn_errors_name_the_bad_input():
    with pytest.raises(UnknownNameError, match="known: deq, explicit"):
        NCSN(1, 4, variant="unet")
    model = tiny_ncsn("explicit")
    with pytest.raises(ValueError, match=r"sigma must be a scalar or have shape \(2,\)"):
        model(torch.rand(2, 1, 4, 4), torch.ones(3))
    with pytest.raises(ValueError, match="expects images"):
        model(torch.rand(2, 16), torch.ones(2))
    with pytest.raises(ValueError, match="sigmas must be a non-empty"):
        annealed_score_loss("ssm", [])
    with pytest.raises(ValueError, match="needs an energy model"):
        annealed_score_loss("cp", [1.0])
    with pytest.raises(UnknownNameError, match="known:"):
        annealed_score_loss("nce", [1.0])
    with pytest.raises(TypeError, match="annealed dsm sets sigma"):
        annealed_score_loss("dsm", [1.0], sigma=0.1)
    with pytest.raises(ValueError, match="contraction"):
        NormalizedConv2d(3, lam=1.0)


def test_ncsn_sampling_runs_and_is_clamped():
    model = tiny_ncsn("deq").eval()
    sigmas = geometric_sigmas(1.0, 0.1, 3)
    x, _ = annealed_langevin(model, torch.rand(5, 1, 4, 4), sigmas, step_lr=1e-3, steps_per_level=2,
                             clamp=(0.0, 1.0), generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 1, 4, 4) and float(x.min()) >= 0 and float(x.max()) <= 1


def test_sigma_max_auto_is_the_largest_pairwise_distance_and_travels_in_the_weights():
    """NCSNv2's σ_1: images in [0.25, 0.75] except one all-0 and one all-1 image, whose distance √16 = 4 is the
    largest; the ladder starts there, and a model built with another σ_max takes it from the weights."""
    train = 0.25 + 0.5 * torch.rand(30, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    train[7], train[19] = 0.0, 1.0
    kw = dict(variant="explicit", width=3, depth=1, deq=DEQSettings(), train=train, sigma_min=0.1, sigma_levels=3)
    model = build_ncsn(16, sigma_max="auto", **kw)
    assert model.sigmas.tolist() == pytest.approx(geometric_sigmas(4.0, 0.1, 3))
    other = build_ncsn(16, sigma_max=1.0, **kw)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.sigmas, model.sigmas)
    with pytest.raises(ValueError, match="sigma_max must be a positive number or 'auto', got 'max'"):
        build_ncsn(16, sigma_max="max", **kw)


def test_largest_pairwise_distance_exact_in_chunks_and_a_lower_bound_when_subsampled():
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
    exact = float(torch.cdist(x.double(), x.double()).max())
    assert largest_pairwise_distance(x) == pytest.approx(exact, rel=1e-12)
    assert largest_pairwise_distance(x, chunk=7) == pytest.approx(exact, rel=1e-12)
    sub = largest_pairwise_distance(x, max_rows=10, seed=3)
    assert 0 < sub < exact and sub == largest_pairwise_distance(x, max_rows=10, seed=3)
    with pytest.raises(ValueError, match="at least 2 rows"):
        largest_pairwise_distance(x[:1])


# ---------------------------------------------------------------------------------------------------
# The benchmark script
# ---------------------------------------------------------------------------------------------------
def test_benchmark_help():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generative_compare.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--steps" in out.stdout and "--out" in out.stdout


def test_benchmark_smoke(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import generative_compare
    finally:
        sys.path.pop(0)
    summary = generative_compare.main([
        "--steps", "2", "--out", str(tmp_path), "--vae-variants", "deq", "explicit", "--vae-width", "16",
        "--elbo-centres", "16", "--elbo-eval", "8", "--iw-samples", "8", "--ncsn-channels", "4",
        "--samples", "16", "--langevin-steps", "1", "--sigma-levels", "2", "--ncsn-losses", "dsm",
        "--classifier-epochs", "1", "--timing-rounds", "2",
    ])
    assert set(summary["vae"]) == {"deq", "explicit"}
    assert summary["fd_metric"] == "fd_digits_cnn"
    assert set(summary["ncsn"]) == {"deq-dsm", "explicit-dsm"}
    for name in ("vae_samples_deq.png", "ncsn_samples_deq_dsm.png", "results.jsonl"):
        assert (tmp_path / name).is_file()
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert '"summary"' in lines[-1] and all(math.isfinite(v["test_iw_loglik"]) and math.isfinite(v["test_elbo"])
                                           for v in summary["vae"].values())
