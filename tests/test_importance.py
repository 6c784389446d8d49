"""log Z by importance sampling: the defensive KDE proposal is an exact density that follows the data, it
recovers a known log Z with far more effective samples than the broad Gaussian, and evaluate_density flags a
log-likelihood whose estimate rests on too few effective samples."""
import math
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from deqsm.metrics.density import importance_log_normaliser, pilot_bandwidth
from deqsm.metrics.proposals import SCOTT_MULTIPLES, DefensiveKDEProposal, GaussianProposal, kde_centres, scott_factor
from deqsm.models.density import DensityEvalOptions, evaluate_density


class RingEnergy(nn.Module):
    """E = −(log p(x) + log_z) for p an equal mixture of isotropic Gaussians (std ``std``) on a circle of
    radius ``radius``: an unnormalised density whose log Z is ``log_z`` exactly."""

    def __init__(self, n: int = 8, radius: float = 2.0, std: float = 0.1, log_z: float = 0.0) -> None:
        super().__init__()
        angle = 2 * math.pi * torch.arange(n) / n
        self.means = nn.Parameter(radius * torch.stack([angle.cos(), angle.sin()], 1))
        self.std, self.log_z = std, log_z

    def distribution(self) -> torch.distributions.Distribution:
        D = torch.distributions
        comps = D.Independent(D.Normal(self.means, torch.full_like(self.means, self.std)), 1)
        return D.MixtureSameFamily(D.Categorical(logits=torch.zeros(self.means.shape[0])), comps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -(self.distribution().log_prob(x) + self.log_z)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.distribution().log_prob(x)


def ring_splits(model: RingEnergy, n_train: int = 400, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    with torch.no_grad():
        x = model.distribution().sample((n_train + 300,))
    return {"train": x[:n_train], "val": x[n_train:n_train + 150], "test": x[n_train + 150:]}


SSM = SimpleNamespace(loss=SimpleNamespace(name="ssm", options={}))


def evaluate(model, splits, normalised=False, **options):
    opts = DensityEvalOptions(is_samples=2000, is_batch_size=1000, **options)
    return evaluate_density(model, splits, opts, SSM, normalised=normalised)[0]


def test_defensive_kde_is_a_normalised_density_whose_samples_follow_it(float64):
    centres = torch.tensor([[0.0, 0.0], [1.0, 0.5], [-0.5, 1.5], [2.0, -1.0]])
    q = DefensiveKDEProposal(centres, 0.4, scale=2.0, defensive_weight=0.2)
    axis = torch.linspace(-12, 12, 481)
    grid = torch.cartesian_prod(axis, axis)
    dens = q.log_prob(grid).exp().view(481, 481)
    assert float(torch.trapezoid(torch.trapezoid(dens, axis, dim=0), axis)) == pytest.approx(1.0, abs=1e-6)
    x = q.sample(200_000, torch.Generator().manual_seed(0))
    cov = torch.cov(centres.t())
    kde_second = (centres[:, :, None] * centres[:, None, :]).mean(0) + 0.4**2 * cov
    second = 0.2 * 4.0 * torch.eye(2) + 0.8 * kde_second
    assert torch.allclose(x.mean(0), 0.8 * centres.mean(0), atol=0.02)
    assert torch.allclose(x.t() @ x / x.shape[0], second, atol=0.05)


@pytest.mark.parametrize("std,narrower", [(0.03, True), (1.0, False)])
def test_pilot_bandwidth_follows_the_model(std, narrower):
    """On the same data (rings of std 0.1) the pilot picks narrower kernels for a sharper model than for a
    broader one: it follows the model, not the data."""
    data_model = RingEnergy(std=0.1)
    centres = kde_centres(ring_splits(data_model)["train"], max_rows=300)
    model = RingEnergy(std=std)
    h, ess = pilot_bandwidth(lambda x: -model(x).detach(), centres, n_pilot=1000,
                             generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    scott = scott_factor(300, 2)
    assert len(ess) == len(SCOTT_MULTIPLES) and h == pytest.approx(scott * SCOTT_MULTIPLES[ess.index(max(ess))])
    assert (h < scott / 2) if narrower else (h >= scott)


def test_pilot_is_not_fooled_by_mass_its_narrow_candidates_never_reach():
    """Half the model's mass is a blob the data never show: narrow kernels on the data see only the rings,
    and judged by their own draws they look excellent while missing half of Z. The pooled pilot sees the
    blob through the broad candidates' draws and keeps the broad kernels."""
    rings = RingEnergy(std=0.05)
    blob = torch.distributions.MultivariateNormal(torch.tensor([3.0, 3.0]), 0.3**2 * torch.eye(2))
    log_p = lambda x: torch.logaddexp(rings.log_prob(x).detach(), blob.log_prob(x)) - math.log(2)  # noqa: E731
    centres = kde_centres(ring_splits(rings)["train"])
    scott = scott_factor(400, 2)
    for seed in range(4):
        h, fractions = pilot_bandwidth(log_p, centres, n_pilot=1000, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float32)
        assert h >= scott and max(fractions) < 0.1, (seed, h / scott, fractions)


@pytest.mark.parametrize("true_log_z", [0.0, 3.7])
def test_data_proposal_recovers_a_known_log_z_with_more_effective_samples(true_log_z):
    model = RingEnergy(std=0.1, log_z=true_log_z)
    splits = ring_splits(model)
    log_p = lambda x: -model(x).detach()  # noqa: E731
    kw = dict(n_samples=4000, batch_size=1500, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    centres = kde_centres(splits["train"])
    h, _ = pilot_bandwidth(log_p, centres, n_pilot=1000, generator=gen, dtype=torch.float32)
    data = importance_log_normaliser(log_p, DefensiveKDEProposal(centres, h), generator=gen, **kw)
    broad = importance_log_normaliser(log_p, GaussianProposal(2, 2.0), generator=torch.Generator().manual_seed(1), **kw)
    assert abs(data.log_z - true_log_z) < 4 * data.se and data.se < 0.05
    assert data.ess > 5 * broad.ess and data.max_weight < broad.max_weight


def test_collapsed_effective_sample_size_is_flagged_unreliable():
    """A sharp model: the broad Gaussian's ESS collapses (flagged), the data proposal's does not."""
    model = RingEnergy(std=0.01)  # sharp: N(0, 4I) rarely lands within 0.01 of a component
    splits = ring_splits(model)
    broad = evaluate(model, splits, is_proposal="gaussian", is_ess_floor=100)
    data = evaluate(model, splits, is_proposal="data", is_ess_floor=100)
    assert broad["test_loglik_reliable"] == 0.0 and broad["test_is_ess"] < 100
    assert data["test_loglik_reliable"] == 1.0 and data["test_is_ess"] >= 100
    assert broad["test_is_max_weight"] > 10 * data["test_is_max_weight"]
    for m in (broad, data):
        assert m["test_is_ess_fraction"] == pytest.approx(m["test_is_ess"] / 2000)
        assert m["test_is_max_weight"] <= 1 / math.sqrt(m["test_is_ess"])
        assert math.isfinite(m["test_loglik"])  # kept: a number, flagged rather than dropped
    exact = float(model.log_prob(splits["test"]).detach().mean())  # log Z = 0: the log-likelihood is known
    assert abs(data["test_loglik"] - exact) < 4 * data["test_loglik_se"] + 1e-3
    assert "test_is_kde_bandwidth" in data and "test_is_kde_bandwidth" not in broad
    strict = evaluate(model, splits, is_proposal="data", is_ess_floor=2001)  # more than the samples drawn
    assert strict["test_loglik_reliable"] == 0.0 and strict["test_loglik"] == data["test_loglik"]


def test_normalised_models_are_always_reliable():
    model = RingEnergy(std=0.01)
    got = evaluate(model, ring_splits(model), normalised=True, is_ess_floor=1e9)
    assert got["test_loglik_reliable"] == 1.0 and "test_is_ess" not in got


def test_bad_proposal_options_are_refused_by_name():
    with pytest.raises(ValidationError, match=r"is_proposal\n.*'data' or 'gaussian'"):
        DensityEvalOptions(is_proposal="kde")
    with pytest.raises(ValidationError, match=r"is_ess_floor\n.*greater than or equal to 0"):
        DensityEvalOptions(is_ess_floor=-1)
    with pytest.raises(ValidationError, match="is_defensive_weight"):
        DensityEvalOptions(is_defensive_weight=0.0)
    model = RingEnergy()
    splits = ring_splits(model)
    with pytest.raises(ValueError, match="is_proposal 'data' fits the proposal to the training rows"):
        evaluate(model, {"test": splits["test"]})
    with pytest.raises(ValueError, match="defensive weight must be in"):
        DefensiveKDEProposal(splits["train"], 0.3, defensive_weight=1.5)
    with pytest.raises(ValueError, match="needs >= 2 rows"):
        DefensiveKDEProposal(splits["train"][:1], 0.3)
