"""The training loop: it learns, stops early, resumes from checkpoints exactly, and fails clearly."""
import pytest
import torch

from deqsm.losses import get_loss
from deqsm.models.energy_mlp import DEQEnergyMLP, ExplicitEnergyMLP
from deqsm.train import Callback, TrainingError, TrainSettings, fit, load_checkpoint


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
