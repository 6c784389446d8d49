"""The report's convergence verdicts: the plateau rule's flag, the flatness of a curve's end, and the table."""
import math
import pytest

from pipelines.reporting.convergence import Convergence, convergence, convergence_table_md, summarize


def steps(n):
    return [float(50 * (i + 1)) for i in range(n)]


def run(converged, flat, n_steps=300.0, change=None):
    if change is None and flat is not None:
        change = 0.001 if flat else -0.2
    return Convergence(converged, n_steps, n_steps, change, flat)


def test_a_curve_still_falling_at_the_end_is_not_flat():
    losses = [10.0 - 0.4 * i for i in range(20)]  # 10 → 2.4, linearly
    c = convergence(steps(20), losses, {"converged": 0.0, "steps": 1000.0, "best_step": 1000.0})
    # quarters of 5 evaluations: the last (4.0 .. 2.4) averages 3.2, the one before (6.0 .. 4.4) 5.2; range 7.6
    assert c.final_change == pytest.approx((3.2 - 5.2) / 7.6)
    assert c.flat is False and c.converged is False and (c.steps, c.best_step) == (1000.0, 1000.0)


def test_a_curve_constant_over_its_last_half_is_flat():
    losses = [5.0, 4.0, 3.0, 2.5] + [-1.5] * 4  # negative losses (score matching): |before| is the scale
    c = convergence(steps(8), losses, {"converged": True, "train_steps": 400, "train_best_step": 250})
    assert c.final_change == 0.0 and c.flat is True
    assert c.converged is True and (c.steps, c.best_step) == (400.0, 250.0)


def test_short_or_broken_curves_and_missing_summaries_are_unknown():
    c = convergence(steps(3), [3.0, 2.0, 1.0], {})
    assert (c.converged, c.steps, c.best_step, c.final_change, c.flat) == (None, None, None, None, None)
    nan_dropped = convergence(steps(5), [1.0, float("nan"), 1.0, 1.0, 1.0], {"converged": None})
    assert nan_dropped.final_change == 0.0 and nan_dropped.converged is None
    with pytest.raises(ValueError, match="3 validation steps but 2 losses"):
        convergence(steps(3), [1.0, 2.0], {})


def test_the_tolerance_decides_flat():
    losses = [2.0, 1.5, 1.2, 1.0, 1.0, 1.0, 0.97, 0.97]  # the last quarter moves 3% of the range (1.03)
    assert convergence(steps(8), losses, {}, flat_tol=0.01).flat is False
    assert convergence(steps(8), losses, {}).flat is True  # the default: 5%


def test_a_loss_that_crosses_zero_does_not_blow_up_the_change():
    """Relative to the quarter before, a loss near zero gave changes of thousands of percent (the VAE's)."""
    losses = [40.0, 20.0, 8.0, 2.0, 0.5, 0.01, -0.4, -0.45]
    c = convergence(steps(8), losses, {})
    assert c.final_change == pytest.approx((-0.425 - 0.255) / 40.45) and c.flat is True


def test_summarize_verdicts_for_mixed_seeds():
    both = summarize([run(True, True, 200.0), run(True, False, 350.0)])
    assert both["verdict"] == "converged" and (both["n"], both["n_converged"], both["n_flat"]) == (2, 2, 1)
    assert (both["steps_mean"], both["steps_min"], both["steps_max"]) == (275.0, 200.0, 350.0)
    assert both["final_change_max_abs"] == pytest.approx(0.2)
    assert summarize([run(False, True), run(False, True)])["verdict"] == "flat at the cap"
    moving = summarize([run(False, True), run(False, False)])  # one seed still falling at the cap
    assert moving["verdict"] == "not converged" and (moving["n_converged"], moving["n_flat"]) == (0, 1)
    assert summarize([run(True, True), run(False, True)])["verdict"] == "not converged"  # a mix: not all by the rule
    assert summarize([run(False, None)])["verdict"] == "not converged"  # hit the cap, curve too short to say
    nothing = summarize([run(None, None, None)])
    assert nothing["verdict"] == "unknown" and nothing["steps_mean"] is None and nothing["final_change_max_abs"] is None
    assert summarize([])["verdict"] == "unknown"


def test_the_table_shows_the_counts_steps_and_change():
    rows = [("deq", summarize([run(True, True, 200.0), run(True, False, 400.0), run(False, False, 1000.0)])),
            ("explicit", summarize([run(False, True, 1000.0, change=-0.004)])),
            ("lost", summarize([]))]
    md = convergence_table_md(rows)
    lines = md.splitlines()
    assert lines[0].startswith("| variant | verdict | converged (plateau rule) | flat at the end |")
    assert "| deq | not converged | 2/3 | 1/3 | 533 [200, 1,000] | 20.00% | — |" in lines
    assert "| explicit | flat at the cap | 0/1 | 1/1 | 1,000 | 0.40% | — |" in lines
    assert "| lost | unknown | — | — | — | — | — |" in lines
    notes = [line for line in lines if line.startswith("- ")]
    assert len(notes) == 3 and "5%" in notes[1] and "train.patience" in notes[0] and "floor" in notes[2]


