"""params.yaml → typed settings: the shipped file is valid, and every kind of mistake is an error that
names the key (and the stage CLIs turn it into one line and exit status 2, writing nothing)."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.settings import ParamsError, load_params
from pipelines.trials import apply_sample, flatten, trial_config

ROOT = Path(__file__).resolve().parents[1]


def _params(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_params_are_valid_and_compare_deq_with_explicit():
    s = load_params(ROOT / "params.yaml")
    assert s.root == ROOT
    assert len(s.experiments) >= 2
    for exp in s.experiments.values():
        kinds = {v.variant for v in exp.variants.values()}
        assert kinds == {"deq", "explicit"}
        assert exp.dataset in s.data.dataset_names()
    assert s.tracking_uri().startswith("sqlite:////"), "relative sqlite paths resolve against params.yaml's folder"


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["deq"].update(solverr="anderson"), "deq.solverr: unknown key"),
    (lambda r: r["deq"].update(solver="newton"), "unknown solver 'newton'; known: anderson, broyden, picard"),
    (lambda r: r["deq"].update(backward="adjoint"), "unknown backward mode 'adjoint'"),
    (lambda r: r["deq"].update(tau=1.5), "deq.tau: Input should be less than or equal to 1"),
    (lambda r: r["deq"].update(solver_options={"memry": 3}), "unknown solver_options ['memry']"),
    (lambda r: r["train"].update(lr=-1), "train.lr: Input should be greater than 0"),
    (lambda r: r["tune"].update(scheduler="hyperband"), "tune.scheduler"),
    (lambda r: r["tune"].update(metric="loss"), "tune.metric: unknown tune metric 'loss'"),
    (lambda r: r["tune"]["search_space"].update({"optimizer.lr": {"grid": [1]}}), "must start with one of"),
    (lambda r: r["tune"]["search_space"].update({"train.lr": {"uniform": [1, 0]}}), "low < high"),
    (lambda r: r["tune"]["search_space"].update({"train.lr": {"grid": [1], "choice": [2]}}), "exactly one of"),
    (lambda r: r["experiments"]["nice-digits"].update(dataset="mnist"), "'mnist' is not prepared by the data section"),
    (lambda r: r["experiments"]["nice-digits"]["variants"]["deq"].update(variant="implicit"), "variant"),
    (lambda r: r["experiments"]["nice-digits"]["loss"].update(name="ssmm"), "unknown loss 'ssmm'"),
    (lambda r: r.update(trian={}), "trian: unknown key"),
    (lambda r: r["experiments"]["nice-digits"].update(train={"stpes": 9}), "unknown train key(s) 'stpes'"),
    (lambda r: r["experiments"]["nice-digits"].update(train={"seeds": 9}), "unknown train key(s) 'seeds'"),
    (lambda r: r["experiments"]["nice-digits"].update(train={"steps": 0}),
     "experiments.nice-digits.train.steps: Input should be greater than or equal to 1"),
])
def test_bad_params_name_the_key(tmp_path, edit, message):
    with pytest.raises(ParamsError) as err:
        load_params(_params(tmp_path, edit))
    assert message in str(err.value)


def test_unreadable_params(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("deq: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_overrides_are_validated_too(tmp_path):
    s = load_params(ROOT / "params.yaml", {"deq.solver": "broyden", "train.steps": 7})
    assert (s.deq.solver, s.train.steps) == ("broyden", 7)
    with pytest.raises(ParamsError, match="unknown solver"):
        load_params(ROOT / "params.yaml", {"deq.solver": "nope"})


def test_trial_config_and_samples():
    s = load_params(ROOT / "params.yaml")
    cfg = trial_config(s, "nice-digits", "explicit-8")
    assert cfg["spec"]["depth"] == 8 and cfg["spec"]["variant"] == "explicit"
    assert cfg["spec"]["deq"]["solver"] == s.deq.solver
    sampled = apply_sample(cfg, {"train.lr": 0.5, "deq.k": 4, "loss.options.n_particles": 2, "width": 9})
    assert sampled["train"]["lr"] == 0.5 and sampled["spec"]["deq"]["k"] == 4
    assert sampled["spec"]["loss"]["options"]["n_particles"] == 2 and sampled["spec"]["width"] == 9
    assert cfg["train"]["lr"] == s.train.lr, "apply_sample copies"
    flat = flatten({"spec": sampled["spec"]})
    assert flat["spec.deq.k"] == 4


def test_an_experiment_sets_its_own_train_values_over_the_train_section(tmp_path):
    def edit(raw):
        raw["experiments"]["dkef-mixture"]["train"] = {"steps": 1234, "eval_every": 77}
        raw["experiments"]["nice-digits"].pop("train", None)
    s = load_params(_params(tmp_path, edit))
    own, shared = s.experiment_train("dkef-mixture"), s.experiment_train("nice-digits")
    assert (own["steps"], own["eval_every"]) == (1234, 77)
    assert (shared["steps"], shared["eval_every"]) == (s.train.steps, s.train.eval_every)
    assert own["batch_size"] == shared["batch_size"] == s.train.batch_size
    cfg = trial_config(s, "dkef-mixture", "deq")
    assert (cfg["train"]["steps"], cfg["train"]["eval_every"]) == (1234, 77)
    assert "seeds" not in cfg["train"]
    # the search trains for tune.steps whatever the experiment's cap, so a new cap does not re-run the search
    from pipelines.tune import search_config
    assert search_config(s, "dkef-mixture", "deq")["train"]["steps"] == s.tune.steps


@pytest.mark.parametrize("stage", ["tune", "train", "evaluate"])
def test_stage_cli_reports_bad_params_in_one_line(tmp_path, stage):
    path = _params(tmp_path, lambda r: r["deq"].update(solver="newton"))
    proc = subprocess.run([sys.executable, "-m", f"pipelines.{stage}", "--params", str(path),
                           "--experiment", "nice-digits"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown solver 'newton'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_stage_cli_names_a_missing_dataset(tmp_path):
    path = _params(tmp_path, lambda r: r["data"].update(root=str(tmp_path / "nothing")))
    proc = subprocess.run([sys.executable, "-m", "pipelines.tune", "--params", str(path), "--experiment", "nice-digits"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "digits" in proc.stderr and "Traceback" not in proc.stderr
