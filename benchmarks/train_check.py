#!/usr/bin/env python
"""Short trainings of each experiment kind: the DEQ variant against the deepest explicit one (depth 16).

- ``dkef``: DKEF on a generated 2-D mixture of Gaussians on three rings (deqsm.data's ``mixture``);
- ``nice``: NICE on scikit-learn's 8×8 digits (dequantised and logit-transformed, as params.yaml's
  ``digits`` dataset);
- ``vae``: the implicit-encoder VAE on the binarised digits; the variants are its score network (the
  explicit one at depth 16 is the paper's ``aug16``);
- ``ncsn``: NCSN on the digits in [0, 1], a DEQ core against 16 explicit blocks.

Each is trained with :func:`deqsm.experiments.train_model` (the pipeline's own training code; DKEF and NICE
by SSM, the VAE's score network by SSM-VR, NCSN by annealed DSM) for a few steps; nothing is tested, the point is the cost of a training step and that
training runs on the device. One JSON object per run (experiment, variant, device, steps, step_ms_median,
peak_bytes, memory_kind, final_loss — the last step's training loss —, solver_nstep_mean, ...), then a final
``{"summary": ...}`` line with, per experiment, the DEQ / explicit-16 ratios of peak memory and of median
step time.

Needs only torch, scikit-learn, numpy, pyarrow and pydantic (no ray, mlflow or dvc), so it runs on the
GPU check machines. ``--small`` sizes a CPU run to well under 90 s on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from deqsm.config import DEQSettings  # noqa: E402
from deqsm.data import Context  # noqa: E402
from deqsm.data.generated import Mixture  # noqa: E402
from deqsm.data.images import Digits  # noqa: E402
from deqsm.experiments import VariantSpec, SolverRecorder, train_model  # noqa: E402
from deqsm.train import Callback, TrainSettings, resolve_device  # noqa: E402

EXPLICIT_DEPTH = 16
# Sizes per experiment kind: (full run for a GPU, --small run for a CPU).
SIZES = {
    "dkef": {"full": dict(width=30, steps=40, batch=200, n_inducing=50, n_train=5000),
             "small": dict(width=16, steps=6, batch=64, n_inducing=20, n_train=1000)},
    "nice": {"full": dict(width=1000, steps=40, batch=128),
             "small": dict(width=64, steps=5, batch=32)},
    "vae": {"full": dict(width=256, steps=40, batch=128),
            "small": dict(width=32, steps=5, batch=32)},
    "ncsn": {"full": dict(width=64, steps=40, batch=128),
             "small": dict(width=8, steps=5, batch=32)},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--small", action="store_true", help="small widths and few steps (a CPU run, < 90 s)")
    p.add_argument("--only", nargs="+", choices=sorted(SIZES), default=sorted(SIZES), help="experiment kinds")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: by size)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class LastMetrics(Callback):
    """Keeps the metrics of the last training step."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.last = dict(metrics)


