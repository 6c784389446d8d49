"""The depth study's machinery: a search over bundles of deq settings that multiplies the DEQ variants only, a
variant's own deq values, and what each trial records for the report's depth study (tests/test_report.py checks
the section itself)."""
from __future__ import annotations

import json

import pytest

from pipelines.trials import apply_sample, search_arms, trial_point

SHALLOW = {"norm": "frobenius", "lam": 2.0}
DEEP = {"norm": "spectral", "lam": 1.05, "gain": "learned"}


def test_a_mapping_search_value_merges_into_its_section_and_keeps_the_other_keys():
    cfg = {"spec": {"deq": {"norm": "frobenius", "lam": 2.0, "k": 2, "solver_options": {"memory": 5}}},
           "train": {"lr": 1e-3}}
    out = apply_sample(cfg, {"deq": DEEP, "deq.solver_options": {"reg": 1e-6}, "train.lr": 3e-3})
    assert out["spec"]["deq"] == {"norm": "spectral", "lam": 1.05, "k": 2, "gain": "learned",
                                  "solver_options": {"memory": 5, "reg": 1e-6}}
    assert out["train"]["lr"] == 3e-3 and cfg["spec"]["deq"]["norm"] == "frobenius"  # the input is not changed


def test_deq_grids_multiply_the_deq_variants_only():
    arms = search_arms({"deq": "deq", "explicit-2": "explicit", "explicit-8": "explicit"},
                       {"deq": [SHALLOW, DEEP], "deq.k": [2, 4]})
    assert [a["variant_name"] for a in arms] == ["deq"] * 4 + ["explicit-2", "explicit-8"]
    assert {json.dumps(a["sample"], sort_keys=True) for a in arms[:4]} == {
        json.dumps({"deq": b, "deq.k": k}, sort_keys=True) for b in (SHALLOW, DEEP) for k in (2, 4)}
    assert trial_point({"arm": arms[1], "train__lr": 0.01}) == ("deq", {**arms[1]["sample"], "train.lr": 0.01})
    assert trial_point({"variant_name": "explicit-2", "train__lr": 0.01}) == ("explicit-2", {"train.lr": 0.01})


def test_a_variant_has_its_own_deq_values_and_only_a_deq_variant_may(tmp_path):
    import yaml

    from pipeline_project import tiny_params
    from pipelines import ParamsError
    from pipelines.settings import load_params
    from pipelines.trials import trial_config

    params = tiny_params()
    params["experiments"]["dkef-mixture"]["variants"]["deq"]["deq"] = {"norm": "spectral", "lam": 1.05}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = trial_config(load_params(tmp_path / "params.yaml"), "dkef-mixture", "deq")
    assert cfg["spec"]["deq"]["norm"] == "spectral" and cfg["spec"]["deq"]["lam"] == 1.05
    assert cfg["spec"]["deq"]["solver"] == params["deq"]["solver"]  # the deq section's other keys
    for bad, words in (({"lamb": 1.05}, "unknown deq key(s) 'lamb'"), ({"lam": 0.5}, "lam")):
        params["experiments"]["dkef-mixture"]["variants"]["deq"]["deq"] = bad
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        with pytest.raises(ParamsError, match="dkef-mixture") as err:
            load_params(tmp_path / "params.yaml")
        assert words in str(err.value)
    params["experiments"]["dkef-mixture"]["variants"]["deq"]["deq"] = {}
    params["experiments"]["dkef-mixture"]["variants"]["explicit-2"]["deq"] = {"lam": 1.05}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="apply to a DEQ variant only"):
        load_params(tmp_path / "params.yaml")


