#!/usr/bin/env python
"""Memory and time of one SSM training step: explicit energy nets of depth 1…32 vs one DEQ layer.

One JSON object per line (variant, solver_iters, peak_bytes, memory_kind, step_ms, nstep, device, ...),
then a final {"summary": ...} line with the ratios the project tracks:
  - DEQ peak memory flat (±3%) over solver iterations (phantom and implicit);
  - explicit-16 / DEQ-phantom ≥ 4.5 and explicit-32 / DEQ-phantom ≥ 9;
  - DEQ-phantom step time / explicit-16 step time (≤ 0.4 on GPU).
Runs on CPU (memory = bytes autograd saves for backward) or CUDA (memory = max_memory_allocated).

``--mode accuracy`` measures what a user of a deep DEQ meets instead: a cell whose local contraction is ≥ 0.9
(spectral normalisation, λ = 1.01, the injection's bias shifted so the Softplus runs near its linear regime;
the contraction is measured and reported), Anderson, the forward and adjoint solves to one tolerance (the
adjoints relative to the gradient's norm). Each backward's parameter gradient of the SSM loss is compared with
an exact reference (float64, implicit, tolerance 1e-11). Its summary:
  - ``phantom_k_equal_accuracy``: the smallest K whose relative gradient error is ≤ ``--target`` (1e-4);
  - ``implicit_over_phantom_equal_accuracy_time``: the exact step's time / that phantom step's (target ≤ 2);
  - ``implicit_over_phantom_memory``: the exact step's memory / phantom K = 2's (target ≤ 2);
  - ``deq_implicit_memory_spread``: the exact step's memory over forced solver iterations (flat: ≤ 3 %).
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

from deqsm.depth import layer_depth, record_layer_inputs  # noqa: E402
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
    p.add_argument("--mode", choices=["iterations", "accuracy"], default="iterations",
                   help="iterations: depth and forced solver iterations (default); accuracy: exact vs phantom "
                        "at equal gradient accuracy on a cell with contraction >= 0.9 (sizes: --in-dim 64 "
                        "--width 256 --batch 64 unless given)")
    p.add_argument("--lam", type=float, default=1.01, help="accuracy mode: spectral normalisation lambda")
    p.add_argument("--bias", type=float, default=3.0,
                   help="accuracy mode: the injection's bias (the Softplus's slope, hence the contraction)")
    p.add_argument("--tol", type=float, default=1e-4, help="accuracy mode: every solve's tolerance")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6, 8, 12, 16, 24], help="accuracy mode: phantom K")
    p.add_argument("--target", type=float, default=1e-4, help="accuracy mode: relative gradient error to reach")
    args = p.parse_args(argv)
    if args.mode == "accuracy":  # its own default sizes (the small scripts), unless given
        given = set(argv if argv is not None else sys.argv[1:])
        for flag, attr, value in (("--in-dim", "in_dim", 64), ("--width", "width", 256), ("--batch", "batch", 64),
                                  ("--repeats", "repeats", 7)):
            if flag not in given:
                setattr(args, attr, value)
    return args


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
    if args.mode == "accuracy":
        return equal_accuracy(args, device)
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


def accuracy_model(args: argparse.Namespace, backward: str, k: int, device: torch.device,
                   dtype: torch.dtype = torch.float32, tol: float | None = None, **options) -> DEQEnergyMLP:
    """The accuracy mode's energy net (same weights for every backward): spectral λ, the injection's bias set."""
    torch.manual_seed(args.seed)
    tol = args.tol if tol is None else tol
    opts = dict(solver="anderson", tol=tol, max_iter=400, adjoint_tol=tol, adjoint_max_iter=800)
    opts.update(options)
    model = DEQEnergyMLP(args.in_dim, args.width, lam=args.lam, norm="spectral", backward=backward, k=k, **opts)
    with torch.no_grad():
        model.net.inject.bias.fill_(args.bias)
    return model.to(device=device, dtype=dtype)


def ssm_step(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One SSM step's parameter gradient (fixed projections), flat, in float64."""
    model.zero_grad(set_to_none=True)
    get_loss("ssm", generator=torch.Generator(device=x.device).manual_seed(0))(model, x).loss.backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
                      for p in model.parameters()])


