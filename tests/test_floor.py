"""The score-matching loss's floor on data with a known score (deqsm.floor) and the guard that flags a run below it."""
import math

import pytest
import torch

from deqsm.config import DEQSettings
from deqsm.experiments import VariantSpec, degenerate_loss_guard, train_model
from deqsm.floor import DegenerateLossGuard, data_floor, loss_floor
from deqsm.losses import get_loss
from deqsm.train import TrainSettings


def _gaussian(dim=2, scale=0.7):
    return torch.distributions.MultivariateNormal(torch.zeros(dim), scale**2 * torch.eye(dim))


def test_the_floor_is_the_true_scores_loss_and_bounds_other_models(float64):
    """−½E‖∇log p‖² is the SM loss of the true score (exactly, on the same rows: ½‖s‖² + tr ∇s with tr ∇s = −d/σ²
    and E‖s‖² = d/σ²), and a wrong model's SM loss on fresh data lies above it."""
    truth = _gaussian(scale=0.7)
    x = truth.sample((20000,))
    floor, se = loss_floor(lambda r: -r / 0.49, x)
    assert floor == pytest.approx(-0.5 * 2 / 0.49, rel=0.03) and 0 < se < 0.02
    sm = get_loss("sm")
    true_energy = lambda r: 0.5 * (r**2).sum(1) / 0.49  # noqa: E731
    assert float(sm(true_energy, x).loss.detach()) == pytest.approx(floor, abs=4 * se)
    for wrong in (0.3, 0.5, 1.0, 2.0):  # N(0, wrong²): worse fits, higher loss
        energy = lambda r, s=wrong: 0.5 * (r**2).sum(1) / s**2  # noqa: E731
        assert float(sm(energy, x).loss.detach()) > floor + 3 * se


def test_the_guard_flags_a_loss_far_below_the_floor_only():
    guard = DegenerateLossGuard(floor=-2.0, floor_se=0.01)
    for step, loss in enumerate([-1.9, -2.6, -2.05, -1.95], 1):  # around the floor: noise and overfitting
        guard.on_step(step, {"train_loss": loss})
    guard.on_eval(4, {"val_loss": -2.2})
    assert guard.summary()["loss_degenerate"] == 0.0
    for step in range(5, 9):  # a loss running away to −1e3
        guard.on_step(step, {"train_loss": -10.0 ** (step - 5)})
    guard.on_eval(8, {"val_loss": -1.5})
    s = guard.summary()
    assert s["loss_degenerate"] == 1.0 and s["loss_degenerate_step"] == 8.0 and s["loss_lowest"] < -5
    guard.on_step(9, {"train_loss": math.nan})  # a non-finite loss is the trainer's error, not this guard's
    assert guard._window == []


def test_a_kernel_density_collapsing_onto_its_rows_is_flagged(float64, capsys):
    """Score matching's degeneracy, for real: a kernel density estimate on the training rows with bandwidth h has,
    on those rows, an SM loss near −d/h² (the score vanishes at each row, the Hessian trace does not). At h = 0.02
    it is far below the data's floor and the guard flags it; at h = 0.5 (a smooth fit) it does not."""
    truth = _gaussian(dim=2, scale=0.5)
    x = truth.sample((300,))
    floor, se = loss_floor(lambda r: -r / 0.25, truth.sample((50000,)))

    def kde_energy(h):
        return lambda r: -torch.logsumexp(-((r[:, None] - x[None]) ** 2).sum(-1) / (2 * h * h), dim=1)

    flags = {}
    for h in (0.02, 0.5):
        guard = DegenerateLossGuard(floor, se)
        for step, rows in enumerate(x.split(50), 1):
            guard.on_step(step, {"train_loss": float(get_loss("sm")(kde_energy(h), rows).loss.detach())})
        guard.on_eval(step, {})
        flags[h] = guard.summary()
    assert flags[0.02]["loss_degenerate"] == 1.0 and flags[0.02]["loss_lowest"] < -1000
    assert flags[0.5]["loss_degenerate"] == 0.0
    assert "degenerate score matching" in capsys.readouterr().out


def test_a_run_on_data_with_a_known_score_reports_its_floor():
    """train_model with the data's true density: the floor (here −d/(2σ²) = −4) in the run's summary, a sane fit not
    flagged; where no floor is known (the density not given, or a DSM loss) no guard is built."""
    torch.manual_seed(0)
    truth = _gaussian(dim=2, scale=0.5)
    data = truth.sample((1200,))
    splits = {"train": data[:800], "val": data[800:1000], "test": data[1000:]}
    spec = VariantSpec(name="explicit-2", model="energy_mlp", width=32, variant="explicit", depth=2,
                       loss={"name": "sm"}, deq=DEQSettings())
    _, fit = train_model(spec, splits, TrainSettings(steps=200, batch_size=100, lr=3e-3, eval_every=50,
                                                     progress=False), loss_floor=data_floor(truth, splits["train"]))
    summary = fit.summary()
    assert summary["loss_degenerate"] == 0.0
    assert summary["loss_floor"] == pytest.approx(-4.0, abs=4 * summary["loss_floor_se"])
    assert summary["loss_floor_se"] < 0.02
    assert degenerate_loss_guard(spec, data_floor(None, splits["train"])) is None
    dsm = spec.model_copy(update={"loss": spec.loss.model_copy(update={"name": "dsm"})})
    assert degenerate_loss_guard(dsm, data_floor(truth, splits["train"])) is None