def test_a_run_whose_loss_fell_below_the_floor_makes_its_variant_degenerate():
    """One degenerate seed of three makes the verdict "degenerate" whatever the curves say; runs with no floor known
    (summary without loss_degenerate) are counted as not watched."""
    curve = ([100.0, 200.0, 300.0, 400.0], [1.0, 0.5, 0.4, 0.4])
    runs = [convergence(*curve, {"converged": True, "steps": 400, "loss_degenerate": flag}) for flag in (0.0, 1.0, 0.0)]
    s = summarize(runs)
    assert s["verdict"] == "degenerate" and s["n_degenerate"] == 1 and s["n_watched"] == 3
    assert "| deq | degenerate | 3/3 |" in convergence_table_md([("deq", s)]) and "| 1/3 |" in convergence_table_md(
        [("deq", s)])
    clean = summarize([convergence(*curve, {"converged": True, "steps": 400, "loss_degenerate": 0.0})])
    assert clean["verdict"] == "converged" and convergence_table_md([("x", clean)]).splitlines()[2].endswith("| 0/1 |")
    unwatched = summarize([convergence(*curve, {"converged": True, "steps": 400})])
    assert unwatched["n_watched"] == 0 and convergence_table_md([("x", unwatched)]).splitlines()[2].endswith("| — |")


def test_a_best_value_at_the_edge_of_the_search_space_is_flagged():
    from pipelines.reporting.markdown import at_edge, tuning_md
    from pipelines.reporting.inputs import ExperimentData
    from pipelines.settings import ExperimentSettings, SpaceEntry

    grid = SpaceEntry(grid=[1e-3, 3e-3, 1e-2])
    assert at_edge(grid, 1e-2) == "highest" and at_edge(grid, 1e-3) == "lowest" and at_edge(grid, 3e-3) is None
    log = SpaceEntry(loguniform=(1e-4, 1e-2))
    assert at_edge(log, 8e-3) == "highest" and at_edge(log, 1e-3) is None and at_edge(log, 1.2e-4) == "lowest"
    assert at_edge(SpaceEntry(choice=["adam", "sgd"]), "adam") is None  # not numeric: no edge
    spec = ExperimentSettings(dataset="d", model="dkef", variants={"deq": {"variant": "deq"}})
    tune = {"trials": 3, "best": {"deq": {"sample": {"train.lr": 1e-2}, "metrics": {"val_loss": -1.0}}}}
    md = tuning_md(ExperimentData("e", spec, {}, {}, tune), "val_loss", {"train.lr": grid})
    assert "`train.lr` at the highest value searched" in md and "widen it" in md
    tune["best"]["deq"]["sample"]["train.lr"] = 3e-3
    assert "widen" not in tuning_md(ExperimentData("e", spec, {}, {}, tune), "val_loss", {"train.lr": grid})


def test_the_tune_trials_figure_and_the_count_of_trials_asha_stopped(tmp_path):
    """best.json's per-trial results: the tuning section counts the trials ASHA stopped, and the figure plots the
    metric against each numeric searched value (none: no figure)."""
    from PIL import Image

    from pipelines.artifacts import Artifacts
    from pipelines.reporting.figures import tuning_figure
    from pipelines.reporting.inputs import ExperimentData
    from pipelines.reporting.markdown import tuning_md
    from pipelines.settings import ExperimentSettings, SpaceEntry

    spec = ExperimentSettings(dataset="d", model="dkef", variants={"deq": {"variant": "deq"},
                                                                   "explicit-2": {"variant": "explicit", "depth": 2}})
    results = [{"variant": v, "sample": {"train.lr": lr}, "val_loss": loss, "step": 50 if stopped else 150,
                "stopped_early": stopped}
               for v, lr, loss, stopped in [("deq", 1e-4, -1.0, True), ("deq", 3e-3, -12.0, False),
                                            ("explicit-2", 1e-3, -0.3, False), ("explicit-2", 5e-2, 7475.0, True),
                                            ("deq", 1e-1, math.inf, False)]]  # a diverged trial: not plotted
    tune = {"trials": 5, "results": results,
            "best": {"deq": {"sample": {"train.lr": 3e-3}, "metrics": {"val_loss": -12.0}},
                     "explicit-2": {"sample": {"train.lr": 1e-3}, "metrics": {"val_loss": -0.3}}}}
    data = ExperimentData("e", spec, {}, {}, tune)
    md = tuning_md(data, "val_loss", {"train.lr": SpaceEntry(loguniform=(1e-5, 1e-1))})
    assert md.startswith("Tune stage: 5 trials, 2 of them stopped early by ASHA") and "widen" not in md

    artifacts = Artifacts(tmp_path, tmp_path / "out", tmp_path / "results", tmp_path / "data", tmp_path / "results")
    path = tuning_figure(artifacts, data, "val_loss")
    assert path == artifacts.figures / "tuning_e.png" and Image.open(path).size[0] > 300
    for r in results:
        r["sample"] = {"train.optimizer": "adam"}  # nothing numeric searched: nothing to plot
    assert tuning_figure(artifacts, data, "val_loss") is None