def accuracy_row(name: str, model: torch.nn.Module, x: torch.Tensor, ref: torch.Tensor, args: argparse.Namespace,
                 device: torch.device) -> dict:
    grad = ssm_step(model, x)  # warm-up
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        grad = ssm_step(model, x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    params = list(model.parameters())
    _, mem = measure_step(lambda: get_loss("ssm", generator=torch.Generator(device=device).manual_seed(0))(
        model, x).loss, params, device)
    deq = model.deq
    return {"variant": name, "k": deq.k if deq.backward == "phantom" else None,
            "grad_rel_error": float((grad - ref).norm() / ref.norm()), "step_ms": 1000 * statistics.median(times),
            "peak_bytes": mem.peak_bytes, "memory_kind": mem.memory_kind, "nstep": deq.last_stats.nstep,
            "adjoint_nsteps": [st.nstep for st in deq.backward_stats] if deq.backward == "implicit" else None,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def equal_accuracy(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """The ``--mode accuracy`` run (module docstring): rows per backward, then the summary line."""
    x = torch.randn(args.batch, args.in_dim, generator=torch.Generator().manual_seed(args.seed)).to(device)
    exact = accuracy_model(args, "implicit", 2, device, torch.float64, tol=1e-11)
    ref = ssm_step(exact, x.double())
    (inputs, z0), = record_layer_inputs(exact, lambda: exact(x.double())).values()
    depth = layer_depth(exact.deq, inputs, z0)
    print(json.dumps({"cell": {"contraction": depth["contraction"], "weight_norm": depth["weight_norm"],
                               "iterations_at_tol_1e-11": depth["iterations"], "depth_gain": depth["depth_gain"],
                               "lam": args.lam, "bias": args.bias, "tol": args.tol}}), flush=True)
    rows = [accuracy_row("deq-implicit", accuracy_model(args, "implicit", 2, device), x, ref, args, device)]
    print(json.dumps(rows[-1]), flush=True)
    for k in args.ks:
        rows.append(accuracy_row(f"deq-phantom-{k}", accuracy_model(args, "phantom", k, device), x, ref, args, device))
        print(json.dumps(rows[-1]), flush=True)
    for iters in (10, 30, 100):  # memory flat in iterations: every solve forced to `iters` Picard steps
        model = accuracy_model(args, "implicit", 2, device, tol=1e-30, solver="picard", max_iter=iters,
                               adjoint_max_iter=iters)
        rows.append({**run_variant("deq-implicit-forced", model, x, 1, device), "solver_iters": iters})
        print(json.dumps(rows[-1]), flush=True)
    implicit, forced = rows[0], [r for r in rows if r["variant"] == "deq-implicit-forced"]
    phantom = [r for r in rows if r["variant"].startswith("deq-phantom-")]
    match = [r for r in phantom if r["grad_rel_error"] <= args.target]
    best = min(match, key=lambda r: r["k"]) if match else None
    k2 = next((r for r in phantom if r["k"] == 2), None)
    peaks = [r["peak_bytes"] for r in forced]
    summary = {
        "mode": "accuracy", "device": implicit["device"], "memory_kind": implicit["memory_kind"],
        "contraction": depth["contraction"], "target_grad_rel_error": args.target,
        "implicit_grad_rel_error": implicit["grad_rel_error"],
        "phantom_k_equal_accuracy": best["k"] if best else None,
        "implicit_over_phantom_equal_accuracy_time": implicit["step_ms"] / best["step_ms"] if best else None,
        "implicit_over_phantom_memory": implicit["peak_bytes"] / k2["peak_bytes"] if k2 else None,
        "deq_implicit_memory_spread": (max(peaks) - min(peaks)) / min(peaks),
    }
    print(json.dumps({"summary": summary}), flush=True)
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
