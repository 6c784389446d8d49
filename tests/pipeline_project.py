"""A throw-away copy of this project in its own git + DVC repo, with tiny params, for end-to-end tests."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_params(**changes: Any) -> dict:
    """params.yaml's structure, sized to run in about a minute on 2 cores (two experiments, deq vs explicit)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["datasets"] = {
        "digits": raw["data"]["datasets"]["digits"],
        "mixture": {"shape": "rings", "std": 0.1, "n_train": 400, "n_val": 100, "n_test": 100},
    }
    raw["deq"].update(max_iter=20, tol=1e-3)
    raw["train"].update(steps=12, batch_size=32, eval_every=6, eval_batches=1, progress=False, seeds=2)
    raw["experiments"] = {
        "dkef-mixture": {"dataset": "mixture", "model": "dkef", "width": 8,
                         "model_options": {"n_inducing": 8, "alpha_eval_rows": 100}, "loss": {"name": "ssm"},
                         "variants": {"deq": {"variant": "deq"}, "explicit-2": {"variant": "explicit", "depth": 2}},
                         "eval_options": {"is_batch_size": 2000}},
        # bits/dim: the pixel levels and logit α come from the prepared digits' manifest
        "nice-digits": {"dataset": "digits", "model": "nice", "width": 16, "model_options": {"n_couplings": 2},
                        "loss": {"name": "ssm"},
                        "variants": {"deq": {"variant": "deq"}, "explicit-2": {"variant": "explicit", "depth": 2}}},
    }
    raw["tune"].update(steps=6, num_cpus=2, max_concurrent=2,
                       search_space={"train.lr": {"grid": [1.0e-3, 3.0e-3]}})
    raw["eval"].update(is_samples=2000, batch_size=200)
    for key, value in changes.items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return raw


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float = 60) -> None:
    """End a server we started with ``start_new_session=True`` and everything it spawned: SIGTERM to its
    process group, SIGKILL if it outlives ``timeout``."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def env() -> dict[str, str]:
    """The test's own interpreter first on PATH (DVC stages run `python -m pipelines.<stage>`)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


_DRIVER = """import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("task result:", ray.get(ray.remote(lambda: 6 * 7).remote(), timeout=60), flush=True)
"""


def ray_driver(address: str, home: Path, **auth: str | None) -> subprocess.Popen:
    """A Ray driver in its own process that joins ``address`` and runs one task (printing ``task result: 42``).
    Its Ray auth settings are exactly ``auth`` (RAY_AUTH_MODE / RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH; None or
    absent: unset), and HOME is ``home``, so no default token file (~/.ray/auth_token) is found by accident."""
    environ = {k: v for k, v in env().items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    environ.update({k: v for k, v in auth.items() if v is not None}, HOME=str(home))
    return subprocess.Popen([sys.executable, "-c", _DRIVER, address], env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(cmd: list[str], cwd: Path, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def make_project(dest: Path, params: dict) -> Path:
    """Copy the project's files (tracked and new, not ignored) into ``dest``, write ``params``, and make it
    a git repo with DVC initialised and one commit."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        # a fresh project: no tests, no lock, no results of this checkout's own runs (committed ones included)
        if src.is_file() and not rel.startswith(("tests/", "results/")) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    if not (dest / ".dvc" / "config").exists():
        run(["dvc", "init", "-q"], dest)
    run(["dvc", "config", "--local", "core.site_cache_dir", str(dest / ".dvc" / "site-cache")], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "project"], dest)
    return dest
