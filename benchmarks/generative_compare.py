#!/usr/bin/env python
"""Generative experiments of the paper (§4.1 implicit-encoder VAE, §4.4 NCSN), short runs on 8×8 digits.

Every model is built, trained and evaluated exactly as the pipeline does it — a
:class:`deqsm.experiments.VariantSpec` of its model family, :func:`deqsm.experiments.train_model` (the one
training loop, :func:`deqsm.train.fit`) and :func:`deqsm.experiments.evaluate_variant` — without Ray,
MLflow or DVC, so it also runs on a bare GPU machine.

VAE: an implicit encoder whose entropy gradient comes from a score network s(x, z) trained by SSM(-VR),
one optimiser step on score loss + VAE surrogate (their stop-gradients keep the gradients apart), for each
score-network variant (deq, explicit = explicit-2, aug8 = explicit-8, aug16 = explicit-16, or any
explicit-L). Per variant: the importance-weighted bound on the test log-likelihood (a valid lower bound, with
a proposal fitted per x to the implicit encoder's samples; deqsm.metrics.elbo), the KDE ELBO beside it as a
diagnostic (biased upwards), time per training step, autograd memory of the score step, and a sample grid.

NCSN: a noise-conditional score network with a DEQ core (deq) or an explicit stack of the same blocks
(explicit), trained with annealed SSM and annealed DSM; samples by annealed Langevin dynamics; Fréchet
distance to the test set (fid_inception when --inception-weights exists and torch-fidelity is installed,
else fd_digits_cnn: a small classifier trained on the training split); loss curves and sample grids.

Prints one JSON object per line and a final {"summary": ...} line; writes the lines (results.jsonl) and
the pictures to --out. Data: scikit-learn's digits (binarised for the VAE, [0, 1] for NCSN), split once
(seeded) into train / test. CPU memory figures are autograd_saved_bytes (what autograd keeps for backward
when the loss is computed); on CUDA cuda_max_memory_allocated.
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

from deqsm.config import DEQSettings  # noqa: E402
from deqsm.experiments import VariantSpec, evaluate_variant, make_objective, train_model  # noqa: E402
from deqsm.metrics.fid import build_frechet_metric, frechet_distance  # noqa: E402
from deqsm.metrics.memory import measure_step  # noqa: E402
from deqsm.models.ncsn import fd_feature_classifier  # noqa: E402
from deqsm.models.vae import VAE_SCORE_LOSSES  # noqa: E402
from deqsm.sampling import save_image_grid  # noqa: E402
from deqsm.train import Callback, TrainSettings  # noqa: E402

Tensor = torch.Tensor
# The paper's names of the VAE's score networks (its Table 1): variant and depth.
PAPER_SCORE_NETS = {"deq": ("deq", 2), "explicit": ("explicit", 2), "aug8": ("explicit", 8),
                    "aug16": ("explicit", 16)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every model (sets --vae-steps and --ncsn-steps unless they are given)")
    p.add_argument("--vae-steps", type=int, default=None, help="VAE iterations per variant (default 400)")
    p.add_argument("--ncsn-steps", type=int, default=None, help="NCSN steps per variant and loss (default 500)")
    p.add_argument("--out", type=Path, default=Path("out/benchmarks/generative"), help="folder for results and PNGs")
    p.add_argument("--experiments", nargs="+", default=["vae", "ncsn"], choices=["vae", "ncsn"])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the tensors are small, and on a shared 2-core machine a "
                        "second OpenMP thread made steps several times slower by spin-waiting)")
    p.add_argument("--timing-rounds", type=int, default=20,
                   help="after training, time this many further steps per model, round-robin over the variants "
                        "(so that load from other processes hits every variant alike)")
    # DEQ
    p.add_argument("--deq-solver", default="anderson")
    p.add_argument("--deq-backward", default="phantom")
    p.add_argument("--deq-tol", type=float, default=1e-4)
    p.add_argument("--deq-max-iter", type=int, default=30)
    p.add_argument("--deq-norm", default="frobenius",
                   help="weight normalisation of the DEQ layers: frobenius (the paper's), spectral, or operator "
                        "(the exact operator norm; for NCSN's convolution computed on the image grid)")
    # VAE
    p.add_argument("--vae-variants", nargs="+", default=["deq", "explicit", "aug8", "aug16"],
                   help="score networks: deq, explicit (depth 2), aug8, aug16 or explicit-L")
    p.add_argument("--vae-score-loss", default="ssm_vr", choices=list(VAE_SCORE_LOSSES))
    p.add_argument("--z-dim", type=int, default=8)
    p.add_argument("--vae-width", type=int, default=256, help="encoder / decoder / score-net width")
    p.add_argument("--vae-batch", type=int, default=128)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--elbo-centres", type=int, default=512, help="KDE centres per test x")
    p.add_argument("--elbo-eval", type=int, default=128, help="samples per test x for the entropy estimate")
    p.add_argument("--iw-samples", type=int, default=256, help="draws for the importance-weighted bound, the VAE's headline (>= 1)")
    # NCSN
    p.add_argument("--ncsn-variants", nargs="+", default=["deq", "explicit"])
    p.add_argument("--ncsn-losses", nargs="+", default=["ssm", "dsm"])
    p.add_argument("--ncsn-channels", type=int, default=16)
    p.add_argument("--ncsn-depth", type=int, default=4, help="blocks of the explicit core")
    p.add_argument("--ncsn-batch", type=int, default=128)
    p.add_argument("--ncsn-lr", type=float, default=2e-3)
    p.add_argument("--sigma-max", type=float, default=1.0)
    p.add_argument("--sigma-min", type=float, default=0.01)
    p.add_argument("--sigma-levels", type=int, default=10)
    p.add_argument("--samples", type=int, default=360, help="NCSN samples for the FD (default: the test-set size)")
    p.add_argument("--langevin-steps", type=int, default=20, help="Langevin steps T per noise level")
    p.add_argument("--langevin-lr", type=float, default=5e-5, help="ε: step size at the smallest σ")
    p.add_argument("--classifier-epochs", type=int, default=15, help="epochs of the digits CNN (FD features)")
    p.add_argument("--fd-extractor", default="auto", choices=["auto", "inception", "digits_cnn"])
    p.add_argument("--inception-weights", default=None, help="path of Inception-v3 weights (never downloaded)")
    args = p.parse_args(argv)
    args.vae_steps = args.vae_steps or args.steps or 400
    args.ncsn_steps = args.ncsn_steps or args.steps or 500
    for name in ("vae_steps", "ncsn_steps", "samples", "langevin_steps", "timing_rounds", "classifier_epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for v in args.vae_variants:
        try:
            score_net(v)
        except ValueError as err:
            p.error(str(err))
    return args


def score_net(label: str) -> tuple[str, int]:
    """A score network's (variant, depth) from the paper's name or ``explicit-L``."""
    if label in PAPER_SCORE_NETS:
        return PAPER_SCORE_NETS[label]
    if label.startswith("explicit-") and label[len("explicit-"):].isdigit() and int(label[len("explicit-"):]) >= 1:
        return "explicit", int(label[len("explicit-"):])
    raise ValueError(f"unknown --vae-variants {label!r}; known: {', '.join(PAPER_SCORE_NETS)} or explicit-L")


def emit(row: dict, sink) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    sink.write(line + "\n")
    sink.flush()


def load_digits_splits(seed: int) -> dict[str, Tensor]:
    """scikit-learn's digits as (N, 1, 8, 8) in [0, 1] with labels, split 80 / 20 by a seeded permutation."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = round(0.2 * x.shape[0])
    test, train = perm[:n_test], perm[n_test:]
    return {"train_x": x[train], "train_y": y[train], "test_x": x[test], "test_y": y[test]}


