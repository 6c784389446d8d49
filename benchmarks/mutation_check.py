"""Mutation check of the numerical core: apply one deliberate one-line bug at a time and run the tests that
should catch it; print one JSON line per mutation (and a summary line).

Each mutation is applied to one private copy of the project (``deqsm/``, ``pipelines/``, ``tests/`` and the
config files, in a temporary directory; the file is restored after each mutation), never to the working tree,
and the copy is imported in place of the installed package (``PYTHONPATH``); the script checks that it is. A row
is ``caught`` when its tests fail with the bug and pass without it (the unmutated copy is run with the same tests
first, once per set of tests).

    python benchmarks/mutation_check.py                 # the whole table (issue 15's bugs)
    python benchmarks/mutation_check.py --only phantom  # the rows whose name contains "phantom"
    python benchmarks/mutation_check.py --file deqsm/solvers.py --old 'a' --new 'b' --tests tests/test_solvers.py

Exit status 1 when a mutation survives (its tests still pass) or a baseline run fails.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("deqsm", "pipelines", "benchmarks", "profiles", "tests", "pyproject.toml", "params.yaml", "dvc.yaml",
          "ray_cluster.yaml")


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str  # must occur exactly once in ``file``
    new: str
    tests: tuple[str, ...]  # pytest node ids or files that should fail with the bug


MUTATIONS: tuple[Mutation, ...] = (
    Mutation("phantom takes K+1 steps", "deqsm/deq.py",
             "    for _ in range(deq.k):\n        fz = deq.cell(z, x)",
             "    for _ in range(deq.k + 1):\n        fz = deq.cell(z, x)",
             ("tests/test_deq.py",)),
    Mutation("phantom damping weights swapped", "deqsm/deq.py",
             "(1.0 - deq.tau) * z + deq.tau * fz", "(1.0 - deq.tau) * fz + deq.tau * z",
             ("tests/test_deq.py",)),
    Mutation("anderson always takes the plain step", "deqsm/solvers.py",
             "alpha = torch.where(ok.view(-1, 1), alpha, plain)", "alpha = plain",
             ("tests/test_solvers.py",)),
    Mutation("anderson beta-mixing uses F instead of X", "deqsm/solvers.py",
             "(1.0 - beta) * (alpha.unsqueeze(1) @ X)", "(1.0 - beta) * (alpha.unsqueeze(1) @ F)",
             ("tests/test_solvers.py",)),
    Mutation("anderson memory window off by one", "deqsm/solvers.py",
             "if len(xs) > memory:", "if len(xs) > memory + 1:",
             ("tests/test_solvers.py",)),
    Mutation("broyden memory: one update more before the reset", "deqsm/solvers.py",
             "tr.abs_trace[-1] > restart_factor * best or len(us) >= memory",
             "tr.abs_trace[-1] > restart_factor * best or len(us) > memory",
             ("tests/test_solvers.py",)),
    Mutation("broyden restart_factor doubled", "deqsm/solvers.py",
             "tr.abs_trace[-1] > restart_factor * best or len(us) >= memory",
             "tr.abs_trace[-1] > 2 * restart_factor * best or len(us) >= memory",
             ("tests/test_solvers.py",)),
    Mutation("picard damping weights swapped", "deqsm/solvers.py",
             "(1.0 - damping) * z + damping * fz", "(1.0 - damping) * fz + damping * z",
             ("tests/test_solvers.py",)),
    Mutation("importance-sampled log Z: se divided by 3", "deqsm/metrics/density.py",
             "se=math.sqrt(rel_var / (n_samples - 1)),", "se=math.sqrt(rel_var / (n_samples - 1)) / 3,",
             ("tests/test_density_metrics.py", "tests/test_importance.py")),
    Mutation("fisher divergence: the 1/2 dropped", "deqsm/metrics/density.py",
             "total += 0.5 * float(diff.pow(2).sum())", "total += float(diff.pow(2).sum())",
             ("tests/test_density_metrics.py",)),
    Mutation("fisher divergence: sign flipped", "deqsm/metrics/density.py",
             "s_model = -torch.autograd.grad(energy_fn(xb).sum(), xb)[0]",
             "s_model = torch.autograd.grad(energy_fn(xb).sum(), xb)[0]",
             ("tests/test_density_metrics.py",)),
    Mutation("density test_loglik: log Z added instead of subtracted", "deqsm/models/density.py",
             "test_loglik=mean_log_p - log_z.log_z", "test_loglik=mean_log_p + log_z.log_z",
             ("tests/test_experiments.py::test_run_dkef_returns_the_pipeline_metrics",)),
    Mutation("vae elbo: the entropy subtracted", "deqsm/metrics/elbo.py",
             'keep("elbo", recon + prior + entropy)', 'keep("elbo", recon + prior - entropy)',
             ("tests/test_generative.py::test_vae_and_ncsn_evaluate_with_their_own_metrics_and_samples",)),
    Mutation("frechet distance halved", "deqsm/metrics/fid.py",
             "return max(float(metric.compute()), 0.0)", "return max(float(metric.compute()) / 2, 0.0)",
             ("tests/test_generative.py::test_vae_and_ncsn_evaluate_with_their_own_metrics_and_samples",)),
    Mutation("ssm and ssm-vr norm terms swapped", "deqsm/losses.py",
             "norm = 0.5 * (_per_sample_sum(s**2) if variance_reduced else sv**2)",
             "norm = 0.5 * (sv**2 if variance_reduced else _per_sample_sum(s**2))",
             ("tests/test_losses.py",)),
    Mutation("curvature propagation p^2 - q^2 -> p^2 + q^2", "deqsm/losses.py",
             "diag = diag + (p**2 - q**2) / n_particles", "diag = diag + (p**2 + q**2) / n_particles",
             ("tests/test_losses.py", "tests/test_nice.py", "tests/test_dkef.py")),
)


def _copy_project(dst: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dst / name)


def _environment(copy: Path) -> dict[str, str]:
    """The environment that imports the copy's packages; checked once, before any test runs."""
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    probe = subprocess.run([sys.executable, "-c", "import deqsm; print(deqsm.__file__)"], cwd=copy, env=env,
                           capture_output=True, text=True, check=True)
    if not Path(probe.stdout.strip()).resolve().is_relative_to(copy.resolve()):
        raise RuntimeError(f"the copy's deqsm is not the one imported ({probe.stdout.strip()}): check PYTHONPATH")
    return env


