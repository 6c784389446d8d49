"""ASHA within each model variant (pipelines.asha.VariantASHA), and a seeded, reproducible search."""
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from pipelines.asha import VariantASHA, middle_out

# Two variants whose validation losses live on different scales, as DKEF's do (a DEQ near -12, a deep explicit
# net near -0.3): each list is best first, and each variant's trials report in that order at the first rung.
LOSSES = {"deq": [-12.0, -11.0, -10.0], "explicit-16": [-0.33, -0.32, -0.31]}


def _trials():
    return [SimpleNamespace(trial_id=f"{v}-{i}", config={"variant_name": v})
            for v, losses in LOSSES.items() for i in range(len(losses))]


def _first_rung(scheduler) -> dict[str, str]:
    trials = _trials()
    for t in trials:
        scheduler.on_trial_add(None, t)
    decisions = {}
    for t in trials:
        loss = LOSSES[t.config["variant_name"]][int(t.trial_id.rsplit("-", 1)[1])]
        decisions[t.trial_id] = scheduler.on_trial_result(None, t, {"training_iteration": 1, "val_loss": loss})
    return decisions


def test_one_asha_over_all_variants_stops_a_whole_variant():
    """Why VariantASHA exists: Ray's ASHA compares a trial with every trial at its rung, whatever its variant."""
    decisions = _first_rung(ASHAScheduler(metric="val_loss", mode="min", max_t=3, grace_period=1,
                                          reduction_factor=3))
    assert [decisions[f"explicit-16-{i}"] for i in range(3)] == [TrialScheduler.STOP] * 3


def test_variant_asha_races_each_trial_only_against_its_own_variant():
    scheduler = VariantASHA(max_t=3, grace_period=1, reduction_factor=3)
    assert scheduler.set_search_properties("val_loss", "min")  # as Tune passes TuneConfig's metric and mode
    decisions = _first_rung(scheduler)
    for variant in LOSSES:  # each variant's best goes on, the two behind it stop (1 in 3 survive a rung)
        assert [decisions[f"{variant}-{i}"] for i in range(3)] == [TrialScheduler.CONTINUE] + [TrialScheduler.STOP] * 2
    assert set(scheduler._by_variant) == set(LOSSES)
    assert all(s._metric == "val_loss" and s._mode == "min" for s in scheduler._by_variant.values())


def test_variant_asha_stops_a_trial_at_max_t_and_forgets_finished_trials():
    scheduler = VariantASHA(max_t=2, grace_period=1, reduction_factor=3)
    scheduler.set_search_properties("val_loss", "min")
    trial = SimpleNamespace(trial_id="a", config={"variant_name": "deq"})
    scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, trial, {"training_iteration": 1, "val_loss": 1.0}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, trial, {"training_iteration": 2, "val_loss": 0.5}) == TrialScheduler.STOP
    scheduler.on_trial_complete(None, trial, {"training_iteration": 2, "val_loss": 0.5})
    assert "a" not in scheduler.variant_scheduler("deq")._trial_info


def test_variant_asha_refuses_a_grace_period_beyond_max_t():
    with pytest.raises(ValueError, match="grace_period must lie in"):
        VariantASHA(max_t=2, grace_period=3, reduction_factor=3)


def test_grid_values_run_from_the_middle_out_under_asha():
    """In ascending order each learning rate tends to beat the one before, and async ASHA then stops none: the
    middle goes first and the extremes come last, when the rung already holds good trials."""
    assert middle_out([3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]) == [1e-3, 3e-3, 3e-4, 1e-2, 1e-4, 3e-2, 3e-5,
                                                                            1e-1]
    assert middle_out([1, 2, 3]) == [2, 3, 1] and middle_out(["a"]) == ["a"] and middle_out([]) == []
    losses = {1e-3: -3.0, 3e-3: -12.0, 3e-4: -1.3, 1e-2: -4.4, 1e-4: -0.8, 3e-2: -2.4, 3e-5: -0.7, 1e-1: -0.3}
    for order, stopped in ((sorted(losses), 2), (middle_out(sorted(losses)), 6)):
        scheduler = VariantASHA(max_t=3, grace_period=1, reduction_factor=3)
        scheduler.set_search_properties("val_loss", "min")
        decisions = []
        for i, lr in enumerate(order):
            trial = SimpleNamespace(trial_id=str(i), config={"variant_name": "deq"})
            scheduler.on_trial_add(None, trial)
            decisions.append(scheduler.on_trial_result(None, trial, {"training_iteration": 1, "val_loss": losses[lr]}))
        assert decisions.count(TrialScheduler.STOP) == stopped