def mixture_splits(n_train: int, seed: int) -> dict[str, torch.Tensor]:
    """The pipeline's 2-D ``mixture`` density (three rings of isotropic Gaussians, std 0.1)."""
    n_eval = max(200, n_train // 5)
    spec = Mixture(shape="rings", std=0.1, n_train=n_train, n_val=n_eval, n_test=n_eval)
    prepared = spec.load(Context("mixture", "mixture", Path("."), seed))
    return {s: torch.from_numpy(a) for s, a in prepared.x.items()}


def digits_splits(seed: int, **preprocessing) -> dict[str, torch.Tensor]:
    """scikit-learn's digits (N, 1, 8, 8): by default dequantised and logit-transformed (α = 1e-6)."""
    spec = Digits(**(preprocessing or dict(dequantize=True, logit_alpha=1e-6)), val_fraction=0.1, test_fraction=0.2)
    prepared = spec.load(Context("digits", "digits", Path("."), seed))
    return {s: torch.from_numpy(a) for s, a in prepared.x.items()}


def experiments(args: argparse.Namespace) -> list[tuple[str, dict, dict[str, torch.Tensor], dict]]:
    """(experiment name, model settings, splits, sizes) per requested kind."""
    size = "small" if args.small else "full"
    out = []
    for kind in args.only:
        sizes = dict(SIZES[kind][size])
        if args.steps is not None:
            sizes["steps"] = args.steps
        if kind == "dkef":
            model = {"model": "dkef", "width": sizes["width"], "model_options": {"n_inducing": sizes["n_inducing"]}}
            out.append(("dkef-mixture", model, mixture_splits(sizes["n_train"], args.seed), sizes))
        elif kind == "nice":
            model = {"model": "nice", "width": sizes["width"], "model_options": {"n_couplings": 4}}
            out.append(("nice-digits", model, digits_splits(args.seed), sizes))
        elif kind == "vae":
            model = {"model": "vae", "width": sizes["width"], "loss": {"name": "ssm_vr"},
                     "model_options": {"z_dim": 8, "hidden_width": sizes["width"]}}
            out.append(("vae-digits", model, digits_splits(args.seed, binarize="threshold"), sizes))
        else:
            model = {"model": "ncsn", "width": sizes["width"], "loss": {"name": "dsm"}}
            out.append(("ncsn-digits", model, digits_splits(args.seed, dequantize=False), sizes))
    return out


def train_one(experiment: str, model: dict, variant: str, splits: dict[str, torch.Tensor], sizes: dict,
              device: torch.device, seed: int) -> dict:
    """Train one variant for ``sizes['steps']`` steps; its JSON row."""
    depth = EXPLICIT_DEPTH if variant == "explicit" else 1
    deq = DEQSettings()
    spec = VariantSpec(name=f"{experiment}/{variant}", variant=variant, depth=depth, deq=deq,
                          **{"loss": {"name": "ssm"}, **model})
    settings = TrainSettings(steps=sizes["steps"], batch_size=sizes["batch"], eval_every=sizes["steps"],
                             eval_batches=1, progress=False, seed=seed, device=str(device))
    recorder, last = SolverRecorder(), LastMetrics()
    t0 = time.perf_counter()
    net, fit = train_model(spec, splits, settings, callbacks=[recorder, last])
    wall = time.perf_counter() - t0
    row = {
        "experiment": experiment, "variant": variant if variant == "deq" else f"explicit-{depth}",
        "model": model["model"], "loss": spec.loss.name, "width": model["width"], "depth": depth if variant == "explicit" else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "steps": fit.steps, "batch_size": sizes["batch"], "step_ms_median": fit.step_ms_median,
        "peak_bytes": fit.peak_bytes, "memory_kind": fit.memory_kind,
        "final_loss": last.last.get("train_loss"),
        "best_val_loss": fit.best_val_loss if math.isfinite(fit.best_val_loss) else None,
        "solver_nstep_mean": recorder.summary().get("solver_nstep_mean"),
        "solver_residual_max": recorder.summary().get("solver_residual_max"),
        "params": sum(p.numel() for p in net.parameters()), "wall_s": wall,
    }
    if variant == "deq":
        row["deq"] = {k: getattr(deq, k) for k in ("solver", "backward", "k", "tol", "max_iter")}
    return row


def summarise(rows: list[dict]) -> dict:
    """Per experiment: DEQ / explicit-16 ratios of peak memory and median step time."""
    out: dict[str, dict | str] = {}
    for exp in dict.fromkeys(r["experiment"] for r in rows):
        by = {r["variant"]: r for r in rows if r["experiment"] == exp}
        deq, ex = by.get("deq"), by.get(f"explicit-{EXPLICIT_DEPTH}")
        if deq is None or ex is None:
            continue
        out[exp] = {
            "deq_over_explicit16_memory": deq["peak_bytes"] / ex["peak_bytes"] if ex["peak_bytes"] else None,
            "deq_over_explicit16_step_time": (deq["step_ms_median"] / ex["step_ms_median"]
                                              if ex["step_ms_median"] else None),
            "deq_peak_bytes": deq["peak_bytes"], "explicit16_peak_bytes": ex["peak_bytes"],
            "deq_solver_nstep_mean": deq["solver_nstep_mean"], "memory_kind": deq["memory_kind"],
        }
    if rows:
        out["device"] = rows[0]["device"]
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is false")
    rows = []
    for experiment, model, splits, sizes in experiments(args):
        for variant in ("deq", "explicit"):
            print(f"train_check: {experiment} {variant} ({sizes['steps']} steps on {device})", file=sys.stderr,
                  flush=True)
            rows.append(train_one(experiment, model, variant, splits, sizes, device, args.seed))
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"summary": summarise(rows)}), flush=True)
    return rows


if __name__ == "__main__":
    main()