def test_the_tune_stage_searches_deq_bundles_on_the_deq_variant_and_records_each_trials_depth(tmp_path):
    """A real search (Ray, SQLite MLflow store): two deq bundles x two learning rates for the DEQ, the two
    learning rates alone for the explicit baseline; each DEQ trial's depth at its best step and its memory are in
    best.json's results; the best DEQ's configuration carries its bundle."""
    import yaml

    from deqsm.data import prepare_datasets
    from pipeline_project import tiny_params
    from pipelines.settings import load_params
    from pipelines.tune import main as tune_main

    params = tiny_params(**{"tracking.uri": "sqlite:///mlflow.db", "tune.search_space": {
        "train.lr": {"grid": [1.0e-3, 3.0e-3]}, "deq": {"grid": [SHALLOW, DEEP]}}})
    params["experiments"] = {"dkef-mixture": params["experiments"]["dkef-mixture"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prepare_datasets(load_params(tmp_path / "params.yaml").data, tmp_path, ["mixture"])
    tune_main(["--params", str(tmp_path / "params.yaml")])

    best = json.loads((tmp_path / "out" / "tune" / "dkef-mixture" / "best.json").read_text())
    assert best["trials"] == 6  # 2 bundles x 2 rates for the DEQ, 2 rates for explicit-2 (not 2 x 2 x 2)
    deq = [r for r in best["results"] if r["variant"] == "deq"]
    explicit = [r for r in best["results"] if r["variant"] == "explicit-2"]
    assert len(deq) == 4 and len(explicit) == 2
    assert sorted(json.dumps(r["sample"]["deq"], sort_keys=True) for r in deq) == sorted(
        json.dumps(b, sort_keys=True) for b in (SHALLOW, SHALLOW, DEEP, DEEP))
    assert all("deq" not in r["sample"] for r in explicit)
    for r in deq:
        assert 0 < r["best_deq_contraction"] < 1 and r["best_deq_iterations"] >= 1 and r["peak_bytes"] > 0
        assert r["degenerate"] is False
    assert all("best_deq_contraction" not in r and r["peak_bytes"] > 0 for r in explicit)
    # the spectral bundle's cells contract harder than Frobenius at lam 2 (||W||_2 ~ 2 / (lam sqrt n))
    by_norm = {r["sample"]["deq"]["norm"]: r["best_deq_contraction"] for r in deq}
    assert by_norm["spectral"] > by_norm["frobenius"]
    chosen = best["best"]["deq"]
    assert chosen["config"]["spec"]["deq"]["norm"] == chosen["sample"]["deq"]["norm"]
    assert chosen["metrics"]["val_loss"] == min(r["val_loss"] for r in deq)


def test_a_degenerate_or_failed_trial_is_recorded_but_never_selected():
    """The search's selection (pipelines.ray_search.select_trials): the lowest val_loss wins unless its loss fell
    below the data's floor; a stopped trial's depth is the one at its last evaluation."""
    from pipelines.ray_search import select_trials

    base = {"deq": {"spec": {"deq": {"norm": "frobenius"}}, "train": {"lr": 1e-3}},
            "explicit-2": {"spec": {}, "train": {"lr": 1e-3}}}
    trials = [
        (("deq", {"deq": SHALLOW, "train.lr": 1e-3}), {"val_loss": -1.0, "best_deq_contraction": 0.1}, None),
        (("deq", {"deq": DEEP, "train.lr": 1e-3}), {"val_loss": -500.0, "loss_degenerate": 1.0,
                                                    "best_deq_contraction": 0.99}, None),
        (("deq", {"deq": DEEP, "train.lr": 3e-3}), {"val_loss": -2.0, "deq_contraction": 0.8,
                                                    "deq_iterations": 12.0}, None),  # stopped: last evaluation
        (("deq", {"deq": SHALLOW, "train.lr": 3e-3}), {"val_loss": 9.0, "failed": "TrainingError: NaN loss"}, None),
        (("explicit-2", {"train.lr": 1e-3}), None, RuntimeError("worker died")),
    ]
    best, failed, results = select_trials(trials, base, "val_loss", "min")
    assert set(best) == {"deq"} and best["deq"]["metrics"]["val_loss"] == -2.0
    assert best["deq"]["config"]["spec"]["deq"] == {"norm": "spectral", "lam": 1.05, "gain": "learned"}
    assert failed == {"deq": ["TrainingError: NaN loss"], "explicit-2": ["worker died"]}
    assert [(r["val_loss"], r["degenerate"]) for r in results] == [(-500.0, True), (-2.0, False), (-1.0, False)]
    stopped = results[1]
    assert stopped["best_deq_contraction"] == 0.8 and stopped["best_deq_iterations"] == 12.0
    assert results[0]["best_deq_contraction"] == 0.99  # its own summary's value, not replaced
    assert select_trials(trials[:3], base, "val_loss", "max")[0]["deq"]["metrics"]["val_loss"] == -1.0
