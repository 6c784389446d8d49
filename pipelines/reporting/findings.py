"""The report's findings: sentences computed from the numbers (memory against depth, each DEQ against each
explicit variant on the family's headline metric, solver convergence, gradient fidelity) and the caveats
that qualify them. Each finder also returns the numbers it judged, which are logged to MLflow."""
from __future__ import annotations

from typing import Any

from pipelines.reporting.convergence import experiment_convergence
from pipelines.reporting.inputs import MIB, ExperimentData, MemoryBench, number
from pipelines.reporting.tables import fmt
from pipelines.reporting.verdicts import compare, estimate
from deqsm.models.density import DensityEvalOptions
from pipelines.settings import Settings
from pipelines.trials import experiment_eval_options

PAPER_BENCH_SIZE = (784, 1000, 128)  # input, width, batch of the paper's memory comparison


def depth_matching(bench: MemoryBench, peak: float) -> float | None:
    """The explicit depth whose memory equals ``peak`` (linear interpolation between measured depths)."""
    pts = [(d, float(r["peak_bytes"])) for d, r in bench.explicit()]
    for (d0, b0), (d1, b1) in zip(pts, pts[1:]):
        if b0 <= peak <= b1 and b1 > b0:
            return d0 + (d1 - d0) * (peak - b0) / (b1 - b0)
    if pts and peak < pts[0][1] and pts[0][1] > 0:
        return pts[0][0] * peak / pts[0][1]
    return None



def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def memory_findings(bench: MemoryBench) -> tuple[list[str], dict[str, float]]:
    lines, numbers = [], {}
    explicit, deq = bench.explicit(), bench.deq()
    if not explicit or not deq:
        return [f"The memory benchmark has no {'explicit' if not explicit else 'DEQ'} rows: no memory comparison."], numbers
    deepest_d, deepest = explicit[-1]
    for backward, runs in sorted(deq.items()):
        peaks = [float(r["peak_bytes"]) for r in runs]
        spread = (max(peaks) - min(peaks)) / min(peaks) if min(peaks) > 0 else float("nan")
        iters = ", ".join(str(r["solver_iters"]) for r in runs)
        frac = max(peaks) / float(deepest["peak_bytes"])
        numbers[f"bench_deq_{backward}_over_explicit{deepest_d}_memory"] = frac
        numbers[f"bench_deq_{backward}_memory_spread"] = spread
        flat = "stays flat" if spread <= 0.03 else "grows"
        text = (f"Benchmark, DEQ with `{backward}` backward: its memory {flat} over {iters} solver iterations "
                f"(spread {pct(spread)}); at most {max(peaks) / MIB:.3f} MiB, {pct(frac)} of the explicit "
                f"depth-{deepest_d} net's {float(deepest['peak_bytes']) / MIB:.3f} MiB")
        d_eq = depth_matching(bench, max(peaks))
        if d_eq is not None:
            text += f"; the same memory as an explicit net of depth ≈ {d_eq:.1f}"
            numbers[f"bench_deq_{backward}_memory_matched_depth"] = d_eq
        lines.append(text + ".")
    return lines, numbers


