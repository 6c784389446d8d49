"""params profiles (pipelines.profile): the paper-scale GPU profile stays valid against the schema, a profile's
bad key is refused naming it, and nothing is written on an error."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines import ParamsError
from pipelines.profile import apply_profile, merge
from pipelines.settings import load_params

ROOT = Path(__file__).resolve().parents[1]


def test_merge_replaces_experiments_and_datasets_and_merges_the_rest():
    base = {"train": {"steps": 1, "lr": 0.1}, "experiments": {"a": {"x": 1}}, "data": {"root": "r", "datasets": {"d": {}}}}
    out = merge(base, {"train": {"steps": 5}, "experiments": {"b": {"y": 2}}, "data": {"datasets": {"e": {}}}})
    assert out == {"train": {"steps": 5, "lr": 0.1}, "experiments": {"b": {"y": 2}},
                   "data": {"root": "r", "datasets": {"e": {}}}}
    assert base["train"]["steps"] == 1, "the input is left as it was"


def test_the_paper_gpu_profile_is_valid_and_at_the_papers_scale(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply_profile(ROOT / "profiles" / "paper-gpu.yaml", params)
    s = load_params(params)
    assert s.base.device == "cuda" and s.train.seeds >= 3 and s.eval.is_samples == 10**6
    assert s.experiments["nice-mnist"].width == 1000 and (s.bench.in_dim, s.bench.width, s.bench.batch) == (784, 1000, 128)
    assert {"dkef-redwine", "nice-mnist", "vae-mnist", "ncsn-cifar10"} <= set(s.experiments)
    assert "dkef-mixture" not in s.experiments, "a profile's experiments replace the defaults"


def test_the_cpu_converged_profile_only_raises_the_step_cap(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    default = load_params(params)
    apply_profile(ROOT / "profiles" / "cpu-converged.yaml", params)
    s = load_params(params)
    assert s.train.steps > default.train.steps
    assert s.model_dump(exclude={"train"}) == default.model_dump(exclude={"train"})
    assert s.train.model_dump(exclude={"steps"}) == default.train.model_dump(exclude={"steps"})


def test_the_depth_study_profile_searches_deq_settings_on_every_default_experiment(tmp_path):
    """profiles/depth-study.yaml: the default experiments (same datasets, models, widths) plus one on generated
    data; a search over deq configurations and learning rates; the DEQ variants' trials are arms of that search."""
    from pipelines.trials import search_arms, trial_config

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    default = load_params(params)
    apply_profile(ROOT / "profiles" / "depth-study.yaml", params)
    s = load_params(params)
    assert set(default.experiments) < set(s.experiments) and "energy-mixture8" in s.experiments
    for name, exp in default.experiments.items():
        study = s.experiments[name]
        assert (study.dataset, study.model, study.width) == (exp.dataset, exp.model, exp.width)
        assert set(exp.variants) - {"explicit-2"} <= set(study.variants) or name == "vae-digits"
    assert s.data.datasets["mixture8"].dim == 8 and s.data.datasets["mixture8"].shape == "gaussians"
    bundles = s.tune.search_space["deq"].grid
    assert len(bundles) >= 3 and {b["norm"] for b in bundles} == {"frobenius", "spectral"}
    assert {b["backward"] for b in bundles} == {"phantom", "implicit"} and min(b["lam"] for b in bundles) < 1.05
    assert any(b.get("gain") == "learned" for b in bundles)
    assert len(s.tune.search_space["train.lr"].grid) >= 2
    for name, exp in s.experiments.items():
        arms = search_arms({v: c.variant for v, c in exp.variants.items()}, {"deq": bundles})
        assert len(arms) == len(bundles) + len(exp.variants) - 1
        assert trial_config(s, name, "deq")["spec"]["deq"]["norm"] == s.deq.norm  # bundles come on top


def test_a_bad_profile_is_refused_naming_the_key_and_writes_nothing(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_bytes()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"stpes": 10}}))
    with pytest.raises(ParamsError, match=r"(?s)bad.yaml.*train.stpes: unknown key"):
        apply_profile(bad, params)
    assert params.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "params.yaml"]
    proc = subprocess.run([sys.executable, "-m", "pipelines.profile", str(bad), "--params", str(params)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "train.stpes" in proc.stderr and params.read_bytes() == before
