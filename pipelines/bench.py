"""DVC stage `bench`: the memory-vs-depth benchmark behind the report's memory figures.

Runs ``benchmarks/memory_depth.py`` (one SSM training step of an energy MLP of explicit depth L against one
DEQ layer over several solver iterations and backward modes) at the size of params.yaml's ``bench``
section, and writes its rows to ``<results>/benchmarks/memory_depth.jsonl``, one JSON object a line. The
default size takes seconds on 2 CPU cores; ``dvc exp run -S bench.in_dim=784 -S bench.width=1000
-S bench.batch=128 -S bench.device=cuda`` measures the paper's size on a GPU.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from pipelines.artifacts import Artifacts, memory_bench_rows, write_atomic
from pipelines.settings import ROOT, ParamsError, load_params, main_guard

SCRIPT = "benchmarks/memory_depth.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p.parse_args(argv)


def run_benchmark(args: list[str], timeout: float) -> list[dict]:
    cmd = [sys.executable, str(ROOT / SCRIPT), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ParamsError(f"the memory benchmark ({' '.join(cmd)}) took over {timeout:.0f} s: lower the bench "
                          "section's sizes or raise bench.timeout") from None
    if done.returncode != 0:
        raise ValueError(f"the memory benchmark failed (exit {done.returncode}): {' '.join(cmd)}\n"
                         f"{done.stderr.strip()[-2000:]}")
    return memory_bench_rows(done.stdout.splitlines(), f"{SCRIPT} output")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = load_params(args.params)
    settings.base.apply_threads()
    out = Artifacts.of(settings).memory_bench
    script_args = settings.bench.script_args()
    print(f"bench: {SCRIPT} {' '.join(script_args)}", flush=True)
    t0 = time.perf_counter()
    rows = run_benchmark(script_args, settings.bench.timeout)
    write_atomic(out, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    print(f"bench: {len(rows)} rows in {time.perf_counter() - t0:.1f} s → {out}", flush=True)


if __name__ == "__main__":
    main_guard(main)