def experiment_findings(data: ExperimentData, rows: list[dict[str, Any]], deq_tol: float) -> tuple[list[str], dict[str, float]]:
    by = {r["variant"]: r for r in rows}
    lines, numbers = [], {}
    deqs, explicits = data.deq_variants(), data.explicit_variants()
    if not deqs:
        return [f"`{data.name}` has no DEQ variant with metrics: nothing to compare."], numbers
    if not explicits:
        return [f"`{data.name}` has no explicit variant with metrics: nothing to compare the DEQ with."], numbers
    for dv in deqs:
        d = by[dv]
        deepest = by[explicits[-1]]
        if d["peak_bytes"] is not None and deepest["peak_bytes"]:
            frac = d["peak_bytes"] / deepest["peak_bytes"]
            numbers[f"{dv}_over_{deepest['variant']}_memory"] = frac
            text = (f"`{data.name}`: `{dv}` uses {pct(frac)} of the memory of the deepest explicit variant with metrics "
                    f"`{deepest['variant']}` ({d['peak_mib']:.3f} vs {deepest['peak_mib']:.3f} MiB, {d['memory_kind']})")
            if d["step_ms_median"] is not None and deepest["step_ms_median"]:
                t = d["step_ms_median"] / deepest["step_ms_median"]
                numbers[f"{dv}_over_{deepest['variant']}_step_time"] = t
                text += f" at {t:.2f}× its time per step"
            lines.append(text + ".")
        if d["score_step_peak_mib"] is not None and deepest["score_step_peak_mib"]:
            frac = d["score_step_peak_mib"] / deepest["score_step_peak_mib"]
            numbers[f"{dv}_over_{deepest['variant']}_score_step_memory"] = frac
            lines.append(f"`{data.name}`: `{dv}`'s score-network step uses {pct(frac)} of the memory of "
                         f"`{deepest['variant']}`'s ({d['score_step_peak_mib']:.3f} vs "
                         f"{deepest['score_step_peak_mib']:.3f} MiB).")
        main = data.headline()
        for ev in explicits:
            line, diff = compare(data.name, dv, estimate(data.metrics.get(dv), main.key),
                                 ev, estimate(data.metrics.get(ev), main.key), main)
            lines.append(line)
            if diff is not None:
                numbers[f"{dv}_minus_{ev}_{main.key}"] = diff
        if d["solver_residual_max"] is not None:
            reached = d["solver_residual_max"] <= deq_tol
            lines.append(f"`{data.name}`: `{dv}`'s solver {'always reached' if reached else 'did not always reach'} "
                         f"deq.tol = {deq_tol:g} during training (largest residual {d['solver_residual_max']:.2e}, "
                         f"{fmt(d['solver_nstep_mean'], '.1f')} iterations per step on average).")
    return lines, numbers


def fidelity_findings(fidelity: dict[str, dict]) -> tuple[list[str], dict[str, float]]:
    lines, numbers = [], {}
    for exp, by_variant in fidelity.items():
        for variant, entry in by_variant.items():
            res = entry["results"]
            if not res:
                continue
            first, last = res[0], res[-1]
            for r in res:
                numbers[f"{variant}_fidelity_k{r['k']}_grad_cosine"] = r["grad_cosine"]
            text = (f"`{exp}/{variant}`: the phantom gradient's cosine with the exact one is {first['grad_cosine']:.4f} "
                    f"at K = {first['k']} and {last['grad_cosine']:.4f} at K = {last['k']} (relative error "
                    f"{first['grad_rel_error']:.2e} → {last['grad_rel_error']:.2e})")
            if "score_rel_error" in last:
                text += f"; score relative error {last['score_rel_error']:.2e} at K = {last['k']}"
            k_tr = entry["trained_k"]
            at_k = next((r for r in res if r["k"] == k_tr), None)
            if entry["trained_backward"] == "phantom" and at_k is not None:
                text += f". Trained with phantom K = {k_tr}: cosine {at_k['grad_cosine']:.4f}"
            lines.append(text + ".")
    return lines, numbers


