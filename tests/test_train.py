"""The training loop: it learns, stops early, resumes from checkpoints exactly, and fails clearly."""
import math

import pytest
import torch

from deqsm.losses import LossOutput, get_loss
from deqsm.models.energy_mlp import DEQEnergyMLP, ExplicitEnergyMLP
from deqsm.train import Callback, TrainingError, TrainSettings, fit, improves, load_checkpoint


def gaussian_data(n=512, d=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) * 0.5 + 1.0


def objective(model, batch):
    return get_loss("ssm_vr")(model, batch)


class Recorder(Callback):
    def __init__(self):
        self.steps, self.evals = [], []

    def on_step(self, step, metrics):
        self.steps.append((step, metrics))

    def on_eval(self, step, metrics):
        self.evals.append((step, metrics))


def settings(**kw):
    base = dict(steps=60, batch_size=64, lr=1e-2, eval_every=20, progress=False, seed=0)
    base.update(kw)
    return TrainSettings(**base)


def test_fit_lowers_the_loss_and_reports_metrics():
    torch.manual_seed(0)
    model = DEQEnergyMLP(3, 16, backward="phantom")
    data = gaussian_data()
    rec = Recorder()
    before = objective(model, data[:256]).loss.item()
    result = fit(model, objective, data, data[:128], settings(steps=150), [rec])
    after = objective(model, data[:256]).loss.item()
    assert after < before - 0.1
    assert result.steps == 150 and len(rec.steps) == 150 and len(rec.evals) == 8
    step_metrics = rec.steps[-1][1]
    for key in ("train_loss", "train_curvature", "solver_nstep", "solver_abs_residual_max", "step_ms", "peak_bytes"):
        assert key in step_metrics
    assert result.peak_bytes > 0 and result.memory_kind == "autograd_saved_bytes"
    assert result.best_val_loss == min(e["val_loss"] for _, e in rec.evals)
    for _, ev in rec.evals:  # the DEQ's effective depth at each evaluation (deqsm.depth), also in the history
        assert 0 < ev["deq_contraction"] < 1 and ev["deq_iterations"] >= 1 and 0 <= ev["deq_depth_gain"] < 1
    assert all("deq_contraction" in h for h in result.history)


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    data = gaussian_data()
    torch.manual_seed(0)
    straight = ExplicitEnergyMLP(3, 8, 2)
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    fit(straight, objective, data, data[:64], settings(steps=40, checkpoint_every=20))

    resumed = ExplicitEnergyMLP(3, 8, 2)
    resumed.load_state_dict(init)
    fit(resumed, objective, data, data[:64], settings(steps=20, checkpoint_every=20), checkpoint_dir=tmp_path)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] == 20
    again = ExplicitEnergyMLP(3, 8, 2)  # a fresh process would build a fresh model
    fit(again, objective, data, data[:64], settings(steps=40, checkpoint_every=20), checkpoint_dir=tmp_path)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_every_evaluation_uses_the_same_random_draws():
    """SSM-VR draws random projections: with fresh draws at each evaluation an unchanged model's validation loss
    moves by the estimator's own noise, which the plateau rule would read as progress or as a plateau."""
    data = gaussian_data()
    torch.manual_seed(0)
    rec = Recorder()
    fit(ExplicitEnergyMLP(3, 8, 2), objective, data, data[:64], settings(steps=20, lr=1e-12, eval_every=5), [rec])
    vals = [e["val_loss"] for _, e in rec.evals]
    assert len(vals) == 4 and max(vals) - min(vals) <= 1e-6 * max(1.0, abs(vals[0]))
    torch.manual_seed(1)  # the draws do vary: other draws give another value for the same model
    model = ExplicitEnergyMLP(3, 8, 2)
    a, b = (objective(model, data[:64]).loss.item() for _ in range(2))
    assert abs(a - b) > 1e-4


@pytest.mark.parametrize("variant", ["explicit", "deq"])
def test_training_does_not_depend_on_when_it_evaluates(variant):
    """Evaluations (and a DEQ's depth probe) take their draws from their own seed and leave the training stream's
    random state alone."""
    data = gaussian_data()
    trained = []
    for every in (5, 7):
        torch.manual_seed(0)
        model = ExplicitEnergyMLP(3, 8, 2) if variant == "explicit" else DEQEnergyMLP(3, 8, backward="phantom")
        fit(model, objective, data, data[:64], settings(steps=20, eval_every=every))
        trained.append(model.state_dict())
    for k, v in trained[0].items():
        assert torch.equal(v, trained[1][k]), k


def test_early_stopping():
    data = gaussian_data()
    torch.manual_seed(0)
    result = fit(ExplicitEnergyMLP(3, 8, 1), objective, data, data[:64],
                 settings(steps=2000, lr=1e-9, eval_every=5, patience=2))
    assert result.stopped_early and result.steps < 2000