def deq_settings(args) -> DEQSettings:
    return DEQSettings(solver=args.deq_solver, backward=args.deq_backward, tol=args.deq_tol, max_iter=args.deq_max_iter,
                       norm=args.deq_norm)


class Curve(Callback):
    """The training loss and solver steps of every step of :func:`deqsm.train.fit`."""

    def __init__(self, loss_key: str) -> None:
        self.loss_key, self.losses, self.nsteps = loss_key, [], []

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.losses.append(metrics[self.loss_key])
        if "solver_nstep" in metrics:
            self.nsteps.append(metrics["solver_nstep"])


def train_settings(args, steps: int, batch: int, lr: float, device: torch.device) -> TrainSettings:
    return TrainSettings(steps=steps, batch_size=batch, lr=lr, grad_clip=10.0, eval_every=steps, seed=args.seed,
                         device=str(device), progress=False)


def time_steps(models: dict[str, tuple], batch: Tensor, rounds: int, device: torch.device) -> dict[str, tuple[float, float]]:
    """Median wall and CPU milliseconds of one loss-and-gradient step per model, measured round-robin after
    training (so that load from other processes hits every model alike)."""
    wall: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for key, (model, objective) in models.items():
            model.train()
            c0 = time.process_time()
            _, mem = measure_step(lambda: objective(model, batch).loss, list(model.parameters()), device)
            model.zero_grad(set_to_none=True)
            cpu[key].append(time.process_time() - c0)
            wall[key].append(mem.step_seconds)
    return {k: (1000 * statistics.median(wall[k]), 1000 * statistics.median(cpu[k])) for k in models}


