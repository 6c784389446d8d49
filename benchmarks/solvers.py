#!/usr/bin/env python
"""Forward-solver comparison: iterations and time to reach tol for every registered solver, on a
weakly contractive DEQ cell (symmetric PSD W, spectral normalisation with λ near 1, Softplus in its
near-linear regime, so the contraction factor is close to 1)
and a strongly contractive one (the paper's Frobenius normalisation, λ = 2).

One JSON object per line (cell, solver, nstep, time_ms, converged, abs_residual_max, device), then a
{"summary": ...} line with each cell's Anderson/Picard and Broyden/Picard iteration ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from deqsm.deq import SoftplusCell  # noqa: E402
from deqsm.solvers import SOLVERS, solve  # noqa: E402

CELLS = {
    # name: (normalisation, λ, injection offset): a positive offset puts Softplus where its slope is ≈ 1
    "weak": ("spectral", 1.02, 6.0),
    "strong": ("frobenius", 2.0, 0.0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--stop-mode", default="rel", choices=["abs", "rel"],
                   help="rel (default): ‖f(z) − z‖/‖f(z)‖ — an absolute 1e-5 on a wide float32 state is "
                        "at the edge of float32 precision")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    rows = []
    for cell_name, (norm, lam, offset) in CELLS.items():
        torch.manual_seed(args.seed)
        cell = SoftplusCell(args.width, lam=lam, norm=norm).to(device)
        if cell_name == "weak":
            # W = A Aᵀ: real, non-negative eigenvalues up to 1/λ after normalisation, so the Jacobian's
            # spectrum reaches close to 1 (a random W's eigenvalues sit well inside its norm's circle).
            a = torch.randn(args.width, args.width, device=device) / args.width**0.5
            with torch.no_grad():
                cell.linear.weight.copy_(a @ a.t())
        inj = (torch.randn(args.batch, args.width, device=device) + offset)
        f = lambda z: cell(z, inj)  # noqa: E731
        for method in SOLVERS.names():
            times = []
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.no_grad():
                    _, stats = solve(f, torch.zeros_like(inj), method=method, tol=args.tol, max_iter=args.max_iter,
                                     stop_mode=args.stop_mode)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            rows.append({
                "cell": cell_name, "normalisation": norm, "lam": lam, "solver": method, "nstep": stats.nstep,
                "time_ms": 1000 * statistics.median(times), "converged": stats.converged,
                "abs_residual_max": stats.abs_residual_max,
                "rel_residual_max": stats.rel_residual_max, "tol": args.tol, "stop_mode": args.stop_mode,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            })
            print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for cell_name in CELLS:
        steps = {r["solver"]: r["nstep"] for r in rows if r["cell"] == cell_name}
        for method in ("anderson", "broyden"):
            summary[f"{cell_name}_{method}_over_picard_iters"] = steps[method] / steps["picard"]
    print(json.dumps({"summary": summary}), flush=True)
    return rows


if __name__ == "__main__":
    main()
