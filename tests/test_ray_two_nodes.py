"""A real 2-node Ray cluster on 127.0.0.1: `ray start --head`, then a second `ray start --address=...` with
its own resources; a tiny search through pipelines.ray_search lands trials on both nodes. Each node is
started with --block in its own process group and ended by that group's PID (never `ray stop`, which would
end every Ray process on the machine)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline_project import env, free_port, stop_group, tiny_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    ray_bin = Path(sys.executable).with_name("ray")
    return subprocess.Popen([str(ray_bin), "start", "--block", "--disable-usage-stats", *args],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env(), start_new_session=True)


@pytest.fixture
def two_node_cluster(tmp_path):
    import ray

    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    head = _start(["--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1", "--num-gpus=0",
                   "--include-dashboard=false", "--resources={\"head\": 1}", f"--temp-dir={temp_dir}"],
                  tmp_path / "head.log")
    worker = None
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.time() + 120
        worker_started = False
        while time.time() < deadline:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            if not worker_started and "Ray runtime started" in (tmp_path / "head.log").read_text():
                worker = _start([f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                                 "--num-gpus=0", "--resources={\"worker\": 1}"], tmp_path / "worker.log")
                worker_started = True
            if worker_started:
                ray.init(address=address, log_to_driver=False)
                try:
                    alive = [n for n in ray.nodes() if n["Alive"]]
                finally:
                    ray.shutdown()
                if len(alive) == 2:
                    break
            time.sleep(2)
        else:
            raise AssertionError("the second node did not join:\n" + (tmp_path / "worker.log").read_text()[-3000:])
        yield address
    finally:
        if worker is not None:
            stop_group(worker)
        stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_trials_land_on_both_nodes(two_node_cluster, tmp_path):
    import ray

    from pipelines.ray_search import run_search
    from pipelines.ray_session import ray_session
    from pipelines.settings import Settings
    from pipelines.trials import trial_config
    from pipelines.tracking import Tracker
    from deqsm.data import load_splits, prepare_datasets

    # fifo: every trial runs to its summary report, which names its node (a trial ASHA stops early has none)
    params = tiny_params(**{"tune.address": two_node_cluster, "tune.cpus_per_trial": 1, "tune.steps": 20,
                            "tune.scheduler": "fifo",
                            "tune.search_space": {"train.lr": {"grid": [1.0e-3, 2.0e-3, 3.0e-3]}}})
    settings = Settings.model_validate(params)
    settings._root = tmp_path
    prepare_datasets(settings.data, tmp_path, ["mixture"])
    splits = {k: v for k, v in load_splits(tmp_path / settings.data.root, "mixture").items() if k != "test"}
    base = {v: trial_config(settings, "dkef-mixture", v) for v in settings.experiments["dkef-mixture"].variants}
    for cfg in base.values():
        cfg["train"]["steps"] = settings.tune.steps
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    parent = tracker.start_run("dkef-mixture", "tune", {}, {"stage": "tune"})
    with ray_session(settings) as resources:
        assert resources.get("head") == 1 and resources.get("worker") == 1, resources
        outcome = run_search(settings, "dkef-mixture", base, splits, tracker, parent, tmp_path / "ray-results")
    assert not ray.is_initialized(), "the session disconnects the driver"
    assert outcome.n_trials == 6 and not outcome.failed
    results = [r for r in tracker.runs("dkef-mixture") if "ray_trial_id" in r.data.tags]
    assert len(results) == 6 and all(r.info.status == "FINISHED" for r in results)
    grid_nodes = {json.loads((d / "result.json").read_text().strip().splitlines()[-1])["node_id"]
                  for d in (tmp_path / "ray-results" / "dkef-mixture").glob("_trainable_*")}
    assert len(grid_nodes) == 2, f"trials ran on {len(grid_nodes)} node(s): {grid_nodes}"
