#!/usr/bin/env python
"""Memory and time of one SSM training step: explicit energy nets of depth 1…32 vs one DEQ layer.

One JSON object per line (variant, solver_iters, peak_bytes, memory_kind, step_ms, nstep, device, ...),
then a final {"summary": ...} line with the ratios the project tracks:
  - DEQ peak memory flat (±3%) over solver iterations (phantom and implicit);
  - explicit-16 / DEQ-phantom ≥ 4.5 and explicit-32 / DEQ-phantom ≥ 9;
  - DEQ-phantom step time / explicit-16 step time (≤ 0.4 on GPU).
Runs on CPU (memory = bytes autograd saves for backward) or CUDA (memory = max_memory_allocated).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from deqsm.losses import get_loss  # noqa: E402
from deqsm.metrics.memory import measure_step  # noqa: E402
from deqsm.models.energy_mlp import DEQEnergyMLP, ExplicitEnergyMLP  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--in-dim", type=int, default=784)
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--iters", type=int, nargs="+", default=[10, 30, 100], help="DEQ solver iterations")
    p.add_argument("--backwards", nargs="+", default=["phantom", "implicit", "unroll"])
    p.add_argument("--repeats", type=int, default=3, help="timed steps per variant (after one warm-up)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run_variant(name: str, model: torch.nn.Module, x: torch.Tensor, repeats: int, device: torch.device) -> dict:
    loss_fn = get_loss("ssm", generator=torch.Generator(device=device).manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every repeat measures the same model
    params = list(model.parameters())
    mems, times = [], []
    for i in range(repeats + 1):
        opt.zero_grad(set_to_none=True)
        _, mem = measure_step(lambda: loss_fn(model, x).loss, params, device)
        opt.step()
        if i > 0:  # the first step warms up allocators and kernels
            mems.append(mem)
            times.append(mem.step_seconds)
    mem = max(mems, key=lambda m: m.peak_bytes)
    deq = getattr(model, "deq", None)
    return {
        "variant": name,
        "solver_iters": deq.solve_spec.max_iter if deq is not None else None,
        "peak_bytes": mem.peak_bytes,
        "memory_kind": mem.memory_kind,
        "autograd_saved_bytes": mem.autograd_saved_bytes,
        "step_ms": 1000 * statistics.median(times),
        "nstep": deq.last_stats.nstep if deq is not None else None,
        "params": sum(p.numel() for p in params),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch, args.in_dim, device=device)
    rows = []
    for depth in args.depths:
        torch.manual_seed(args.seed)
        model = ExplicitEnergyMLP(args.in_dim, args.width, depth).to(device)
        rows.append(run_variant(f"explicit-{depth}", model, x, args.repeats, device))
        print(json.dumps(rows[-1]), flush=True)
    for backward in args.backwards:
        for iters in args.iters:
            torch.manual_seed(args.seed)
            # tol below reach: the forward (and adjoint) solves run exactly `iters` Picard steps
            model = DEQEnergyMLP(args.in_dim, args.width, solver="picard", backward=backward, k=2, tau=1.0,
                                 tol=1e-30, max_iter=iters, adjoint_max_iter=iters).to(device)
            rows.append(run_variant(f"deq-{backward}", model, x, args.repeats, device))
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"summary": summarise(rows)}), flush=True)
    return rows


def summarise(rows: list[dict]) -> dict:
    by = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    out: dict[str, float | bool | str] = {"memory_kind": rows[0]["memory_kind"], "device": rows[0]["device"]}
    for backward in ("phantom", "implicit", "unroll"):
        runs = by.get(f"deq-{backward}", [])
        if len(runs) > 1:
            peaks = [r["peak_bytes"] for r in runs]
            out[f"deq_{backward}_memory_spread"] = (max(peaks) - min(peaks)) / min(peaks)
    phantom = by.get("deq-phantom")
    if phantom:
        ref = min(phantom, key=lambda r: r["solver_iters"])
        for depth in (16, 32):
            ex = by.get(f"explicit-{depth}")
            if ex:
                out[f"explicit{depth}_over_deq_phantom_memory"] = ex[0]["peak_bytes"] / ref["peak_bytes"]
                out[f"deq_phantom_over_explicit{depth}_step_time"] = ref["step_ms"] / ex[0]["step_ms"]
    return out


if __name__ == "__main__":
    main()
