"""pipelines.workers: the train and evaluate stages' (variant, seed) jobs in spawned processes — the results of
every job come back, a failure or an interrupt ends the other workers at once instead of after their jobs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import workers
from pipelines.workers import run_jobs, start_workers, worker_count
from worker_jobs import sleep_or_fail, square, torch_threads

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_worker_count_follows_the_setting_the_cpus_and_the_jobs():
    assert worker_count(3, 1, 10) == 3 and worker_count(3, 1, 2) == 2 and worker_count(None, 1, 1) == 1
    cpus = len(os.sched_getaffinity(0))
    assert worker_count(None, 1, 100) == cpus and worker_count(None, cpus, 100) == 1


def test_every_job_comes_back_from_two_processes():
    out = dict(run_jobs(square, [1, 2, 3, 4, 5], workers=2, progress=False, desc="t"))
    assert {k: v[0] for k, v in out.items()} == {1: 1, 2: 4, 3: 9, 4: 16, 5: 25}
    pids = {v[1] for v in out.values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    inline = dict(run_jobs(square, [1, 2], workers=1, progress=False, desc="t"))
    assert {v[1] for v in inline.values()} == {os.getpid()}


def test_workers_started_ahead_run_the_jobs_and_others_are_ended():
    """start_workers spawns the processes (each importing the models) before the jobs exist; run_jobs with the
    same worker count and threads runs its jobs in exactly those, and ends a pool started for another count."""
    start_workers(2, threads=1)
    started = workers._STARTED[2, 1]
    pids = set(started._processes)  # spawned at start_workers, not at the first job
    assert len(pids) == 2 and os.getpid() not in pids
    start_workers(3, threads=1)  # started for a count the stage does not use
    unused = set(workers._STARTED[3, 1]._processes)
    out = dict(run_jobs(square, [1, 2, 3, 4], workers=2, progress=False, desc="t", threads=1))
    assert {k: v[0] for k, v in out.items()} == {1: 1, 2: 4, 3: 9, 4: 16}
    assert {v[1] for v in out.values()} <= pids
    assert workers._STARTED == {}
    deadline = time.time() + 30
    while any(_alive(p) for p in pids | unused) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids | unused), "every started worker ends with its pool"


def test_workers_run_with_base_threads():
    """Each worker gets base.threads torch threads (a spawned process would otherwise take one per core)."""
    assert {n for _, n in run_jobs(torch_threads, [0, 1, 2], workers=2, progress=False, desc="t", threads=1)} == {1}
    assert {n for _, n in run_jobs(torch_threads, [0, 1], workers=2, progress=False, desc="t", threads=3)} == {3}


def test_a_failed_job_raises_here_and_ends_the_other_worker(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="job failed on purpose"):
        list(run_jobs(sleep_or_fail, [("sleep", str(tmp_path)), ("fail", "")], workers=2, progress=False, desc="t"))
    assert time.monotonic() - t0 < 30, "the sleeping job (60 s) was not waited for"
    [pid] = [int(p.name) for p in tmp_path.iterdir()]
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid)


def test_sigterm_ends_the_stage_and_its_workers(tmp_path):
    """As `timeout` or Slurm stop a stage: exit 130 through main_guard, the workers gone within seconds."""
    code = ("import sys\nsys.path.insert(0, 'tests')\nfrom pipelines.settings import main_guard\n"
            "from pipelines.workers import run_jobs\nfrom worker_jobs import sleep_or_fail\n"
            f"jobs = [('sleep', {str(tmp_path)!r})] * 2\n"
            "def main():\n    list(run_jobs(sleep_or_fail, jobs, workers=2, progress=False, desc='t'))\n"
            "if __name__ == '__main__':\n    main_guard(main)\n")
    script = tmp_path / "stage.py"
    script.write_text(code)
    pids = tmp_path / "pids"
    pids.mkdir()
    code = code.replace(repr(str(tmp_path)), repr(str(pids)))
    script.write_text(code)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = [int(p.name) for p in pids.iterdir()]
    assert len(workers) == 2, "the workers did not start"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - t0 < 20, err
    assert "interrupted" in err and "Traceback" not in err
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers), "a worker outlived its stage"