@pytest.mark.integration
def test_asha_search_with_sampled_learning_rates_is_reproducible(tmp_path):
    """The tune stage with `scheduler: asha` and a log-uniform learning rate, run twice with the same params:
    the same learning rates are drawn (base.seed seeds the search), each within the range, and every variant
    gets a best configuration."""
    import json

    import yaml
    from ray import tune

    from deqsm.data import prepare_datasets
    from pipeline_project import tiny_params
    from pipelines.settings import load_params
    from pipelines.tune import main as tune_main

    params = tiny_params(**{"tracking.uri": "sqlite:///mlflow.db", "tune.scheduler": "asha", "tune.num_samples": 3,
                            "tune.search_space": {"train.lr": {"loguniform": [1.0e-4, 1.0e-1]}}})
    params["experiments"] = {"dkef-mixture": params["experiments"]["dkef-mixture"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prepare_datasets(load_params(tmp_path / "params.yaml").data, tmp_path, ["mixture"])

    drawn = []
    for _ in range(2):
        tune_main(["--params", str(tmp_path / "params.yaml")])
        trials = tune.ExperimentAnalysis(str(tmp_path / "out" / "ray" / "dkef-mixture")).trials
        drawn.append(sorted((t.config["variant_name"], t.config["train__lr"]) for t in trials))
        best = json.loads((tmp_path / "out" / "tune" / "dkef-mixture" / "best.json").read_text())
        assert set(best["best"]) == {"deq", "explicit-2"} and best["trials"] == 6
    assert drawn[0] == drawn[1]
    assert len({lr for _, lr in drawn[0]}) == 6  # a draw per trial: num_samples per variant
    assert all(1.0e-4 <= lr <= 1.0e-1 for _, lr in drawn[0])


def test_a_trial_is_not_stopped_at_its_last_evaluation():
    """After its last evaluation a trial only reports its summary: stopping it there would lose the summary."""
    scheduler = VariantASHA(max_t=3, grace_period=1, reduction_factor=3, last_stop=1)
    scheduler.set_search_properties("val_loss", "min")
    a, b = (SimpleNamespace(trial_id=t, config={"variant_name": "deq"}) for t in "ab")
    for t in (a, b):
        scheduler.on_trial_add(None, t)
    assert scheduler.on_trial_result(None, a, {"training_iteration": 1, "val_loss": -5.0}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, b, {"training_iteration": 1, "val_loss": -1.0}) == TrialScheduler.STOP
    late = VariantASHA(max_t=2, grace_period=1, reduction_factor=3, last_stop=0)  # one evaluation: no rung to stop at
    late.set_search_properties("val_loss", "min")
    for t in (a, b):
        late.on_trial_add(None, t)
    assert late.on_trial_result(None, a, {"training_iteration": 1, "val_loss": -5.0}) == TrialScheduler.CONTINUE
    assert late.on_trial_result(None, b, {"training_iteration": 1, "val_loss": -1.0}) == TrialScheduler.CONTINUE


def test_a_diverged_trial_is_not_recorded_at_a_rung():
    """A diverged trial reports the metric's worst value (inf) with ``failed``: recorded at a rung, it made numpy warn
    ("invalid value") in ASHA's cutoff and counted among the trials the cutoff is taken over. Neither now."""
    import warnings

    scheduler = VariantASHA(max_t=3, grace_period=1, reduction_factor=3)
    scheduler.set_search_properties("val_loss", "min")
    bad, good, poor = (SimpleNamespace(trial_id=t, config={"variant_name": "deq"}) for t in ("bad", "good", "poor"))
    for t in (bad, good, poor):
        scheduler.on_trial_add(None, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a NaN cutoff warns: an error here
        failed = {"training_iteration": 1, "val_loss": float("inf"), "failed": "TrainingError: nan"}
        assert scheduler.on_trial_result(None, bad, failed) == TrialScheduler.CONTINUE  # it ends by itself
        scheduler.on_trial_complete(None, bad, failed)
        good_result = {"training_iteration": 1, "val_loss": -5.0}
        assert scheduler.on_trial_result(None, good, good_result) == TrialScheduler.CONTINUE
        assert scheduler.on_trial_result(None, poor, {"training_iteration": 1, "val_loss": -1.0}) == TrialScheduler.STOP
    rungs = scheduler.variant_scheduler("deq")._brackets[0]._rungs
    assert all(float("inf") not in rung[1].values() for rung in rungs)