def test_nonfinite_loss_is_a_clear_error():
    data = gaussian_data()
    data[5, 0] = float("nan")
    with pytest.raises((TrainingError, ValueError), match="NaN|non-finite"):
        fit(ExplicitEnergyMLP(3, 8, 1), objective, data, None, settings(steps=20, batch_size=512))


def test_solver_that_keeps_missing_tol_stops_training():
    data = gaussian_data()
    model = DEQEnergyMLP(3, 8, solver="picard", tol=1e-30, max_iter=2)
    with pytest.raises(TrainingError, match="missed its tolerance for 3 consecutive steps"):
        fit(model, objective, data, None, settings(max_nonconverged_steps=3))


def test_settings_reject_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="stpes"):
        TrainSettings(stpes=3)
    with pytest.raises(ValueError, match="lr"):
        TrainSettings(lr=-1)
    with pytest.raises(ValueError, match="unknown optimizer 'adamm'"):
        fit(ExplicitEnergyMLP(3, 8, 1), objective, gaussian_data(), None, settings(optimizer="adamm"))


def test_corrupt_checkpoint_is_named(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="last.pt"):
        fit(ExplicitEnergyMLP(3, 8, 1), objective, gaussian_data(), None, settings(), checkpoint_dir=tmp_path)


def test_resume_of_a_finished_or_early_stopped_run_trains_no_further(tmp_path):
    """A run killed after its last checkpoint (a trial whose end Ray had not recorded yet) resumes as finished:
    no more steps, the same best model and loss, and timings that still cover the steps done before."""
    data = gaussian_data()
    for name, kw in (("finished", dict(steps=40, checkpoint_every=20)),
                     ("stopped", dict(steps=2000, lr=1e-9, eval_every=5, patience=2))):
        torch.manual_seed(0)
        first = fit(ExplicitEnergyMLP(3, 8, 1), objective, data, data[:64], settings(**kw),
                    checkpoint_dir=tmp_path / name)
        rec = Recorder()
        again = ExplicitEnergyMLP(3, 8, 1)
        second = fit(again, objective, data, data[:64], settings(**kw), [rec], checkpoint_dir=tmp_path / name)
        assert rec.steps == [], name
        assert (second.steps, second.best_val_loss, second.stopped_early) == \
            (first.steps, first.best_val_loss, first.stopped_early), name
        assert second.step_ms_median == first.step_ms_median and second.peak_bytes == first.peak_bytes > 0, name


def test_the_fraction_of_clipped_steps_is_measured():
    """#13: how often train.grad_clip fires is logged per step (``grad_clipped``) and summarised
    (``clipped_fraction``), so a clip that fires on every step (DSM's scale) shows."""
    data = gaussian_data()
    for clip, expected in ((1e-6, 1.0), (1e6, 0.0)):
        torch.manual_seed(0)
        rec = Recorder()
        result = fit(ExplicitEnergyMLP(3, 8, 1), objective, data, None, settings(steps=10, grad_clip=clip), [rec])
        assert result.clipped_fraction == expected and result.summary()["clipped_fraction"] == expected
        assert {m["grad_clipped"] for _, m in rec.steps} == {expected}