def _run_tests(copy: Path, env: dict[str, str], tests: tuple[str, ...], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not integration", "-o", "addopts=",
           *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rc": None, "seconds": round(time.perf_counter() - t0, 1), "failed": [], "summary": "timeout"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    failed = [ln.split(" ", 1)[1].split(" - ")[0] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1), "failed": failed,
            "summary": lines[-1] if lines else proc.stderr.strip()[-300:]}


def check(m: Mutation, copy: Path, env: dict[str, str], baselines: dict, timeout: float) -> dict:
    """Run ``m``'s tests on the unmutated copy (once per set of tests: ``baselines`` keeps the result), then with
    the bug in place; the file is restored afterwards, so the copy serves the next mutation."""
    path = copy / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        raise SystemExit(f"mutation {m.name!r}: expected one occurrence of its text in {m.file}, "
                         f"found {text.count(m.old)} (the code moved: update the table)")
    if m.tests not in baselines:
        baselines[m.tests] = _run_tests(copy, env, m.tests, timeout)
    baseline = baselines[m.tests]
    try:
        path.write_text(text.replace(m.old, m.new))
        mutated = _run_tests(copy, env, m.tests, timeout)
    finally:
        path.write_text(text)
    caught = baseline["rc"] == 0 and mutated["rc"] not in (0, None)
    return {"mutation": m.name, "file": m.file, "tests": list(m.tests), "caught": caught,
            "baseline": baseline["summary"], "baseline_seconds": baseline["seconds"],
            "mutated": mutated["summary"], "mutated_seconds": mutated["seconds"], "failed_tests": mutated["failed"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run the table's rows whose name contains this text")
    ap.add_argument("--file", help="an ad-hoc mutation: the file (relative to the project root) ...")
    ap.add_argument("--old", help="... the text to replace (must occur exactly once) ...")
    ap.add_argument("--new", help="... its replacement ...")
    ap.add_argument("--tests", nargs="+", help="... and the tests that should catch it")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run (default 900)")
    ap.add_argument("--list", action="store_true", help="list the table's mutations and exit")
    args = ap.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(json.dumps({"mutation": m.name, "file": m.file, "tests": list(m.tests)}))
        return 0
    if args.file or args.old or args.new or args.tests:
        if not (args.file and args.old is not None and args.new is not None and args.tests):
            ap.error("an ad-hoc mutation needs --file, --old, --new and --tests")
        rows = [Mutation("ad hoc", args.file, args.old, args.new, tuple(args.tests))]
    else:
        rows = [m for m in MUTATIONS if args.only in m.name]
        if not rows:
            ap.error(f"no mutation's name contains {args.only!r} (see --list)")
    results: list[dict] = []
    baselines: dict[tuple[str, ...], dict] = {}
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        copy = Path(tmp)
        _copy_project(copy)
        env = _environment(copy)
        for m in rows:
            results.append(check(m, copy, env, baselines, args.timeout))
            print(json.dumps(results[-1]), flush=True)
    survived = [r["mutation"] for r in results if not r["caught"]]
    print(json.dumps({"summary": {"mutations": len(results), "caught": len(results) - len(survived),
                                  "survived": survived}}), flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