def caveats(s: Settings, datas: list[ExperimentData], all_rows: dict[str, list[dict]], bench: MemoryBench) -> list[str]:
    out = []
    kinds = sorted({r["memory_kind"] for rows in all_rows.values() for r in rows if r["memory_kind"]} | {bench.memory_kind})
    if "autograd_saved_bytes" in kinds:
        out.append("Memory marked `autograd_saved_bytes` is what autograd keeps for backward (a CPU-side, "
                   "deterministic count), not an allocator peak; the CUDA peak comes from "
                   "`bash benchmarks/gpu_check.sh` on a GPU.")
    if (s.bench.in_dim, s.bench.width, s.bench.batch) != PAPER_BENCH_SIZE:
        out.append(f"The memory benchmark ran at input {s.bench.in_dim}, width {s.bench.width}, batch {s.bench.batch} "
                   f"(params.yaml's bench section); `dvc exp run -S bench.in_dim=784 -S bench.width=1000 "
                   "-S bench.batch=128` measures the paper's size.")
    seeds = s.train.seed_values(s.base.seed)
    if len(seeds) > 1:
        out.append(f"Every figure is a mean over {len(seeds)} training seeds ({', '.join(map(str, seeds))}; "
                   "train.seeds) and every ± its standard error across them; verdicts are Welch t comparisons of "
                   f"those means. With {len(seeds)} seeds a standard error is itself rough (it rests on "
                   f"{len(seeds) - 1} degrees of freedom), which the t quantile in each verdict accounts for.")
    else:
        out.append(f"Every ± and interval is an evaluation error (Monte-Carlo draws, test rows, sample draws) of one "
                   f"trained model per variant (train.seeds = 1, base.seed = {s.base.seed}): seed-to-seed variation "
                   "of training is not in them, so a verdict says the evaluation separates the two models, not that "
                   "retraining would.")
    for data in datas:
        states = experiment_convergence(data)
        degenerate = [(v, c) for v, c in states if c["verdict"] == "degenerate"]
        if degenerate:
            out.append(f"`{data.name}`: degenerate score matching — " + "; ".join(
                f"`{v}` in {c['n_degenerate']}/{c['n_watched']} seeds" for v, c in degenerate)
                + ": the loss fell below the data's floor −½E‖∇log p‖² (deqsm.floor), where it has no lower bound; "
                "those models' test figures are not a better fit (see the convergence table).")
        unsettled = [(v, c) for v, c in states if c["verdict"] not in ("converged", "degenerate")]
        if unsettled:
            tr = s.experiment_train(data.name) if data.name in s.experiments else s.train.fit_settings()
            out.append(f"`{data.name}`: not every variant trained until trained — " + "; ".join(
                f"`{v}` {c['verdict']}, {c['n_converged']}/{c['n']} seeds stopped on a plateau" for v, c in unsettled)
                + f". Step cap {tr['steps']}, patience {tr['patience']}, min_delta {tr['min_delta']:g} (the train "
                f"section, or experiments.{data.name}.train where it sets them): a difference to those variants may "
                "reflect optimisation speed as much as the model (see the convergence table; "
                "profiles/cpu-converged.yaml raises the cap).")
        ess = [number(m.get("test_is_ess")) for m in data.metrics.values()]
        ess = [e for e in ess if e is not None]
        if ess:
            opts = DensityEvalOptions(**{k: v for k, v in experiment_eval_options(s, data.name).items()
                                         if k in DensityEvalOptions.model_fields})
            proposal = ("a kernel density estimate of the training rows mixed with N(0, "
                        f"{opts.is_scale:g}² I)" if opts.is_proposal == "data" else f"N(0, {opts.is_scale:g}² I)")
            out.append(f"`{data.name}`: log-likelihoods use an importance-sampled log Z ({opts.is_samples} samples "
                       f"from {proposal}; effective sample size {min(ess):.0f}–{max(ess):.0f}; below "
                       f"is_ess_floor = {opts.is_ess_floor:g} a log-likelihood is marked unreliable and not ranked); "
                       "the paper uses 10⁶ samples.")
        missing = [r["variant"] for r in all_rows[data.name] if r["status"] != "ok"]
        if missing:
            out.append(f"`{data.name}`: no metrics for {', '.join(missing)}.")
        if data.tune and data.tune.get("failed"):
            failed = {v: len(r) if isinstance(r, list) else 1 for v, r in data.tune["failed"].items() if r}
            if failed:
                out.append(f"`{data.name}`: failed tuning trials — " + ", ".join(f"{v}: {n}" for v, n in sorted(failed.items())) + ".")
    return out

