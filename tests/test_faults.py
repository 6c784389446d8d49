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
    assert code == 3 and err.strip() == ("error: MLflow server at http://127.0.0.1:9 is not reachable: start it "
                                         "(set DEQSM_TRACEBACK=1 for the traceback)")


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
    KeyboardInterrupt in the stage's code, so its runs end KILLED) and exits 130 without a traceback."""
    proc = guarded("try:\n    print('ready', flush=True)\n    time.sleep(60)\n"
                   "except KeyboardInterrupt:\n    print('cleanup ran', file=sys.stderr)\n    raise")
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 130 and time.monotonic() - t0 < 10
    assert "cleanup ran" in err and "interrupted" in err and "Traceback" not in err


def test_check_names_an_undeclared_dataset_in_one_line_without_dumping_params(tmp_path):
    """DVC stops on the missing data/prepared/<name> before a stage runs; `make repro` runs this check first."""
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
