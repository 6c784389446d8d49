#!/usr/bin/env python
"""Generative experiments of the paper (§4.1 implicit-encoder VAE, §4.4 NCSN), short runs on 8×8 digits.

VAE: an implicit encoder whose entropy gradient comes from a score network s(x, z) trained by SSM(-VR) in
alternation with the VAE, for each score-network variant (deq, explicit, aug8, aug16). Per variant: the
test ELBO with the implicit encoder's entropy estimated per x by a kernel density estimate
(deqsm.metrics.elbo; also the importance-weighted bound with the KDE as proposal), time per training
iteration, autograd memory of the score step, and a sample grid.

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
from deqsm.metrics.elbo import estimate_elbo  # noqa: E402
from deqsm.metrics.fid import (build_frechet_metric, classifier_accuracy, frechet_distance,  # noqa: E402
                               train_digits_cnn)
from deqsm.metrics.memory import measure_step  # noqa: E402
from deqsm.models.blocks import count_parameters  # noqa: E402
from deqsm.models.ncsn import NCSN, annealed_score_loss  # noqa: E402
from deqsm.models.vae import SCORE_NETS, VAE_SCORE_LOSSES, ImplicitVAE, ImplicitVAETrainer  # noqa: E402
from deqsm.sampling import annealed_langevin, geometric_sigmas, save_image_grid  # noqa: E402

Tensor = torch.Tensor


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
    p.add_argument("--vae-variants", nargs="+", default=["deq", "explicit", "aug8", "aug16"])
    p.add_argument("--vae-score-loss", default="ssm_vr", choices=list(VAE_SCORE_LOSSES))
    p.add_argument("--score-steps", type=int, default=3,
                   help="score-network updates per VAE update (fewer let the encoder outrun its score estimate)")
    p.add_argument("--z-dim", type=int, default=8)
    p.add_argument("--vae-width", type=int, default=256, help="encoder / decoder / score-net width")
    p.add_argument("--vae-batch", type=int, default=128)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--elbo-centres", type=int, default=512, help="KDE centres per test x")
    p.add_argument("--elbo-eval", type=int, default=128, help="samples per test x for the entropy estimate")
    p.add_argument("--iw-samples", type=int, default=256, help="draws for the importance-weighted bound (0: off)")
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
    for name in ("vae_steps", "ncsn_steps", "samples", "langevin_steps", "timing_rounds", "classifier_epochs",
                 "score_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for v in args.vae_variants:
        if v not in SCORE_NETS:
            p.error(f"unknown --vae-variants {v!r}; known: {', '.join(SCORE_NETS)}")
    return args


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


def batches(n: int, batch: int, gen: torch.Generator):
    """Endless shuffled index batches (a new permutation per epoch)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n - batch + 1, batch):
            yield perm[start:start + batch]


def deq_settings(args) -> DEQSettings:
    return DEQSettings(solver=args.deq_solver, backward=args.deq_backward, tol=args.deq_tol, max_iter=args.deq_max_iter,
                       norm=args.deq_norm)


def memory_kind(device: torch.device) -> str:
    return "cuda_max_memory_allocated" if device.type == "cuda" else "autograd_saved_bytes"


def solver_row(model: torch.nn.Module) -> dict:
    deq = next((m for m in model.modules() if m.__class__.__name__ == "DEQ"), None)
    if deq is None or deq.last_stats is None:
        return {}
    s = deq.last_stats
    return {"solver_nstep": s.nstep, "solver_abs_residual_max": s.abs_residual_max, "solver_converged": s.converged}


