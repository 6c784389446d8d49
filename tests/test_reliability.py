"""Reliability (issue 7): each fault is provoked for real — bad params, NaN losses and a failing DEQ solver in
Ray trials, a SIGKILLed trial worker, a SIGINTed `dvc repro`, corrupt prepared data, two runs of the same
seed — with real git + DVC, a real local Ray and a real MLflow SQLite store; and the security rules (services
on 127.0.0.1, Ray with token authentication, checkpoints loaded with weights_only, no eval / pickle of user
files) are checked, and an unreachable Ray cluster stops the tune stage at once with one line.

Layout (about 3 minutes on 2 idle cores, 5 on busy ones): fast checks first; then one local Ray in this
process for the trial faults (tune stage called in-process); then three copies of a one-experiment project
run `dvc repro` concurrently — A and C uninterrupted, B interrupted with SIGINT and repro'd again — and A / B /
C then serve the determinism, resume, data-fault and bad-params-under-DVC checks.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from pipeline_project import ROOT, env, free_port, make_project, ray_driver, run, stop_group, tiny_params
from pipelines import ServiceError
from pipelines.settings import ParamsError, load_params

EXP = "dkef-mixture"
# the only non-deterministic fields of metrics.json: wall-clock time per step, its mean and se over the seeds
TIMING = {"step_ms_median_mean", "step_ms_median_se_seeds"}


def _one_experiment(**changes) -> dict:
    """tiny_params reduced to the DKEF experiment on the 2-D mixture (deq vs explicit-2)."""
    raw = tiny_params(**changes)
    raw["experiments"] = {EXP: raw["experiments"][EXP]}
    raw["data"]["datasets"] = {"mixture": raw["data"]["datasets"]["mixture"]}
    return raw


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _load_error(tmp_path: Path, raw: dict) -> str:
    with pytest.raises(ParamsError) as err:
        load_params(_write(tmp_path / "params.yaml", raw))
    return str(err.value)


def _without_timing(metrics: dict) -> dict:
    return {v: {k: x for k, x in row.items() if k not in TIMING} for v, row in metrics.items()}


def _tracker(root: Path):
    from pipelines.tracking import Tracker

    return Tracker(f"sqlite:///{root}/out/mlflow.db")


# --------------------------------------------------------------------------------------------------------------
# Bad params: the message names the key, the value and what is allowed (load_params; the stages exit 2 on it)
# --------------------------------------------------------------------------------------------------------------

def _set(raw: dict, key: str, value) -> dict:
    node = raw
    *parents, last = key.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    return raw


@pytest.mark.parametrize("key, value, expected", [
    ("deq.lam", 1.0, "deq.lam: Input should be greater than 1 (got 1.0)"),
    ("deq.lam", 0.5, "deq.lam: Input should be greater than 1 (got 0.5)"),
    ("deq.k", 0, "deq.k: Input should be greater than or equal to 1 (got 0)"),
    ("deq.tol", -1e-4, "deq.tol: Input should be greater than 0 (got -0.0001)"),
    ("train.steps", "many", "train.steps: Input should be a valid integer, unable to parse string as an integer "
                            "(got 'many')"),
    ("tune.search_space", {"train.lr": {"grid": []}},
     "tune.search_space.train.lr: empty grid list: give at least one value (got {'grid': []})"),
    ("deq.solverr", "anderson", "deq.solverr: unknown key; known: solver, solver_options, backward, k, tau, tol, "
                                "max_iter, stop_mode, lam, norm"),
    ("experiments.dkef-mixture.variants.deq.dept", 3,
     "experiments.dkef-mixture.variants.deq.dept: unknown key; known: variant, depth, width"),
    ("train.optimizer", "adamm", "train.optimizer: unknown optimizer 'adamm'; known: adam, adamw, sgd (got 'adamm')"),
    ("experiments.dkef-mixture.model", "dkeff", "experiments.dkef-mixture.model: unknown model 'dkeff'; known: "),
    ("base.device", "gpu", "base.device: unknown device 'gpu'; use auto, cpu, cuda or cuda:<index> (got 'gpu')"),
    ("experiments.dkef-mixture.model_options.n_inducingg", 3,
     "experiments.dkef-mixture: unknown model_options ['n_inducingg']; this model's options: "),
    ("experiments.dkef-mixture.eval_options.is_batchsize", 3,
     "experiments.dkef-mixture.eval_options.is_batchsize: unknown key; known: batch_size, seed, is_samples, is_scale, "
     "is_batch_size"),
    # search-space values are applied to every variant's configuration and checked before Ray starts
    ("tune.search_space", {"deq.k": {"grid": [2, 0]}},
     "tune.search_space.deq.k: value 0 is invalid (deq.k: Input should be greater than or equal to 1)"),
    ("tune.search_space", {"deq.lam": {"uniform": [0.5, 3.0]}},
     "tune.search_space.deq.lam: value 0.5 is invalid (deq.lam: Input should be greater than 1)"),
    ("tune.search_space", {"deq.solver": {"choice": ["anderson", "newton"]}},
     "tune.search_space.deq.solver: value 'newton' is invalid (deq.solver: unknown solver 'newton'; known: "
     "anderson, broyden, picard)"),
    ("tune.search_space", {"train.optimiser": {"grid": ["adam"]}},
     "tune.search_space.train.optimiser: value 'adam' is invalid (train.optimiser: unknown key; known: steps"),
])
def test_bad_param_names_key_value_and_what_is_allowed(tmp_path, key, value, expected):
    message = _load_error(tmp_path, _set(_one_experiment(), key, value))
    assert expected in message, message


def test_search_space_typo_stops_the_tune_stage_before_ray_starts(tmp_path):
    raw = _one_experiment(**{"tune.search_space": {"deq.max_itr": {"grid": [5, 10]}}})
    params = _write(tmp_path / "params.yaml", raw)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipelines.tune", "--params", str(params), "--experiment", EXP],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr
    assert "tune.search_space.deq.max_itr: value 5 is invalid (deq.max_itr: unknown key; known: solver" in proc.stderr
    assert "Traceback" not in proc.stderr and "Started a local Ray instance" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists(), "nothing written: no MLflow store, no Ray results"
    print(f"rejected in {time.time() - t0:.1f}s")


# --------------------------------------------------------------------------------------------------------------
# Security
# --------------------------------------------------------------------------------------------------------------

SOURCES = ("deqsm", "pipelines", "benchmarks")
FORBIDDEN = {
    "pickle.load / loads": re.compile(r"\b(c?pickle|dill|cloudpickle|joblib)\.loads?\("),
    "eval( / exec(": re.compile(r"(?<![\w.])(eval|exec)\("),
    "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
    "yaml.load( / unsafe_load": re.compile(r"yaml\.(load|unsafe_load|full_load)\("),
    "numpy allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "pandas read_pickle": re.compile(r"read_pickle\("),
}


def test_source_tree_has_no_eval_or_unpickling_of_files():
    files = [p for d in SOURCES for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 20
    hits = [f"{p.relative_to(ROOT)}:{i}: {what}: {line.strip()}"
            for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            for what, rx in FORBIDDEN.items() if rx.search(line)]
    assert not hits, "\n".join(hits)
    loads = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
             if "torch.load(" in line and "weights_only=True" not in line and "``" not in line]
    assert not loads, f"torch.load without weights_only=True: {loads}"
    # the check itself finds what it looks for
    assert FORBIDDEN["eval( / exec("].search("x = eval(s)") and not FORBIDDEN["eval( / exec("].search("model.eval()")


def _pwned(path: str) -> str:
    """What a malicious checkpoint runs on unpickling (here: writes a marker file)."""
    Path(path).write_text("code ran while loading")
    return "payload"


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_pwned, (self.marker,))


def test_checkpoints_with_pickled_objects_are_refused(tmp_path):
    from deqsm.train import TrainingError, load_checkpoint
    from pipelines.artifacts import load_model

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "spec": {"name": "x"}, "state_dict": {}, "extra": _Payload(marker)},
               evil)
    with pytest.raises(TrainingError, match=r"cannot load checkpoint .*evil\.pt.*(Weights only load failed|Unsupported global)"):
        load_checkpoint(evil)
    with pytest.raises(ValueError, match=r"cannot load model file .*evil\.pt"):
        load_model(evil, torch.zeros(4, 2))
    assert not marker.exists(), "the payload must not run"
    # the payload is live: an unsafe load would have run it
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "code ran while loading"
    # and a plain checkpoint (tensors, numbers, containers) still loads
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.ones(2)}, "step": 3, "history": [{"val_loss": 0.5}]}, good)
    assert load_checkpoint(good)["step"] == 3


def test_cifar10_without_md5_check_does_not_unpickle_arbitrary_files(tmp_path):
    from deqsm.data import prepare_datasets
    from deqsm.data.settings import DataSettings

    marker = tmp_path / "pwned"
    folder = tmp_path / "raw" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"):
        (folder / name).write_bytes(pickle.dumps(_Payload(marker)))
    settings = DataSettings.model_validate({"root": "out", "raw_root": "raw",
                                            "datasets": {"cifar10": {"verify_md5": False}}})
    with pytest.raises(Exception):
        prepare_datasets(settings, base=tmp_path, names=["cifar10"])
    assert not marker.exists(), "a crafted data_batch_1 ran code during `prepare`"


def _listening(pids: set[int]) -> list[tuple[str, int, str]]:
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((c.laddr.ip, c.laddr.port, proc.name()))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


@pytest.mark.integration
def test_make_ui_serves_mlflow_on_loopback_only(tmp_path):
    port = free_port()
    dry = subprocess.run(["make", "-n", "ui", f"MLFLOW_PORT={port}"], cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=60)
    line = next(ln for ln in dry.stdout.splitlines() if ln.lstrip().startswith("mlflow ui"))
    assert f"--host 127.0.0.1 --port {port}" in line and "0.0.0.0" not in dry.stdout
    # run the Makefile's command on a throw-away store (the project's own out/mlflow.db stays untouched)
    cmd = re.sub(r"--backend-store-uri \"?\$\(.*?\)\)\"\)\"?", f"--backend-store-uri sqlite:///{tmp_path}/ui.db", line)
    assert cmd != line, line
    server = subprocess.Popen(["bash", "-c", cmd], cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, found = time.time() + 90, []
        while time.time() < deadline and not any(p == port for _, p, _ in found):
            time.sleep(1)
            tree = {server.pid} | {c.pid for c in psutil.Process(server.pid).children(recursive=True)}
            found = _listening(tree)
        assert any(p == port for _, p, _ in found), f"the UI did not listen on {port}: {found}"
        assert {ip for ip, _, _ in found} <= {"127.0.0.1", "::1"}, found
    finally:
        stop_group(server, timeout=30)


def test_unreachable_ray_cluster_fails_fast_naming_it(tmp_path, monkeypatch):
    """Where nothing listens at tune.address (or RAY_ADDRESS), ray_session says so within tune.connect_timeout,
    instead of Ray's retries for ~14 minutes; without the cluster's token it says that, before connecting."""
    import ray

    from pipelines.ray_session import ray_session
    from pipelines.settings import Settings

    assert not ray.is_initialized(), "runs before the module's local Ray (ray_session would use that one)"
    port = free_port()
    before = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    settings = Settings.model_validate(_one_experiment(**{"tune.address": f"127.0.0.1:{port}",
                                                          "tune.connect_timeout": 2}))
    t0 = time.monotonic()
    with pytest.raises(ServiceError) as err:
        with ray_session(settings):
            pass
    assert time.monotonic() - t0 < 2 + 3
    assert str(err.value).startswith(f"Ray cluster at 127.0.0.1:{port} (tune.address) is not reachable (connection "
                                     "refused after 0.0 s; tune.connect_timeout 2 s): start it (`ray up "
                                     "ray_cluster.yaml` / `ray start --head`) or set tune.address: null"), err.value
    assert {k: os.environ.get(k) for k in before} == before, "the environment is restored"

    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ServiceError, match=rf"127\.0\.0\.1:{port} \(RAY_ADDRESS\) is not reachable.*unset it"):
        with ray_session(Settings.model_validate(_one_experiment())):
            pass
    monkeypatch.delenv("RAY_ADDRESS")

    # An address that listens (reachable first, then the token): without the token, say that before joining.
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        settings = Settings.model_validate(_one_experiment(**{"tune.address": f"127.0.0.1:{port}",
                                                              "tune.connect_timeout": 2}))
        monkeypatch.delenv("RAY_AUTH_TOKEN")
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
        with pytest.raises(ServiceError, match=rf"cluster at 127\.0\.0\.1:{port} \(tune.address\) needs its token.*"
                                              rf"no RAY_AUTH_TOKEN and no {re.escape(str(tmp_path))}/.ray/auth_token"):
            with ray_session(settings):
                pass
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
        with pytest.raises(ServiceError, match=r"needs its token.*RAY_AUTH_TOKEN_PATH=.*missing"):
            with ray_session(settings):
                pass


def test_tune_stage_exits_3_with_one_line_when_the_ray_cluster_is_unreachable(tmp_path):
    port = free_port()
    params = _prepared_project(tmp_path, _one_experiment(**{"tune.address": f"127.0.0.1:{port}",
                                                            "tune.connect_timeout": 5}))
    proc = subprocess.run([sys.executable, "-m", "pipelines.tune", "--params", str(params)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 3, proc.stderr
    # the only error line, and the last (MLflow logs its store's creation before: tune.py opens it before Ray)
    lines = proc.stderr.strip().splitlines()
    assert sum(ln.startswith("error:") for ln in lines) == 1 and lines[-1:] == [
        f"error: Ray cluster at 127.0.0.1:{port} (tune.address) is not reachable (connection refused after 0.0 s; "
        "tune.connect_timeout 5 s): start it (`ray up ray_cluster.yaml` / `ray start --head`) or set tune.address: "
        "null for a local Ray"], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "tune").exists(), "no Ray results"


# --------------------------------------------------------------------------------------------------------------
# Trial faults, on one local Ray started in this process (pipelines.ray_session.ray_session, the stage's own)
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """The project's local Ray (ray_session); its workers inherit DEQSM_TRIAL_PID_DIR, so each trial writes its
    process id where a test can find it. The variable is set only while Ray starts. RAY_AUTH_TOKEN is unset, as
    for `make run`: the session makes its own token (in os.environ while it lasts) and unsets it afterwards."""
    import ray

    from pipelines.ray_session import ray_session
    from pipelines.settings import Settings

    pid_dir = tmp_path_factory.mktemp("trial-pids")
    settings = Settings.model_validate(_one_experiment())
    session_token = os.environ.pop("RAY_AUTH_TOKEN")  # conftest's, for clusters started with `ray start`
    os.environ["DEQSM_TRIAL_PID_DIR"] = str(pid_dir)
    try:
        session = ray_session(settings)
        session.__enter__()
    except BaseException:
        os.environ["RAY_AUTH_TOKEN"] = session_token
        raise
    finally:
        del os.environ["DEQSM_TRIAL_PID_DIR"]
    try:
        yield pid_dir
    finally:
        session.__exit__(None, None, None)
        restored = os.environ.get("RAY_AUTH_TOKEN")
        os.environ["RAY_AUTH_TOKEN"] = session_token
    assert not ray.is_initialized()
    assert restored is None, "ray_session restores the environment: its token is gone with it"


def _ray_processes() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True)}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_ray_runs_only_for_clients_with_its_token(local_ray, tmp_path):
    """Ray core (GCS, raylet, workers) binds its gRPC ports on all interfaces (Ray 2.60 has no option to bind
    them to 127.0.0.1), so the token is what keeps other hosts out: ray_session's local Ray runs with token
    authentication and a token made for this session, and a client without it or with another one cannot even
    connect. No dashboard either."""
    import ray

    token = os.environ["RAY_AUTH_TOKEN"]
    assert os.environ["RAY_AUTH_MODE"] == "token" and re.fullmatch(r"[0-9a-f]{64}", token), "a fresh random token"
    found = _listening(_ray_processes())
    assert found, "no listening Ray process found"
    assert not any(port == 8265 for _, port, _ in found), "include_dashboard=False: no dashboard"
    core = [p for p in psutil.Process().children(recursive=True) if p.name() in ("gcs_server", "raylet")]
    assert len(core) == 2 and all(p.environ().get("RAY_AUTH_MODE") == "token"
                                  and p.environ().get("RAY_AUTH_TOKEN") == token for p in core)
    address = ray.get_runtime_context().gcs_address
    t0 = time.monotonic()
    drivers = {"no token": ray_driver(address, tmp_path),
               "token mode, no token": ray_driver(address, tmp_path, RAY_AUTH_MODE="token"),
               "wrong token": ray_driver(address, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)}
    for name, proc in drivers.items():
        out = proc.communicate(timeout=180)[0]
        assert proc.returncode != 0 and "task result" not in out, f"{name}:\n{out[-3000:]}"
        assert re.search(r"Failed to connect to Ray cluster|no authentication token was found", out), \
            f"{name}:\n{out[-3000:]}"
    assert time.monotonic() - t0 < 120


def test_model_that_does_not_fit_its_data_stops_the_tune_stage_before_ray_starts(tmp_path):
    """A VAE (Bernoulli decoder) pointed at the digits in [0, 1] instead of the binarised ones: one error naming
    the experiment, the variant, the model, the dataset and what to change; no Ray, no MLflow run."""
    from deqsm.data import prepare_datasets
    from deqsm.data.settings import DataSettings

    full = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = _one_experiment()
    raw["data"]["datasets"] = {"digits_images": full["data"]["datasets"]["digits_images"]}
    raw["experiments"] = {"vae": {**full["experiments"]["vae-digits"], "dataset": "digits_images"}}
    params = _write(tmp_path / "params.yaml", raw)
    prepare_datasets(DataSettings.model_validate(raw["data"]), base=tmp_path)
    proc = subprocess.run([sys.executable, "-m", "pipelines.tune", "--params", str(params)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr
    assert ("error: experiments.vae.variants.deq (model 'vae' on dataset 'digits_images'): the VAE's Bernoulli "
            "decoder needs binarised data (0/1 pixels): prepare the dataset with binarize: threshold or bernoulli"
            in proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr and "Started a local Ray instance" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists(), "nothing written: no MLflow store, no Ray results"


def _prepared_project(tmp_path: Path, raw: dict) -> Path:
    from deqsm.data import prepare_datasets
    from deqsm.data.settings import DataSettings

    params = _write(tmp_path / "params.yaml", raw)
    prepare_datasets(DataSettings.model_validate(raw["data"]), base=tmp_path, names=["mixture"])
    return params


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_nan_and_solver_failures_fail_their_trials_only(local_ray, tmp_path, capsys):
    """`mixed`: per variant, lr 1e-3 and 1e6 (NaN at step 2); the DEQ solver may do one iteration and training
    stops at the first step that misses tol. `doomed`: only the DEQ variant. mixed finishes (explicit-2 at lr
    1e-3) with tune.allow_missing_variants (without it, the variant with no finished trial fails the stage);
    doomed has no finished trial: the stage exits 1 naming it, with each cause."""
    from pipelines import tune as tune_stage

    raw = _one_experiment(**{"tune.search_space": {"train.lr": {"grid": [1.0e-3, 1.0e6]}}, "tune.steps": 12,
                             "tune.max_failures": 0, "deq.max_iter": 1, "deq.tol": 1.0e-8,
                             "train.max_nonconverged_steps": 1, "tune.allow_missing_variants": True})
    exp = raw["experiments"].pop(EXP)
    raw["experiments"] = {"mixed": exp, "doomed": {**exp, "variants": {"deq": {"variant": "deq"}}}}
    params = _prepared_project(tmp_path, raw)

    tune_stage.main(["--params", str(params), "--experiment", "mixed"])  # returns: the stage succeeds
    out = capsys.readouterr()
    assert "warning: mixed: no finished trial for variant(s) ['deq'], left out (tune.allow_missing_variants)" in out.err
    assert "the DEQ solver missed its tolerance for 1 consecutive steps" in out.err
    assert "FAILED: " in out.out and "non-finite loss (nan) at step 2" in out.out
    best = json.loads((tmp_path / "out" / "tune" / "mixed" / "best.json").read_text())
    assert set(best["best"]) == {"explicit-2"} and best["best"]["explicit-2"]["sample"] == {"train.lr": 1.0e-3}
    assert best["trials"] == 4 and len(best["failed"]["deq"]) == 2 and len(best["failed"]["explicit-2"]) == 1
    assert "non-finite loss (nan)" in best["failed"]["explicit-2"][0]

    tracker = _tracker(tmp_path)
    runs = tracker.runs("mixed")
    trials = {(r.data.tags["variant"], r.data.params["train.lr"]): r for r in runs if "ray_trial_id" in r.data.tags}
    assert len(trials) == 4, "one MLflow run per trial"
    assert trials[("explicit-2", "0.001")].info.status == "FINISHED"
    nan_run = trials[("explicit-2", "1000000.0")]
    assert nan_run.info.status == "FAILED"
    assert nan_run.data.tags["failure_reason"].splitlines()[0].startswith("deqsm.train.TrainingError: non-finite loss (nan) at step 2")
    for lr in ("0.001", "1000000.0"):
        run_ = trials[("deq", lr)]
        assert run_.info.status == "FAILED"
        assert "the DEQ solver missed its tolerance for 1 consecutive steps" in run_.data.tags["failure_reason"].splitlines()[0]
    parent = next(r for r in runs if "ray_trial_id" not in r.data.tags)
    assert parent.info.status == "FINISHED" and parent.data.tags["failure_reason"].startswith("deq: ")

    with pytest.raises(SystemExit) as stop:
        tune_stage.main(["--params", str(params), "--experiment", "doomed"])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "tune failed:\n  doomed: no trial finished — deq: " in err and "missed its tolerance" in err
    doomed = tracker.runs("doomed")
    assert sorted(r.info.status for r in doomed) == ["FAILED"] * 3, "two trials and their parent"

    # By default a variant with no finished trial is an error, not a row that silently disappears.
    raw["tune"]["allow_missing_variants"] = False
    _write(params, raw)
    with pytest.raises(SystemExit) as stop:
        tune_stage.main(["--params", str(params), "--experiment", "mixed"])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "mixed: no finished trial for variant(s) ['deq']" in err and "tune.allow_missing_variants: true" in err
    parents = [r for r in tracker.runs("mixed") if "ray_trial_id" not in r.data.tags]
    assert sorted(r.info.status for r in parents) == ["FAILED", "FINISHED"]


def _trial_lines(run_dir: Path) -> list[dict]:
    """Every result Ray Tune wrote for the trials of ``run_dir`` (a line being written is skipped)."""
    lines = []
    for result in run_dir.glob("_trainable_*/result.json"):
        for ln in result.read_text().splitlines():
            try:
                lines.append(json.loads(ln))
            except json.JSONDecodeError:
                pass
    return lines


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_trial_worker_is_retried_from_its_checkpoint(local_ray, tmp_path):
    """The trial's worker is SIGKILLed once Ray has its first checkpoint (step 200 of 2400): Tune retries it
    (tune.max_failures: 1) from that checkpoint in a new process, the final metrics exist, and MLflow keeps one
    run for the trial, tagged `retried`. (The trial is long enough that the driver, which logs every result to
    MLflow, registers a checkpoint well before the trial ends.)"""
    from pipelines import tune as tune_stage

    steps, every = 2400, 200
    # no plateau rule: the trial runs all its steps, so the final result is known (it stopped at 1800 otherwise)
    raw = _one_experiment(**{"tune.search_space": {}, "tune.steps": steps, "tune.max_failures": 1,
                             "train.eval_every": every, "train.patience": None})
    raw["experiments"][EXP]["variants"] = {"explicit-2": {"variant": "explicit", "depth": 2}}
    params = _prepared_project(tmp_path, raw)
    run_dir = tmp_path / "out" / "ray" / EXP
    killed: dict = {}

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            lines = [ln for ln in _trial_lines(run_dir) if ln.get("step")]  # results the driver has registered
            if lines:
                trial_id = lines[0]["trial_id"]
                pid_file = local_ray / f"{trial_id}.pid"
                if pid_file.exists():
                    pid = int(pid_file.read_text())
                    killed.update(trial_id=trial_id, pid=pid, at_step=max(ln["step"] for ln in lines))
                    os.kill(pid, signal.SIGKILL)  # raises if the trial's process is already gone
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    tune_stage.main(["--params", str(params), "--experiment", EXP])
    thread.join(timeout=5)
    assert killed, "the trial finished before it could be killed"
    trial_id = killed["trial_id"]

    new_pid = int((local_ray / f"{trial_id}.pid").read_text())
    assert new_pid != killed["pid"], "the retry runs in a new process"
    lines = _trial_lines(run_dir)
    restarts = [ln for ln in lines if ln.get("iterations_since_restore") == 1 and ln["training_iteration"] > 1]
    assert restarts, "the retry was restored from a checkpoint (training_iteration goes on)"
    assert restarts[0]["step"] > every, f"resumed from a step-{restarts[0]['step'] - every} checkpoint, not from scratch"
    final = [ln for ln in lines if ln.get("final")]
    assert len(final) == 1 and final[0]["steps"] == steps

    best = json.loads((tmp_path / "out" / "tune" / EXP / "best.json").read_text())
    assert best["failed"] == {} and best["best"]["explicit-2"]["metrics"]["steps"] == steps

    tracker = _tracker(tmp_path)
    runs = [r for r in tracker.runs(EXP) if r.data.tags.get("ray_trial_id") == trial_id]
    assert len(runs) == 1, "the retried trial logs into its own run: no duplicate"
    run_ = runs[0]
    assert run_.info.status == "FINISHED" and run_.data.tags["retried"] == "1"
    assert "worker process has died" in run_.data.tags["last_error"], "the retry says why"
    history = tracker.client.get_metric_history(run_.info.run_id, "val_loss")
    by_step: dict[int, set] = {}
    for m in history:
        by_step.setdefault(m.step, set()).add(m.value)
    # (the last step also holds the final report's val_loss: the best validation loss, the selection metric)
    assert max(by_step) == steps and all(len(v) == 1 for s, v in by_step.items() if s != steps), \
        "a step reported by both attempts has the same value (deterministic resume)"


def test_a_trial_resumes_from_its_newest_readable_checkpoint_on_storage(tmp_path):
    """Ray's experiment snapshot can lag a trial's checkpoints by ~10 s (and miss its end): a killed search's
    trial goes on from the newest checkpoint its worker wrote, passing over one the kill cut short, and never
    from another trial's."""
    from pipelines.ray_search import _latest_checkpoint

    def write(trial_dir: str, n: int, step: int, when: float, truncate: bool = False) -> Path:
        path = tmp_path / trial_dir / f"checkpoint_{n:06d}" / "last.pt"
        path.parent.mkdir(parents=True)
        torch.save({"step": step}, path)
        if truncate:
            path.write_bytes(path.read_bytes()[:20])
        os.utime(path, (when, when))
        return path.parent

    t = time.time()
    write("_trainable_ab12c_00000_0_lr=0.1_2026", 0, 6, t - 30)
    expected = write("_trainable_ab12c_00000_0_lr=0.1_2026", 1, 12, t - 20)
    write("_trainable_ab12c_00000_0_lr=0.1_2026", 2, 18, t - 10, truncate=True)
    write("_trainable_ab12c_00001_1_lr=0.2_2026", 0, 30, t)  # another trial's, newer
    assert _latest_checkpoint(str(tmp_path), "ab12c_00000") == expected
    assert _latest_checkpoint(str(tmp_path), "ab12c_00002") is None
    assert _latest_checkpoint(None, "ab12c_00000") is None


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_finished_search_is_not_reused_when_the_data_changed(local_ray, tmp_path):
    """A finished search must not be restored by the next run: DVC re-runs tune because a dependency changed
    (here the data: another data.seed), and the trials must train on the new data."""
    from pipelines import tune as tune_stage

    raw = _one_experiment(**{"tune.search_space": {}, "tune.steps": 6})
    raw["experiments"][EXP]["variants"] = {"explicit-2": {"variant": "explicit", "depth": 2}}
    params = _prepared_project(tmp_path, raw)
    best_file = tmp_path / "out" / "tune" / EXP / "best.json"
    tune_stage.main(["--params", str(params), "--experiment", EXP])
    first = json.loads(best_file.read_text())["best"]["explicit-2"]["metrics"]
    raw["data"]["seed"] = 1
    params = _prepared_project(tmp_path, raw)
    tune_stage.main(["--params", str(params), "--experiment", EXP])
    second = json.loads(best_file.read_text())["best"]["explicit-2"]["metrics"]
    assert second["val_loss"] != first["val_loss"]
    trials = [r for r in _tracker(tmp_path).runs(EXP) if "ray_trial_id" in r.data.tags]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    assert len({r.data.tags["ray_trial_id"] for r in trials}) == 2, "a new trial, not the first search's"