# ---------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------
def run_vae(args, data: dict[str, Tensor], device: torch.device, sink) -> dict[str, dict]:
    splits = {"train": (data["train_x"] > 0.5).float(), "test": (data["test_x"] > 0.5).float()}  # binarised
    results: dict[str, dict] = {}
    curves: dict[str, list[float]] = {}
    trained: dict[str, tuple] = {}
    for label in args.vae_variants:
        variant, depth = score_net(label)
        spec = VariantSpec(name=f"vae/{label}", model="vae", variant=variant, depth=depth, width=args.vae_width,
                           model_options={"z_dim": args.z_dim, "hidden_width": args.vae_width},
                           loss={"name": args.vae_score_loss}, deq=deq_settings(args))
        curve = Curve("train_score_loss")
        start = time.perf_counter()
        model, fit = train_model(spec, splits, train_settings(args, args.vae_steps, args.vae_batch, args.vae_lr, device),
                                 [curve])
        train_s = time.perf_counter() - start
        trained[label] = (model, make_objective(spec, splits["train"]))
        curves[label] = curve.losses
        t0 = time.perf_counter()
        metrics, images = evaluate_variant(spec, model, splits, {
            "elbo_centres": args.elbo_centres, "elbo_eval": args.elbo_eval, "iw_samples": args.iw_samples,
            "memory_batch": args.vae_batch, "seed": args.seed})
        eval_s = time.perf_counter() - t0
        png = save_image_grid(images, args.out / f"vae_samples_{label}.png")
        row = {
            "experiment": "vae", "variant": label, "score_net": f"{variant}" + (f"-{depth}" if variant == "explicit" else ""),
            "score_loss": args.vae_score_loss, "steps": fit.steps, **metrics,
            "final_score_loss": statistics.fmean(curve.losses[-20:]),
            "step_ms_during_training": fit.step_ms_median, "peak_bytes": fit.peak_bytes, "memory_kind": fit.memory_kind,
            "solver_nstep_mean": statistics.fmean(curve.nsteps) if curve.nsteps else None,
            "train_seconds": train_s, "eval_seconds": eval_s, "samples_png": str(png), "device": str(device),
        }
        results[label] = row
        emit(row, sink)

    timing = time_steps(trained, splits["train"][:args.vae_batch].to(device), args.timing_rounds, device)
    for label, (wall_ms, cpu_ms) in timing.items():
        results[label]["iteration_ms"], results[label]["iteration_cpu_ms"] = wall_ms, cpu_ms
    emit({"experiment": "vae_timing", "rounds": args.timing_rounds, "threads": torch.get_num_threads(),
          **{f"{v}_iteration_ms": results[v]["iteration_ms"] for v in trained},
          **{f"{v}_iteration_cpu_ms": results[v]["iteration_cpu_ms"] for v in trained}}, sink)
    plot_curves({f"score net {k}": v for k, v in curves.items()}, args.out / "vae_score_loss_curves.png",
                f"VAE score-network loss ({args.vae_score_loss})", sink)
    return results


