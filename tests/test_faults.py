"""How a stage answers faults (pipelines.settings.main_guard): bad input → one line, exit 2; a broken or
unreachable service → one line, exit 3; SIGINT or SIGTERM → the interrupt path, exit 130; a bug in the code
keeps its traceback. Each case runs in its own Python process, as DVC runs a stage."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def guarded(body: str, **kw) -> subprocess.Popen:
    code = ("import sys, time\nfrom pipelines.settings import main_guard\n"
            f"def main():\n" + "".join(f"    {line}\n" for line in body.splitlines()) + "main_guard(main)\n")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_a_broken_store_is_one_line_and_exit_3():
    # what a truncated sqlite file gives (sqlite3 is a service module: no traceback)
    code, err = finish(guarded("import sqlite3\nraise sqlite3.DatabaseError('file is not a database')"))
    assert code == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "DatabaseError: file is not a database" in lines[0] and "DEQSM_TRACEBACK" in lines[0]


def test_service_error_keeps_its_message():
    code, err = finish(guarded("from pipelines import ServiceError\n"
                               "raise ServiceError('MLflow server at http://127.0.0.1:9 is not reachable: start it')"))
    assert code == 3 and err.strip() == "error: MLflow server at http://127.0.0.1:9 is not reachable: start it"


def test_a_bug_keeps_its_traceback():
    code, err = finish(guarded("raise RuntimeError('a bug')"))
    assert code == 1 and "Traceback" in err and "RuntimeError: a bug" in err


def test_traceback_on_request():
    proc = guarded("import sqlite3\nraise sqlite3.OperationalError('database is locked')",
                   env={**os.environ, "DEQSM_TRACEBACK": "1"})
    code, err = finish(proc)
    assert code == 1 and "Traceback" in err and "database is locked" in err


def test_sigterm_takes_the_interrupt_path():
    """`timeout`, Slurm and Kubernetes stop a job with SIGTERM: the stage handles it as Ctrl-C (a
    KeyboardInterrupt in the stage's code, so its runs end KILLED) and exits 130 without a traceback, also when
    it was started in the background with SIGINT ignored (as `cmd &` in a script does, and DVC then inherits)."""
    proc = guarded("try:\n    print('ready', flush=True)\n    time.sleep(60)\n"
                   "except KeyboardInterrupt:\n    print('cleanup ran', file=sys.stderr)\n    raise",
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 130 and time.monotonic() - t0 < 10
    assert "cleanup ran" in err and "interrupted" in err and "Traceback" not in err


def test_sigterm_inside_a_ray_session_still_takes_the_interrupt_path():
    """ray.init installs its own SIGTERM handler (exit at once): a tune stage stopped by SIGTERM then ended its
    runs as "SystemExit" failures and exited 255 under DVC. Inside the session SIGTERM is the interrupt again,
    and after it the handler the stage had is back."""
    proc = guarded(
        "import signal, types\nfrom pipelines.ray_session import ray_session\n"
        "tune = types.SimpleNamespace(address=None, num_cpus=1, num_gpus=0, connect_timeout=10)\n"
        "before = signal.getsignal(signal.SIGTERM)\n"
        "try:\n"
        "    with ray_session(types.SimpleNamespace(tune=tune)):\n"
        "        print('ready', flush=True)\n        time.sleep(120)\n"
        "except KeyboardInterrupt:\n"
        "    print('cleanup ran; handler restored:', signal.getsignal(signal.SIGTERM) is before, file=sys.stderr)\n"
        "    raise", env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc, timeout=120)
    assert code == 130, err[-2000:]
    assert "cleanup ran; handler restored: True" in err and "Traceback" not in err
    assert time.monotonic() - t0 < 60


def test_check_names_an_undeclared_dataset_in_one_line_without_dumping_params(tmp_path):
    """DVC would stop on the missing data/prepared/<name> before a stage runs: the pipeline's check stage runs
    this first (tests/test_reliability.py runs it through `dvc repro`)."""
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["experiments"]["nice-digits"]["dataset"] = "mnist"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "pipelines.check", "--params", str(tmp_path / "params.yaml")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "experiments.nice-digits.dataset 'mnist' is not prepared by the data section" in proc.stderr
    assert "declare it under data.datasets" in proc.stderr
    assert len(proc.stderr) < 600, "the message names the key; it does not dump params.yaml"


# --- the MLflow store: fail fast, stale runs, a missing training run ------------------------------------------

def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the socket is: nothing listens there


def test_a_server_that_is_down_fails_fast_naming_it():
    from pipelines import ServiceError
    from pipelines.tracking import check_store

    uri = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    try:
        check_store(uri, timeout=5)
    except ServiceError as err:
        msg = str(err)
    else:
        raise AssertionError("no error for a server that is down")
    assert time.monotonic() - t0 < 6
    assert uri in msg and "not reachable" in msg and "mlflow server --host 127.0.0.1" in msg and "\n" not in msg


def test_a_truncated_or_locked_sqlite_store_is_one_clear_error(tmp_path):
    import sqlite3

    from pipelines import ServiceError
    from pipelines.tracking import Tracker, check_store

    good = tmp_path / "mlflow.db"
    Tracker(f"sqlite:///{good}").experiment_id("e")  # a real store
    broken = tmp_path / "broken.db"
    broken.write_bytes(good.read_bytes()[:1000])  # truncated mid-header page: not a database any more
    try:
        check_store(f"sqlite:///{broken}", timeout=1)
        raise AssertionError("no error for a truncated store")
    except ServiceError as err:
        assert str(broken) in str(err) and "not a usable SQLite database" in str(err)
    holder = sqlite3.connect(str(good))
    holder.execute("BEGIN EXCLUSIVE")  # another process mid-write
    try:
        t0 = time.monotonic()
        try:
            check_store(f"sqlite:///{good}", timeout=2)
            raise AssertionError("no error for a locked store")
        except ServiceError as err:
            assert "is locked by another process" in str(err) and str(good) in str(err)
        # one wait of tracking.timeout in all (the read and the write lock each waited it in full: 2x)
        assert time.monotonic() - t0 < 1.6 * 2
    finally:
        holder.rollback()
        holder.close()
    check_store(f"sqlite:///{good}", timeout=1)  # released: fine


def test_a_stage_with_its_store_down_exits_3_in_one_line_before_any_work(tmp_path):
    """The train stage with tracking.uri at a server that is down: one line naming it, exit 3, within
    tracking.timeout (was: 251 s of retries, then a 115-line traceback)."""
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tracking"] = {"uri": f"http://127.0.0.1:{_closed_port()}", "timeout": 5}
    raw["base"]["out"] = str(tmp_path / "out")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipelines.train", "--params", str(tmp_path / "params.yaml"),
                           "--experiment", "dkef-mixture"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "MLflow tracking server at http://127.0.0.1:" in proc.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "out" / "models").exists(), "nothing was written"


def test_runs_of_a_killed_process_end_killed_and_live_ones_stay(tmp_path):
    """SIGKILL leaves an MLflow run RUNNING; the next stage's Tracker.open ends it KILLED with a reason. A run of
    a process that still lives (this one) is left alone; a FINISHED run sheds an earlier failure_reason."""
    from pipelines.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pipelines.tracking import Tracker\n"
        f"t = Tracker({uri!r})\nprint(t.start_run('exp', 'doomed'), flush=True)\ntime.sleep(120)\n")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    doomed = child.stdout.readline().strip()
    child.kill()
    child.wait(timeout=30)
    tracker = Tracker(uri)
    alive = tracker.start_run("exp", "alive")
    assert tracker.client.get_run(doomed).info.status == "RUNNING"
    Tracker.open(uri, ["exp"], timeout=5)
    run = tracker.client.get_run(doomed)
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"].startswith("stale: its process")
    assert tracker.client.get_run(alive).info.status == "RUNNING"
    # a pid reused by another process since (here: this live one) does not keep a dead process's run RUNNING
    reused = tracker.start_run("exp", "reused-pid")
    tracker.set_tags(reused, {"deqsm.pid_started": "1"})  # this pid, but a process that started at boot
    Tracker.open(uri, ["exp"], timeout=5)
    assert tracker.client.get_run(reused).info.status == "KILLED"
    assert tracker.client.get_run(alive).info.status == "RUNNING"
    tracker.end_run(alive, "KILLED", failure_reason="interrupted")
    tracker.end_run(alive, "FINISHED")  # resumed and finished: the old reason no longer holds
    assert "failure_reason" not in tracker.client.get_run(alive).data.tags


def test_evaluate_logs_to_a_new_run_when_the_store_lacks_the_training_run(tmp_path):
    """A model trained against another store (deleted, or tracking.uri changed): evaluate still logs, to a new
    run that names the missing one (was: "Run with id=... not found")."""
    from pipelines.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id, new = tracker.run_or_new("0123456789abcdef0123456789abcdef", "exp", "deq-evaluate", {"stage": "evaluate"})
    assert new and tracker.client.get_run(run_id).data.tags["missing_run_id"] == "0123456789abcdef0123456789abcdef"
    again, new = tracker.run_or_new(run_id, "exp", "deq-evaluate", {})
    assert again == run_id and not new
