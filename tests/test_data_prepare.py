"""The prepare stage: `python -m pipelines.prepare` (help, bad input as one line and exit status 2, no
partial output), and `dvc repro` of dvc.yaml's prepare stage in a fresh git repository, offline, on the
default datasets — a second `dvc repro` does nothing."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deqsm.data import load_split, read_manifest
from pipelines.prepare import main
from test_dvc_deps import stage_files

REPO = Path(__file__).resolve().parents[1]


def write_params(path, data):
    path.write_text(yaml.safe_dump({"data": data}, sort_keys=False))
    return path


def test_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "pipelines.prepare", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "--params" in out.stdout and "registered datasets: celeba64" in out.stdout


def test_prepares_the_params_datasets_relative_to_the_params_file(tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", {"root": "out", "seed": 1, "datasets": {
        "gaussian": {"n_train": 40, "n_val": 5, "n_test": 5}, "digits": {"scale": "symmetric"}}})
    assert main(["--params", str(params)]) == 0
    out = capsys.readouterr().out
    assert "[1/2] gaussian: train 40, val 5, test 5 rows" in out and "[2/2] digits" in out
    assert len(load_split(tmp_path / "out", "digits", "test").x) == 359
    assert read_manifest(tmp_path / "out", "gaussian")["preprocessing"]["seed"] == 1
    assert main(["--params", str(params), "--dataset", "gaussian"]) == 0


@pytest.mark.parametrize("data,message", [
    ({"datasets": {"mnits": {}}}, "unknown dataset 'mnits'; known: celeba64, cifar10, digits, gaussian, hepmass, "
                                  "miniboone, mixture, mnist"),
    ({"datasets": {"digits": {"logit": 0.1}}}, "data.datasets: digits.logit: unknown key; known: dataset, scale"),
    ({"seed": "zero"}, "data.seed: Input should be a valid integer"),
    ({"datasets": {"digits": {}, "cifar10": {}}}, "dataset 'cifar10': files missing in {raw}/cifar-10-batches-py: "
                                                  "data_batch_1; data_batch_2"),
])
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, capsys, data, message):
    params = write_params(tmp_path / "params.yaml", {"root": "out", "raw_root": "raw", **data})
    assert main(["--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message.format(raw=tmp_path / "raw") in err, err
    assert not (tmp_path / "out").exists()


def test_unknown_dataset_on_the_command_line(tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", {"root": "out"})
    assert main(["--params", str(params), "--dataset", "mnist"]) == 2
    assert "datasets ['mnist'] are not in data.datasets; configured: digits, gaussian, mixture" in capsys.readouterr().err


@pytest.mark.integration
def test_dvc_repro_prepare_offline_then_nothing_to_do(tmp_path):
    repo = tmp_path / "repo"
    # the stage's own code, as tests/test_dvc_deps.py derives it from the imports, and nothing else: the copy
    # runs only if those files are all the stage needs
    for rel in ["params.yaml", "dvc.yaml", ".gitignore", *sorted(stage_files("pipelines.prepare"))]:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, repo / rel)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "GIT_CONFIG_NOSYSTEM": "1"}

    def run(*cmd):
        out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{cmd}: {out.stdout}\n{out.stderr}"
        return out.stdout + out.stderr

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("dvc", "config", "core.analytics", "false")
    run("dvc", "config", "core.site_cache_dir", str(tmp_path / "dvc-site-cache"))
    first = run("dvc", "repro", "prepare")  # the data stage alone (the later stages need the whole project)
    assert "Running stage 'prepare'" in first and "wrote digits, digits_binary, digits_images, gaussian, mixture" in first
    data = yaml.safe_load((repo / "params.yaml").read_text())["data"]
    for name in data["datasets"]:
        assert len(load_split(repo / data["root"], name, "train").x) > 0
    binary = load_split(repo / data["root"], "digits_binary", "train").x
    assert binary.shape[1:] == (1, 8, 8) and set(binary.unique().tolist()) == {0.0, 1.0}, "the VAE's binarised digits"
    lock = (repo / "dvc.lock").read_text()
    assert "data/prepared" in lock and "deqsm/data" in lock
    second = run("dvc", "repro", "prepare")
    assert "Stage 'prepare' didn't change, skipping" in second and "Running stage" not in second
    assert (repo / "dvc.lock").read_text() == lock