# ---------------------------------------------------------------------------------------------------
# NCSN
# ---------------------------------------------------------------------------------------------------
def run_ncsn(args, data: dict[str, Tensor], device: torch.device, sink) -> tuple[dict[str, dict], dict]:
    splits = {"train": data["train_x"], "test": data["test_x"]}
    labels = {"train": data["train_y"], "test": data["test_y"]}
    eval_options = {"fd_samples": args.samples, "langevin_steps": args.langevin_steps,
                    "langevin_lr": args.langevin_lr, "classifier_epochs": args.classifier_epochs,
                    "fd_extractor": args.fd_extractor, "inception_weights": args.inception_weights, "seed": args.seed}
    results: dict[str, dict] = {}
    curves: dict[str, list[float]] = {}
    trained: dict[str, tuple] = {}
    for loss_name in args.ncsn_losses:
        for variant in args.ncsn_variants:
            spec = VariantSpec(name=f"ncsn/{variant}-{loss_name}", model="ncsn", variant=variant, depth=args.ncsn_depth,
                               width=args.ncsn_channels, loss={"name": loss_name}, deq=deq_settings(args),
                               model_options={"sigma_max": args.sigma_max, "sigma_min": args.sigma_min,
                                              "sigma_levels": args.sigma_levels})
            curve = Curve("train_loss")
            start = time.perf_counter()
            model, fit = train_model(spec, splits, train_settings(args, args.ncsn_steps, args.ncsn_batch, args.ncsn_lr,
                                                                  device), [curve])
            train_s = time.perf_counter() - start
            key = f"{variant}-{loss_name}"
            trained[key] = (model, make_objective(spec, splits["train"]))
            curves[key] = curve.losses
            t1 = time.perf_counter()
            metrics, images = evaluate_variant(spec, model, splits, eval_options, labels=labels)
            sample_s = time.perf_counter() - t1
            png = save_image_grid(images, args.out / f"ncsn_samples_{variant}_{loss_name}.png")
            row = {
                "experiment": "ncsn", "variant": variant, "loss": loss_name, "steps": fit.steps, **metrics,
                "final_train_loss": statistics.fmean(curve.losses[-20:]),
                "step_ms_during_training": fit.step_ms_median, "peak_bytes": fit.peak_bytes,
                "memory_kind": fit.memory_kind,
                "solver_nstep_mean": statistics.fmean(curve.nsteps) if curve.nsteps else None,
                "train_seconds": train_s, "sampling_seconds": sample_s,
                "langevin": {"levels": args.sigma_levels, "sigma_max": args.sigma_max, "sigma_min": args.sigma_min,
                             "steps_per_level": args.langevin_steps, "step_lr": args.langevin_lr},
                "samples_png": str(png), "device": str(device),
            }
            results[key] = row
            emit(row, sink)
    reference = fd_reference(args, data, results)
    emit(reference, sink)

    timing = time_steps(trained, splits["train"][:args.ncsn_batch].to(device), args.timing_rounds, device)
    for key, (wall_ms, cpu_ms) in timing.items():
        results[key]["step_ms"], results[key]["step_cpu_ms"] = wall_ms, cpu_ms
    emit({"experiment": "ncsn_timing", "rounds": args.timing_rounds, "threads": torch.get_num_threads(),
          **{f"{k}_step_ms": results[k]["step_ms"] for k in trained},
          **{f"{k}_step_cpu_ms": results[k]["step_cpu_ms"] for k in trained}}, sink)
    plot_curves(curves, args.out / "ncsn_loss_curves.png", "NCSN training loss (annealed, σ²-weighted)", sink,
                group_by_suffix=True)
    return results, reference