# ---------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------
def run_vae(args, data: dict[str, Tensor], device: torch.device, sink) -> dict[str, dict]:
    train = (data["train_x"].flatten(1) > 0.5).float().to(device)  # binarised
    test = (data["test_x"].flatten(1) > 0.5).float().to(device)
    results: dict[str, dict] = {}
    curves: dict[str, list[float]] = {}
    trainers: dict[str, ImplicitVAETrainer] = {}
    for variant in args.vae_variants:
        torch.manual_seed(args.seed)
        gen = torch.Generator().manual_seed(args.seed)
        model = ImplicitVAE(train.shape[1], args.z_dim, width=args.vae_width, score_variant=variant,
                            score_width=args.vae_width, deq=deq_settings(args)).to(device)
        trainer = trainers[variant] = ImplicitVAETrainer(model, score_loss=args.vae_score_loss, lr=args.vae_lr,
                                                         score_steps=args.score_steps)
        rows = []
        start = time.perf_counter()
        for _, idx in zip(range(args.vae_steps), batches(train.shape[0], args.vae_batch, gen)):
            rows.append(trainer.step(train[idx.to(device)]))
        train_s = time.perf_counter() - start
        warm = rows[5:] or rows
        curves[variant] = [r.score_loss for r in rows]
        model.eval()
        torch.manual_seed(args.seed + 1)
        t0 = time.perf_counter()
        est = estimate_elbo(model.encoder.sample, model.log_likelihood, model.log_prior, test,
                            n_centres=args.elbo_centres, n_select=args.elbo_eval, n_eval=args.elbo_eval,
                            iw_samples=args.iw_samples)
        eval_s = time.perf_counter() - t0
        grid = model.sample(64, torch.Generator(device=device).manual_seed(args.seed)).view(-1, 1, 8, 8)
        png = args.out / f"vae_samples_{variant}.png"
        save_image_grid(grid, png)
        nsteps = [r.solver_nstep for r in warm if r.solver_nstep is not None]
        row = {
            "experiment": "vae", "variant": variant, "score_loss": args.vae_score_loss, "steps": len(rows),
            "score_steps_per_iteration": args.score_steps,
            **est.summary("test_"),
            "final_score_loss": statistics.fmean(r.score_loss for r in rows[-20:]),
            "final_train_recon": statistics.fmean(r.recon for r in rows[-20:]),
            "iteration_ms_during_training": 1000 * statistics.median(r.iteration_seconds for r in warm),
            "score_step_peak_bytes": max(r.score_saved_bytes for r in warm),
            "vae_step_peak_bytes": max(r.vae_saved_bytes for r in warm),
            "memory_kind": "autograd_saved_bytes",
            "score_net_params": count_parameters(model.score),
            "solver_nstep_mean": statistics.fmean(nsteps) if nsteps else None,
            "solver_abs_residual_last": warm[-1].solver_residual,
            "train_seconds": train_s, "eval_seconds": eval_s, "samples_png": str(png),
            "device": str(device),
        }
        results[variant] = row
        emit(row, sink)

    # Time per iteration, measured round-robin after training (wall and this process's CPU time).
    batch = train[:args.vae_batch]
    wall: dict[str, list[float]] = {v: [] for v in trainers}
    cpu: dict[str, list[float]] = {v: [] for v in trainers}
    for _ in range(args.timing_rounds):
        for variant, trainer in trainers.items():
            c0 = time.process_time()
            wall[variant].append(trainer.step(batch).iteration_seconds)
            cpu[variant].append(time.process_time() - c0)
    for variant in trainers:
        results[variant]["iteration_ms"] = 1000 * statistics.median(wall[variant])
        results[variant]["iteration_cpu_ms"] = 1000 * statistics.median(cpu[variant])
    emit({"experiment": "vae_timing", "rounds": args.timing_rounds, "threads": torch.get_num_threads(),
          **{f"{v}_iteration_ms": results[v]["iteration_ms"] for v in trainers},
          **{f"{v}_iteration_cpu_ms": results[v]["iteration_cpu_ms"] for v in trainers}}, sink)
    plot_curves({f"score net {k}": v for k, v in curves.items()}, args.out / "vae_score_loss_curves.png",
                f"VAE score-network loss ({args.vae_score_loss})", sink)
    return results