class Drift(torch.nn.Module):
    """A toy whose loss is 100 + p: plain SGD lowers p by lr per step, so each evaluation improves on the last
    by the same tiny amount (5 steps × lr 1e-3 = 0.005, a relative 5e-5) and never levels off."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))


def drift_objective(model, batch):
    return LossOutput(100.0 + model.p)


def drift(**kw):
    base = dict(steps=100, batch_size=8, optimizer="sgd", lr=1e-3, grad_clip=None, eval_every=5, patience=3)
    return settings(**{**base, **kw})


def test_min_delta_stops_a_run_whose_improvements_are_too_small():
    """With min_delta above the per-evaluation gain (5e-5 relative) no evaluation after the first
    counts, so patience 3 stops training at the 4th evaluation; with min_delta 0 every one counts and training
    runs to the cap. The weights restored are still the lowest loss's (the last evaluation's)."""
    data = gaussian_data(n=64)
    model = Drift()
    stopped = fit(model, drift_objective, data, data, drift(min_delta=1e-3))
    assert stopped.steps == 20 and stopped.converged and stopped.stopped_early
    assert stopped.best_step == 20 and stopped.best_val_loss == pytest.approx(100 - 20e-3)
    assert float(model.p.detach()) == pytest.approx(-20e-3)
    capped = fit(Drift(), drift_objective, data, data, drift(min_delta=0.0))
    assert capped.steps == 100 and not capped.converged and not capped.stopped_early
    assert [e["step"] for e in capped.history] == [float(s) for s in range(5, 101, 5)]


def test_converged_says_whether_the_plateau_rule_fired():
    """converged (and the summary's flag) is True only when patience ran out; a run that hits the step cap,
    with or without patience, is not converged."""
    data = gaussian_data()
    torch.manual_seed(0)
    plateau = fit(ExplicitEnergyMLP(3, 8, 1), objective, data, data[:64],
                  settings(steps=2000, lr=1e-9, eval_every=5, patience=2))
    assert plateau.converged and plateau.steps < 2000 and plateau.summary()["converged"] == 1.0
    for kw in (dict(patience=None), dict(patience=50)):
        torch.manual_seed(0)
        capped = fit(ExplicitEnergyMLP(3, 8, 1), objective, data, data[:64], settings(steps=40, **kw))
        assert capped.steps == 40 and not capped.converged and capped.summary()["converged"] == 0.0, kw


@pytest.mark.parametrize("min_delta,steps", [(1e-3, 20), (1.25e-4, 60)])
def test_resume_mid_plateau_keeps_the_count_and_reference(tmp_path, min_delta, steps):
    """A checkpoint written after 3 evaluations (2 without improvement) resumes where it was. min_delta 1e-3:
    the 4th evaluation is the 3rd without improvement, so training stops at step 20 as it does uninterrupted
    (a lost count would go on to 30). min_delta 1.25e-4 (a threshold of 2.5 evaluations' gain): the 4th
    evaluation improves on the 1st, the reference the rule compares against, so training runs to the cap
    (comparing with the lowest loss, the 3rd, would stop it at 20)."""
    data = gaussian_data(n=64)
    straight = fit(Drift(), drift_objective, data, data, drift(steps=60, min_delta=min_delta))
    assert straight.steps == steps
    first = fit(Drift(), drift_objective, data, data, drift(steps=15, min_delta=min_delta), checkpoint_dir=tmp_path)
    assert first.steps == 15 and not first.converged
    assert load_checkpoint(tmp_path / "last.pt")["evals_without_improvement"] == 2
    resumed = fit(Drift(), drift_objective, data, data, drift(steps=60, min_delta=min_delta), checkpoint_dir=tmp_path)
    assert (resumed.steps, resumed.converged, resumed.best_step) == (straight.steps, straight.converged, straight.best_step)
    assert resumed.best_val_loss == pytest.approx(straight.best_val_loss, abs=1e-12)


def test_improves_is_relative_and_anything_finite_beats_inf():
    assert improves(1.0, math.inf, 0.5) and not improves(math.inf, math.inf, 0.0)
    assert improves(-2.1, -2.0, 0.01) and not improves(-2.01, -2.0, 0.01)  # |best| scales the threshold
    assert improves(0.98, 1.0, 0.01) and not improves(0.995, 1.0, 0.01) and improves(0.995, 1.0, 0.0)


def test_progress_bar_shows_the_plateau_count(capsys):
    data = gaussian_data(n=64)
    fit(Drift(), drift_objective, data, data, drift(min_delta=1e-3, progress=True))
    err = capsys.readouterr().err
    assert "plateau=2/3" in err and "plateau=3/3" not in err  # the bar closes at the stop, before a refresh


def test_a_trained_deq_measures_its_gradient_against_the_exact_one_and_warns_when_inexact(capsys):
    """train.grad_cosine_min: once trained, a DEQ's backward (phantom K) is compared with the exact implicit
    gradient; below the threshold the run says so in its log and its summary (train_grad_cosine_low)."""
    data = gaussian_data()
    torch.manual_seed(0)
    fine = fit(DEQEnergyMLP(3, 8, backward="phantom"), objective, data, data[:64], settings(steps=20))
    assert 0.99 < fine.grad_cosine <= 1 + 1e-9 and fine.grad_cosine_low is False
    assert fine.summary()["train_grad_cosine"] == fine.grad_cosine and fine.summary()["train_grad_cosine_low"] == 0.0
    assert "warning: train_grad_cosine" not in capsys.readouterr().out
    torch.manual_seed(0)  # a strong contraction with one phantom step: an inexact gradient
    strict = settings(steps=20, grad_cosine_min=0.999999)
    inexact = fit(DEQEnergyMLP(3, 8, backward="phantom", k=1, norm="spectral", lam=1.05), objective, data, data[:64],
                  strict)
    assert inexact.grad_cosine < 0.999999 and inexact.grad_cosine_low is True
    out = capsys.readouterr().out
    assert f"warning: train_grad_cosine {inexact.grad_cosine:.4f} < train.grad_cosine_min 0.999999" in out
    off = fit(DEQEnergyMLP(3, 8), objective, data, data[:64], settings(steps=5, grad_cosine_min=None))
    explicit = fit(ExplicitEnergyMLP(3, 8, 2), objective, data, data[:64], settings(steps=5))
    assert off.grad_cosine is None and explicit.grad_cosine is None and "train_grad_cosine" not in explicit.summary()