# --------------------------------------------------------------------------------------------------------------
# `dvc repro` on project copies: A and C uninterrupted, B interrupted (SIGINT mid-tune) and repro'd again
# --------------------------------------------------------------------------------------------------------------

def _session_processes(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (ProcessLookupError, PermissionError):
            pass
    return out


def _interrupted_then_resumed(root: Path) -> dict:
    """`dvc repro` in its own session; SIGINT to its process group (what Ctrl-C does) once a tune trial has
    reported a checkpoint; then `dvc repro` again."""
    log = root / "interrupted.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["dvc", "repro"], cwd=root, env=env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 400
        at = None
        while time.time() < deadline and proc.poll() is None:
            if any(ln.get("step") for ln in _trial_lines(root / "out" / "ray" / EXP)):
                at = time.time()
                os.killpg(proc.pid, signal.SIGINT)
                break
            time.sleep(0.1)
        first_rc = proc.wait(timeout=300)
    deadline = time.time() + 30  # Ray's processes end with the stage; give them a moment
    while _session_processes(proc.pid) and time.time() < deadline:
        time.sleep(1)
    leftovers = _session_processes(proc.pid)
    for p in leftovers:  # ours (its session): end them so they do not outlive the test
        p.kill()
    second = run(["dvc", "repro"], root, check=False)
    return {"interrupted": at is not None, "first_rc": first_rc, "first_log": log.read_text(),
            "leftovers": [p.pid for p in leftovers], "second": second}


@pytest.fixture(scope="module")
def projects(tmp_path_factory):
    """Three copies of the same one-experiment project, run concurrently: A and C `dvc repro` once; B is
    interrupted and repro'd again. Returns the roots and what B went through."""
    # 600 steps: long enough that the SIGINT, sent once the driver has logged a trial's first result, lands
    # mid-search (at 60 the trials could finish first, the driver lagging behind them under load)
    raw = _one_experiment(**{"tune.steps": 600, "train.eval_every": 60, "tune.search_space": {}})
    roots = {k: make_project(tmp_path_factory.mktemp(f"project-{k}"), raw) for k in "ABC"}
    for root in roots.values():  # the report stage (tables, figures, a benchmark) is tested elsewhere
        dvc = yaml.safe_load((root / "dvc.yaml").read_text())
        del dvc["stages"]["report"], dvc["plots"]
        (root / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
        run(["git", "commit", "-qam", "without the report stage"], root)
    procs = {k: subprocess.Popen(["dvc", "repro"], cwd=roots[k], env=env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for k in "AC"}
    b = _interrupted_then_resumed(roots["B"])
    for k, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"project {k}: dvc repro exited {proc.returncode}:\n{out[-4000:]}"
    return {**roots, "B-run": b}


def _metrics(root: Path) -> dict:
    return json.loads((root / "results" / "experiments" / EXP / "metrics.json").read_text())


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_same_seed_gives_the_same_metrics_and_weights(projects):
    a, c = _metrics(projects["A"]), _metrics(projects["C"])
    assert set(a) == {"deq", "explicit-2"} and a["deq"]["test_loglik_mean"] is not None
    assert _without_timing(a) == _without_timing(c)
    assert {k for row in a for k in a[row] if a[row][k] != c[row][k]} <= TIMING
    for variant in a:
        for seed in a[variant]["seeds"]:
            wa, wc = (torch.load(p / "out" / "models" / EXP / variant / f"seed{seed}.pt", weights_only=True)["state_dict"]
                      for p in (projects["A"], projects["C"]))
            assert wa.keys() == wc.keys() and all(torch.equal(wa[k], wc[k]) for k in wa), f"{variant}/{seed}: weights differ"


@pytest.mark.integration
@pytest.mark.slow
def test_interrupted_repro_resumes_the_search_and_matches_an_uninterrupted_run(projects):
    b, root = projects["B-run"], projects["B"]
    assert b["interrupted"], "dvc repro finished before the interrupt:\n" + b["first_log"][-3000:]
    assert b["first_rc"] != 0, "an interrupted tune stage must not count as done:\n" + b["first_log"][-3000:]
    assert "interrupted: finished outputs are kept; run `dvc repro` again to continue" in b["first_log"]
    # DVC runs a stage through $SHELL -c (/bin/sh when unset). bash execs the command, so DVC sees the stage's
    # own exit status 130; dash waits for it and then ends itself by the SIGINT it also got, so DVC sees -2.
    assert f"failed to reproduce 'tune@{EXP}'" in b["first_log"]
    assert re.search(r"exited with (130|-2)\n", b["first_log"]), b["first_log"][-3000:]
    assert "Running stage 'train@" not in b["first_log"]
    assert not b["leftovers"], f"processes outlived the interrupted run: {b['leftovers']}"
    second = b["second"]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Restoring the run from the latest experiment state" in second.stdout + second.stderr, "resumed"
    assert _without_timing(_metrics(root)) == _without_timing(_metrics(projects["A"]))
    tracker = _tracker(root)
    runs = tracker.runs(EXP)
    trials = [r for r in runs if "ray_trial_id" in r.data.tags]
    assert len(trials) == 2 and len({r.data.tags["ray_trial_id"] for r in trials}) == 2, "no duplicate runs"
    assert all(r.info.status == "FINISHED" for r in trials)
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("stage") == "tune" and "ray_trial_id" not in r.data.tags}
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents.values())
    first = {r.data.tags["mlflow.parentRunId"] for r in trials}
    assert len(first) == 1, "the resumed trials stay under one parent run"
    (first,) = first
    (second_parent,) = set(parents) - {first}
    assert parents[first].data.tags["resumed_by"] == second_parent, "the interrupted attempt links its resumption"
    assert parents[second_parent].data.tags["resumed_search_parent"] == first


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("fault", ["truncated", "altered", "missing"])
def test_corrupt_prepared_data_stops_the_tune_stage_naming_the_file(projects, fault):
    """The stage's own view: `python -m pipelines.tune` checks the Parquet files against the manifest first."""
    root = projects["A"]
    path = root / "data" / "prepared" / "mixture" / "train.parquet"
    original = path.read_bytes()
    runs_before = len(_tracker(root).runs(EXP))
    try:
        if fault == "truncated":
            path.write_bytes(original[: len(original) // 2])
        elif fault == "altered":
            middle = len(original) // 2
            path.write_bytes(original[:middle] + bytes([original[middle] ^ 0xFF]) + original[middle + 1:])
        else:
            path.unlink()
        proc = run([sys.executable, "-m", "pipelines.tune", "--params", "params.yaml", "--experiment", EXP], root,
                   check=False, timeout=180)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert str(path) in proc.stderr and "re-run the prepare stage" in proc.stderr and "Traceback" not in proc.stderr
        expected = "is missing (listed in the manifest)" if fault == "missing" else "checksum mismatch for"
        assert expected in proc.stderr, proc.stderr
        assert len(_tracker(root).runs(EXP)) == runs_before, "no MLflow run started"
    finally:
        path.write_bytes(original)


@pytest.mark.integration
@pytest.mark.slow
def test_dvc_repro_rebuilds_corrupt_prepared_data_before_tune(projects):
    """DVC's view: the prepare stage's output changed, so `dvc repro tune@...` restores it first — from DVC's
    cache (the prepare out is cached), or by re-running prepare if the cache lacks it — and tune, whose
    dependencies are then unchanged, is skipped."""
    root = projects["A"]
    path = root / "data" / "prepared" / "mixture" / "train.parquet"
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    proc = run(["dvc", "repro", f"tune@{EXP}"], root)
    out = proc.stdout + proc.stderr
    assert "Stage 'prepare' is cached - skipping run, checking out outputs" in out, out
    assert f"Stage 'tune@{EXP}' didn't change, skipping" in out, out
    assert path.read_bytes() == original
    assert "Data and pipelines are up to date" in run(["dvc", "repro"], root).stdout


def _snapshot(root: Path) -> dict[str, bytes]:
    files = [root / "results" / "experiments" / EXP / "metrics.json", *sorted((root / "out" / "models").rglob("*.pt"))]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.mark.integration
@pytest.mark.slow
def test_bad_params_stop_dvc_repro_before_any_work_and_keep_results(projects):
    root = projects["C"]
    good = (root / "params.yaml").read_text()
    before, runs_before = _snapshot(root), len(_tracker(root).runs(EXP))
    ray_state = sorted(p.name for p in (root / "out" / "ray" / EXP).iterdir())
    assert len(before) == 5  # metrics.json and 2 variants x 2 seeds of models
    # the check stage runs first: a bad value, or an experiment naming a dataset `data` does not declare (DVC
    # alone stopped on the missing data/prepared/<name> with "No such file or directory")
    for key, value, expected in [
            ("deq.lam", 1.0, "error: invalid params.yaml:\n  deq.lam: Input should be greater than 1 (got 1.0)"),
            (f"experiments.{EXP}.dataset", "mnist",
             f"experiments.{EXP}.dataset 'mnist' is not prepared by the data section")]:
        try:
            _write(root / "params.yaml", _set(yaml.safe_load(good), key, value))
            proc = run(["dvc", "repro"], root, check=False)
        finally:
            (root / "params.yaml").write_text(good)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert expected in out and "No such file" not in out, out
        assert "failed to reproduce 'check'" in out and "exited with 2" in out and "Traceback" not in out
        assert _snapshot(root) == before, "metrics.json and the trained models are byte-identical"
        assert len(_tracker(root).runs(EXP)) == runs_before, "no MLflow run started"
        assert sorted(p.name for p in (root / "out" / "ray" / EXP).iterdir()) == ray_state, "no Ray search started"


@pytest.mark.integration
@pytest.mark.slow
def test_failed_evaluate_keeps_the_previous_metrics(projects):
    root = projects["C"]
    good = (root / "params.yaml").read_text()
    metrics = root / "results" / "experiments" / EXP / "metrics.json"
    before = metrics.read_bytes()
    try:
        _write(root / "params.yaml", _set(yaml.safe_load(good), "eval.is_samples", 50))
        proc = run(["dvc", "repro", "--single-item", f"evaluate@{EXP}"], root, check=False)
        kept = metrics.exists() and metrics.read_bytes() == before
    finally:
        (root / "params.yaml").write_text(good)
        if not metrics.exists():
            metrics.write_bytes(before)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "eval.is_samples: Input should be greater than or equal to 100 (got 50)" in out
    assert kept, "the failed evaluate stage left no metrics.json"