# ---------------------------------------------------------------------------------------------------
# NCSN
# ---------------------------------------------------------------------------------------------------
def run_ncsn(args, data: dict[str, Tensor], device: torch.device, sink) -> tuple[dict[str, dict], dict]:
    train = data["train_x"].to(device)
    test = data["test_x"].to(device)
    sigmas = geometric_sigmas(args.sigma_max, args.sigma_min, args.sigma_levels)

    t0 = time.perf_counter()
    classifier = None
    if args.fd_extractor != "inception":
        classifier = train_digits_cnn(data["train_x"], data["train_y"], seed=args.seed, epochs=args.classifier_epochs)
    fd = build_frechet_metric(args.fd_extractor, inception_weights=args.inception_weights, classifier=classifier)
    gen = torch.Generator().manual_seed(args.seed + 7)
    n_ref = min(args.samples, train.shape[0])
    train_ref = train[torch.randperm(train.shape[0], generator=gen)[:n_ref]]
    noise_ref = torch.rand(args.samples, 1, 8, 8, generator=gen)
    reference = {
        "experiment": "fd_reference", "metric": fd.name, "note": fd.note,
        "classifier_test_accuracy": classifier_accuracy(classifier, data["test_x"], data["test_y"]) if classifier else None,
        f"{fd.name}_train_vs_test": frechet_distance(fd, test.cpu(), train_ref.cpu()),
        f"{fd.name}_uniform_noise_vs_test": frechet_distance(fd, test.cpu(), noise_ref),
        "n_real": test.shape[0], "n_fake": args.samples, "seconds": time.perf_counter() - t0,
    }
    emit(reference, sink)

    results: dict[str, dict] = {}
    curves: dict[str, list[float]] = {}
    steppers: dict[str, tuple] = {}
    for loss_name in args.ncsn_losses:
        for variant in args.ncsn_variants:
            torch.manual_seed(args.seed)
            gen = torch.Generator().manual_seed(args.seed)
            model = NCSN(1, args.ncsn_channels, variant=variant, depth=args.ncsn_depth, deq=deq_settings(args)).to(device)
            loss_fn = annealed_score_loss(loss_name, sigmas)
            opt = torch.optim.Adam(model.parameters(), lr=args.ncsn_lr)
            params = list(model.parameters())
            losses, times, peaks, nsteps = [], [], [], []
            start = time.perf_counter()
            for step, idx in zip(range(args.ncsn_steps), batches(train.shape[0], args.ncsn_batch, gen)):
                x = train[idx.to(device)]
                opt.zero_grad(set_to_none=True)
                loss, mem = measure_step(lambda: loss_fn(model, x).loss, params, device)
                if not bool(torch.isfinite(loss)):
                    raise FloatingPointError(f"NCSN {variant}/{loss_name}: non-finite loss at step {step + 1}")
                torch.nn.utils.clip_grad_norm_(params, 10.0)
                opt.step()
                losses.append(float(loss))
                if step >= 5:
                    times.append(mem.step_seconds)
                    peaks.append(mem.peak_bytes)
                stats = solver_row(model)
                if stats:
                    nsteps.append(stats["solver_nstep"])
            train_s = time.perf_counter() - start
            model.eval()
            t1 = time.perf_counter()
            sgen = torch.Generator(device=device).manual_seed(args.seed + 11)
            x0 = torch.rand(args.samples, 1, 8, 8, generator=sgen, device=device)
            samples, _ = annealed_langevin(model, x0, sigmas, step_lr=args.langevin_lr,
                                           steps_per_level=args.langevin_steps, clamp=(0.0, 1.0), generator=sgen)
            sample_s = time.perf_counter() - t1
            key = f"{variant}-{loss_name}"
            steppers[key] = (model, loss_fn, opt, params)
            png = args.out / f"ncsn_samples_{variant}_{loss_name}.png"
            save_image_grid(samples[:64], png)
            curves[key] = losses
            row = {
                "experiment": "ncsn", "variant": variant, "loss": loss_name, "steps": len(losses),
                fd.name: frechet_distance(fd, test.cpu(), samples.cpu()),
                "final_train_loss": statistics.fmean(losses[-20:]),
                "step_ms_during_training": 1000 * statistics.median(times) if times else None,
                "peak_bytes": max(peaks) if peaks else None, "memory_kind": memory_kind(device),
                "params": count_parameters(model),
                "solver_nstep_mean": statistics.fmean(nsteps) if nsteps else None,
                "train_seconds": train_s, "sampling_seconds": sample_s,
                "langevin": {"levels": len(sigmas), "sigma_max": sigmas[0], "sigma_min": sigmas[-1],
                             "steps_per_level": args.langevin_steps, "step_lr": args.langevin_lr},
                "samples_png": str(png), "device": str(device),
            }
            results[key] = row
            emit(row, sink)

    batch = train[:args.ncsn_batch]
    wall: dict[str, list[float]] = {k: [] for k in steppers}
    cpu: dict[str, list[float]] = {k: [] for k in steppers}
    for _ in range(args.timing_rounds):
        for key, (model, loss_fn, opt, params) in steppers.items():
            model.train()
            opt.zero_grad(set_to_none=True)
            c0 = time.process_time()
            _, mem = measure_step(lambda: loss_fn(model, batch).loss, params, device)
            opt.step()
            cpu[key].append(time.process_time() - c0)
            wall[key].append(mem.step_seconds)
    for key in steppers:
        results[key]["step_ms"] = 1000 * statistics.median(wall[key])
        results[key]["step_cpu_ms"] = 1000 * statistics.median(cpu[key])
    emit({"experiment": "ncsn_timing", "rounds": args.timing_rounds, "threads": torch.get_num_threads(),
          **{f"{k}_step_ms": results[k]["step_ms"] for k in steppers},
          **{f"{k}_step_cpu_ms": results[k]["step_cpu_ms"] for k in steppers}}, sink)
    plot_curves(curves, args.out / "ncsn_loss_curves.png", "NCSN training loss (annealed, σ²-weighted)", sink,
                group_by_suffix=True)
    return results, reference


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
                v: {"elbo_diff_deq_minus": deq["test_elbo"] - r["test_elbo"],
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
