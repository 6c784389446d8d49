"""Token authentication on a Ray head started the way ray_cluster.yaml starts its nodes (`RAY_AUTH_MODE=token
RAY_AUTH_TOKEN_PATH=<file> ray start --head ...`), on 127.0.0.1 with its own token: a client without the token or
with another one cannot connect, let alone run a task; the right token runs one. ray_session joins with the token
file, and the tune stage given a wrong token exits 3 with one error line. The head runs with --block in its own
process group and is ended by its PID and that group's (never `ray stop`, which would end every Ray on the machine)."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from pipeline_project import ROOT, env, free_port, ray_driver, tiny_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """(address, token file) of a one-CPU head with token authentication; its token is in the file only."""
    home = tmp_path_factory.mktemp("head")
    token_file = home / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    environ = {k: v for k, v in env().items() if k != "RAY_AUTH_TOKEN"}
    environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), HOME=str(home))
    log = home / "head.log"
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--block", "--head",
                             "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1", "--num-gpus=0",
                             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=environ, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        yield f"127.0.0.1:{port}", token_file
    finally:
        # SIGTERM to `ray start --block` alone stops its node in ~2 s (to the whole group: ~30 s, the node then
        # waits for its GCS to drain); whatever of the group outlives it is killed.
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(300)
def test_only_a_client_with_the_token_runs_tasks(token_head, tmp_path):
    address, token_file = token_head
    token = token_file.read_text()
    t0 = time.monotonic()
    drivers = {"no token": ray_driver(address, tmp_path),
               "token mode, no token": ray_driver(address, tmp_path, RAY_AUTH_MODE="token"),
               "wrong token": ray_driver(address, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token[::-1]),
               "right token": ray_driver(address, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)}
    out = {name: proc.communicate(timeout=180)[0] for name, proc in drivers.items()}
    assert drivers["right token"].returncode == 0 and "task result: 42" in out["right token"], out["right token"]
    for name in ("no token", "token mode, no token", "wrong token"):
        assert drivers[name].returncode != 0 and "task result" not in out[name], f"{name}:\n{out[name][-3000:]}"
    assert "InvalidAuthToken" in out["wrong token"] and "Failed to connect to Ray cluster" in out["wrong token"]
    assert "Failed to connect to Ray cluster" in out["no token"], out["no token"][-3000:]
    assert "no authentication token was found" in out["token mode, no token"], out["token mode, no token"][-3000:]
    assert time.monotonic() - t0 < 120, "every refusal is bounded (Ray gives up after ~20 s)"


@pytest.mark.timeout(120)
def test_ray_session_joins_with_the_token_file(token_head, monkeypatch):
    """Ray's own token sources work for ray_session: here RAY_AUTH_TOKEN_PATH (no RAY_AUTH_TOKEN)."""
    import ray

    from pipelines.ray_session import ray_session
    from pipelines.settings import Settings

    address, token_file = token_head
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    settings = Settings.model_validate(tiny_params(**{"tune.address": address}))
    with ray_session(settings) as resources:
        assert resources.get("CPU") == 1, resources
        assert ray.get(ray.remote(lambda: 6 * 7).remote(), timeout=60) == 42
    assert not ray.is_initialized() and "RAY_AUTH_TOKEN" not in os.environ


@pytest.mark.timeout(300)
def test_tune_stage_with_a_wrong_token_exits_3_with_one_error_line(token_head, tmp_path):
    from deqsm.data import prepare_datasets
    from deqsm.data.settings import DataSettings

    address, _ = token_head
    raw = tiny_params(**{"tune.address": address})
    raw["experiments"] = {"dkef-mixture": raw["experiments"]["dkef-mixture"]}
    raw["data"]["datasets"] = {"mixture": raw["data"]["datasets"]["mixture"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    prepare_datasets(DataSettings.model_validate(raw["data"]), base=tmp_path, names=["mixture"])
    proc = subprocess.run([sys.executable, "-m", "pipelines.tune", "--params", str(tmp_path / "params.yaml")],
                          cwd=ROOT, env={**env(), "RAY_AUTH_TOKEN": secrets.token_hex(32)}, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and sum(ln.startswith("error:") for ln in lines) == 1, proc.stderr[-3000:]
    assert lines[-1].startswith(f"error: could not join the Ray cluster at {address} (tune.address): Failed to "
                                "connect to Ray cluster at "), lines[-1]
    assert lines[-1].endswith("set RAY_AUTH_TOKEN to the one its nodes were started with (`ray get-auth-token` on "
                              "the head node prints it)"), lines[-1]
