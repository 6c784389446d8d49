#!/usr/bin/env python
"""Density estimation, DEQ vs explicit depth 2 / 8 / 16, trained by SSM (the paper's sections 4.2 and 4.3)
on data that runs offline:

- DKEF on a synthetic 3-D mixture of three Gaussians (known density: Fisher divergence and the true
  test log-likelihood are reported beside the model's importance-sampled one);
- NICE on scikit-learn's 8×8 digits (1797 images, pixel values 0..16): dequantised u = (x + U[0,1)) / 17,
  squeezed p = α + (1 − 2α) u with α = 0.05 and logit-transformed y = log p − log(1 − p); the flow's exact
  log-likelihood is in logit space (nats), bits/dim are of the 17-level pixels (logit Jacobian included).
  Split (seed 2019): 10% test, 10% of the rest validation.

One JSON object per line per variant (test log-likelihood, test SSM / SM losses, peak memory, time per
step, solver steps, parameters), then {"summary": ...}: per experiment, the DEQ's test log-likelihood
minus the best explicit one and its memory as a fraction of explicit-16's — the paper's claim is that the
DEQ matches or beats the deep explicit nets at ≤ 0.5× the 16-deep one's memory.

Defaults are sized for a short CPU run (a few minutes on 2 cores); scale with --steps-*, --width-*,
--is-samples (the paper: 10⁶), --device cuda. Memory on CPU is autograd_saved_bytes (bytes autograd keeps
for backward at the end of the loss, parameters excluded); on CUDA, max_memory_allocated.
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

from deqsm.experiments import VariantSpec, run  # noqa: E402
from deqsm.train import TrainSettings  # noqa: E402

LOGIT_ALPHA = 0.05
DIGIT_LEVELS = 17


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["dkef", "nice"], nargs="+", default=["dkef", "nice"])
    p.add_argument("--depths", type=int, nargs="+", default=[2, 8, 16], help="explicit depths")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-dkef", type=int, default=300)
    p.add_argument("--width-dkef", type=int, default=30, help="feature-net width (the base code's 30)")
    p.add_argument("--inducing", type=int, default=30, help="DKEF inducing points")
    p.add_argument("--is-samples", type=int, default=50_000, help="importance samples for DKEF log Z (paper: 10^6)")
    p.add_argument("--steps-nice", type=int, default=300)
    p.add_argument("--width-nice", type=int, default=128, help="coupling-net width (the paper: 1000)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    return p.parse_args(argv)


def mixture(dim: int = 3) -> torch.distributions.Distribution:
    means = torch.tensor([[-1.5, 0.0, 0.5], [1.5, 1.0, -0.5], [0.0, -1.5, 0.0]])[:, :dim]
    scales = torch.tensor([0.6, 0.8, 0.5])
    comps = torch.distributions.Independent(torch.distributions.Normal(means, scales[:, None].expand(3, dim)), 1)
    return torch.distributions.MixtureSameFamily(torch.distributions.Categorical(torch.tensor([0.3, 0.4, 0.3])), comps)


def mixture_splits(seed: int) -> tuple[dict[str, torch.Tensor], torch.distributions.Distribution]:
    torch.manual_seed(seed + 2019)
    true = mixture()
    x = true.sample((2800,))
    return {"train": x[:2000], "val": x[2000:2300], "test": x[2300:]}, true


def digits_splits(seed: int) -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits

    pixels = torch.as_tensor(load_digits().data, dtype=torch.float32)  # (1797, 64), values 0..16
    gen = torch.Generator().manual_seed(2019)
    pixels = pixels[torch.randperm(pixels.shape[0], generator=gen)]
    u = (pixels + torch.rand(pixels.shape, generator=gen)) / DIGIT_LEVELS  # dequantised, in [0, 1)
    p = LOGIT_ALPHA + (1 - 2 * LOGIT_ALPHA) * u
    y = torch.log(p) - torch.log1p(-p)
    n_test = y.shape[0] // 10
    n_val = (y.shape[0] - n_test) // 10
    return {"train": y[:-(n_test + n_val)], "val": y[-(n_test + n_val):-n_test], "test": y[-n_test:]}


def variants(depths: list[int]) -> list[tuple[str, str, int]]:
    return [("deq", "deq", 2)] + [(f"explicit-{d}", "explicit", d) for d in depths]


def run_experiment(name: str, model: str, splits, width: int, model_options: dict, steps: int, args,
                   eval_options: dict, true_density=None) -> list[dict]:
    rows = []
    for label, variant, depth in variants(args.depths):
        spec = VariantSpec(name=f"{name}-{label}-ssm", model=model, variant=variant, depth=depth, width=width,
                              model_options=model_options, loss={"name": "ssm"},
                              deq={"solver": "anderson", "backward": "phantom", "tol": 1e-5, "max_iter": 50})
        settings = TrainSettings(steps=steps, batch_size=args.batch, lr=args.lr, eval_every=max(steps // 5, 1),
                                 eval_batches=2, seed=args.seed, device=args.device, progress=False)
        start = time.perf_counter()
        metrics = run(spec, splits, settings, eval_options=eval_options, true_density=true_density)
        keep = ("params", "test_loglik", "test_loglik_se", "test_bpd", "test_ssm_loss", "test_sm_loss",
                "fisher_divergence", "true_test_loglik", "peak_bytes", "memory_kind", "step_ms_median",
                "solver_nstep_mean", "solver_residual_max", "best_val_loss", "train_steps")
        row = {"experiment": name, "variant": label, "depth": depth if variant == "explicit" else None, "width": width,
               **{k: metrics[k] for k in keep if k in metrics},
               "seconds": round(time.perf_counter() - start, 1),
               "device": torch.cuda.get_device_name() if settings.device.startswith("cuda") else "cpu"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def summarise(rows: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for exp in sorted({r["experiment"] for r in rows}):
        by = {r["variant"]: r for r in rows if r["experiment"] == exp}
        deq = by.get("deq")
        explicit = [r for k, r in by.items() if k != "deq"]
        deep = [r for r in explicit if r["depth"] >= 8]
        if deq is None or not explicit:
            continue
        best = max(explicit, key=lambda r: r["test_loglik"])
        s = {"deq_test_loglik": deq["test_loglik"], "best_explicit": best["variant"],
             "deq_minus_best_explicit_loglik": deq["test_loglik"] - best["test_loglik"],
             "deq_minus_best_explicit_ssm_loss": deq["test_ssm_loss"] - min(r["test_ssm_loss"] for r in explicit)}
        if deep:
            best_deep = max(deep, key=lambda r: r["test_loglik"])
            s["best_deep_explicit"] = best_deep["variant"]
            s["deq_minus_best_deep_loglik"] = deq["test_loglik"] - best_deep["test_loglik"]
            s["deq_minus_best_deep_ssm_loss"] = deq["test_ssm_loss"] - min(r["test_ssm_loss"] for r in deep)
            # "Matches": within 2 Monte-Carlo standard errors of log Ẑ (DKEF) or 0.05 nats; the test rows are
            # shared, so their sampling noise is common to both and left out.
            se = math.hypot(deq.get("test_loglik_se", 0.0), best_deep.get("test_loglik_se", 0.0))
            s["claim_loglik_matches_or_beats_deep"] = bool(s["deq_minus_best_deep_loglik"] >= -max(2 * se, 0.05))
        deepest = by.get("explicit-16")
        if deepest is not None:
            s["deq_over_explicit16_memory"] = deq["peak_bytes"] / deepest["peak_bytes"]
            s["deq_over_explicit16_step_time"] = deq["step_ms_median"] / deepest["step_ms_median"]
            s["claim_memory_at_most_half_of_explicit16"] = bool(s["deq_over_explicit16_memory"] <= 0.5)
        out[exp] = s
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    rows: list[dict] = []
    if "dkef" in args.only:
        splits, true = mixture_splits(args.seed)
        rows += run_experiment("dkef-mixture3d", "dkef", splits, args.width_dkef,
                               {"n_inducing": args.inducing, "alpha_eval_rows": 500}, args.steps_dkef, args,
                               {"is_samples": args.is_samples, "is_batch_size": 10_000}, true_density=true)
    if "nice" in args.only:
        rows += run_experiment("nice-digits", "nice", digits_splits(args.seed), args.width_nice, {"n_couplings": 4},
                               args.steps_nice, args, {"logit_alpha": LOGIT_ALPHA, "pixel_levels": DIGIT_LEVELS})
    print(json.dumps({"summary": summarise(rows)}), flush=True)
    return rows


if __name__ == "__main__":
    main()