def fd_reference(args, data: dict[str, Tensor], results: dict[str, dict]) -> dict:
    """The Fréchet distances that put the models' in scale: training vs test images (a floor for the sample
    size, from the evaluation) and uniform noise vs test images, in the same features."""
    first = next(iter(results.values()))
    metric = next(k for k in first if k.endswith("_train_vs_test"))[:-len("_train_vs_test")]
    classifier = None
    if metric == "fd_digits_cnn":
        classifier = fd_feature_classifier(data["train_x"], data["train_y"], args.seed, args.classifier_epochs)
    fd = build_frechet_metric(args.fd_extractor, inception_weights=args.inception_weights, classifier=classifier)
    noise = torch.rand(args.samples, *data["test_x"].shape[1:], generator=torch.Generator().manual_seed(args.seed + 7))
    return {"experiment": "fd_reference", "metric": metric, "note": fd.note,
            "classifier_test_accuracy": first.get("fd_classifier_test_accuracy"),
            f"{metric}_train_vs_test": first[f"{metric}_train_vs_test"],
            f"{metric}_uniform_noise_vs_test": frechet_distance(fd, data["test_x"], noise),
            "n_real": data["test_x"].shape[0], "n_fake": args.samples}


def plot_curves(curves: dict[str, list[float]], path: Path, title: str, sink, group_by_suffix: bool = False) -> None:
    """Loss curves (moving average over 10 steps) as a PNG; one panel per loss when ``group_by_suffix``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        emit({"experiment": "plot", "skipped": str(path), "reason": "matplotlib not installed"}, sink)
        return
    groups: dict[str, dict[str, list[float]]] = {}
    for key, values in curves.items():
        group = key.rsplit("-", 1)[-1] if group_by_suffix else ""
        groups.setdefault(group, {})[key] = values
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.5), squeeze=False)
    for ax, (group, members) in zip(axes[0], groups.items()):
        for key, values in members.items():
            t = torch.tensor(values)
            w = min(10, len(values))
            smooth = torch.nn.functional.avg_pool1d(t.view(1, 1, -1), w, stride=1).view(-1)
            ax.plot(range(w, len(values) + 1), smooth.tolist(), label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (moving average)")
        ax.set_title(f"{title}{': ' + group if group else ''}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
def summarise(vae: dict[str, dict], ncsn: dict[str, dict], reference: dict | None) -> dict:
    out: dict = {}
    if vae:
        out["vae"] = {v: {k: r[k] for k in ("test_elbo", "test_iw_loglik", "test_elbo_smoothed", "iteration_ms",
                                            "iteration_cpu_ms", "score_step_peak_bytes", "score_net_params") if k in r}
                      for v, r in vae.items()}
        if "deq" in vae:
            deq = vae["deq"]
            others = {v: r for v, r in vae.items() if v != "deq"}
            out["vae_deq_vs"] = {
                v: {"iw_loglik_diff_deq_minus": deq["test_iw_loglik"] - r["test_iw_loglik"],
                    "elbo_diff_deq_minus": deq["test_elbo"] - r["test_elbo"],
                    "memory_ratio_other_over_deq": r["score_step_peak_bytes"] / max(deq["score_step_peak_bytes"], 1),
                    "time_ratio_other_over_deq": r["iteration_ms"] / max(deq["iteration_ms"], 1e-9)}
                for v, r in others.items()}
    if ncsn:
        metric = reference["metric"] if reference else None
        out["ncsn"] = {k: {m: r[m] for m in (metric, "final_train_loss", "step_ms", "step_cpu_ms", "peak_bytes")
                           if m in r}
                       for k, r in ncsn.items()}
        out["fd_metric"] = metric
        if reference:
            out["fd_reference_train_vs_test"] = reference[f"{metric}_train_vs_test"]
            out["fd_reference_noise_vs_test"] = reference[f"{metric}_uniform_noise_vs_test"]
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if args.device == "auto" else args.device))
        args.out.mkdir(parents=True, exist_ok=True)
        data = load_digits_splits(args.seed)
        start = time.perf_counter()
        vae, ncsn, reference = {}, {}, None
        with open(args.out / "results.jsonl", "w") as sink:
            if "vae" in args.experiments:
                vae = run_vae(args, data, device, sink)
            if "ncsn" in args.experiments:
                ncsn, reference = run_ncsn(args, data, device, sink)
            summary = summarise(vae, ncsn, reference)
            summary["seconds"] = time.perf_counter() - start
            summary["threads"] = args.threads
            emit({"summary": summary}, sink)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process (tests)
    return summary


if __name__ == "__main__":
    main()
