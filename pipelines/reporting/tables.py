"""The report's tables: one per experiment (a row per variant, headed by the family's headline metric) and
the gradient-fidelity table, as Markdown (with footnotes saying what each column counts) and CSV."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from pipelines.reporting.inputs import MEMORY_KINDS, MIB, ExperimentData, number
from pipelines.reporting.verdicts import Estimate, estimate, se_words
from pipelines.settings import ExperimentSettings

DASH = "—"


def fmt(value: Any, spec: str) -> str:
    v = number(value)
    return DASH if v is None else format(v, spec)


def loss_label(spec: ExperimentSettings) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in sorted(spec.loss.options.items()))
    return f"{spec.loss.name} ({opts})" if opts else spec.loss.name



def density_key(key: str) -> bool:
    return key == "test_loglik"


def table_rows(data: ExperimentData) -> list[dict[str, Any]]:
    """One row per variant (× the experiment's loss): raw values, None where unknown."""
    rows = []
    main = data.headline()
    for variant in data.variants():
        m = data.metrics.get(variant)
        curve = data.curves.get(variant)
        g = (lambda k: number(m.get(k))) if m is not None else (lambda k: None)  # noqa: E731
        residual, nstep_mean, residual_max, solver_source = None, g("solver_nstep_mean"), g("solver_residual_max"), ""
        if curve is not None:
            _, res = curve.residuals()
            _, nsteps = curve.nsteps()
            residual = res[-1] if res else None
            # metrics.json has the per-step solver summary only when training recorded it; otherwise the
            # curve's logged steps (a subsample of the training steps) stand in for it
            if m is not None and nstep_mean is None and nsteps:
                nstep_mean, solver_source = sum(nsteps) / len(nsteps), "curve"
            if m is not None and residual_max is None and res:
                residual_max, solver_source = max(res), "curve"
        if not solver_source and (nstep_mean is not None or residual_max is not None):
            solver_source = "metrics"
        est, loglik = estimate(m, main.key), estimate(m, "test_loglik")
        kid = next((k for k in sorted(m or {}) if k.startswith("kid_") and not k.endswith(("_std", "_train_vs_test"))), None)
        peak = g("peak_bytes")
        score_peak = g("score_step_peak_bytes")
        rows.append({
            "main_metric": main.key, "main_value": est.value, "main_se": est.se, "main_se_kind": est.se_kind,
            "main_ci_low": est.low, "main_ci_high": est.high, "main_unreliable": est.unreliable or "",
            "test_elbo": g("test_elbo"), "test_iw_loglik": g("test_iw_loglik"),
            "fd_train_vs_test": g(f"{main.key}_train_vs_test") if not main.higher_is_better else None,
            "fd_train_vs_test_ci_low": g(f"{main.key}_train_vs_test_ci_low"),
            "fd_train_vs_test_ci_high": g(f"{main.key}_train_vs_test_ci_high"),
            "kid_metric": kid or "", "kid": g(kid) if kid else None, "kid_std": g(f"{kid}_std") if kid else None,
            "kid_se": g(f"{kid}_se_seeds") if kid else None,
            "kid_train_vs_test": g(f"{kid}_train_vs_test") if kid else None,
            "test_is_ess": g("test_is_ess"),
            "score_step_peak_mib": score_peak / MIB if score_peak is not None else None,
            "experiment": data.name, "variant": variant, "kind": data.kind(variant) or "",
            "depth": data.depth(variant), "loss": loss_label(data.spec), "status": "ok" if m is not None else "no metrics",
            "test_loglik": loglik.value, "test_loglik_se": loglik.se, "se_kind": loglik.se_kind,
            "test_bpd": g("test_bpd"), "peak_mib": peak / MIB if peak is not None else None,
            "peak_bytes": peak, "memory_kind": (m or {}).get("memory_kind") or "",
            "step_ms_median": g("step_ms_median"), "params": g("params"),
            "solver_nstep_mean": nstep_mean, "solver_final_residual": residual,
            "solver_residual_max": residual_max, "solver_source": solver_source, "test_ssm_loss": g("test_ssm_loss"),
            "test_sm_loss": g("test_sm_loss"), "test_loss": g("test_loss"), "fisher_divergence": g("fisher_divergence"),
            "train_steps": g("train_steps"), "train_best_val_loss": g("train_best_val_loss"),
            "n_seeds": g("n_seeds"), "true_test_loglik": g("true_test_loglik"),
            "gap_to_truth": (g("true_test_loglik") - est.value if density_key(main.key) and est.value is not None
                             and g("true_test_loglik") is not None else None),
        })
    return rows



CSV_COLUMNS = ["experiment", "variant", "kind", "depth", "loss", "status", "main_metric", "main_value", "main_se",
               "main_se_kind", "main_ci_low", "main_ci_high", "main_unreliable",
               "test_loglik", "test_loglik_se", "se_kind", "test_is_ess", "test_elbo", "test_iw_loglik",
               "fd_train_vs_test", "fd_train_vs_test_ci_low", "fd_train_vs_test_ci_high", "kid_metric", "kid",
               "kid_std", "kid_se", "kid_train_vs_test",
               "score_step_peak_mib", "test_bpd", "peak_mib", "peak_bytes", "memory_kind", "step_ms_median", "params", "solver_nstep_mean",
               "solver_final_residual", "solver_residual_max", "solver_source", "test_ssm_loss", "test_sm_loss", "test_loss",
               "fisher_divergence", "train_steps", "train_best_val_loss", "n_seeds",
               "true_test_loglik", "gap_to_truth"]



def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})



def md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)



def experiment_table_md(data: ExperimentData, rows: list[dict[str, Any]]) -> str:
    """The experiment's table in Markdown, with footnotes saying what the columns count."""
    kinds = sorted({r["memory_kind"] for r in rows if r["memory_kind"]})
    se_kinds = sorted({r["main_se_kind"] for r in rows if r["main_se_kind"]})
    extra = [(k, label) for k, label in (("test_sm_loss", "test SM loss"), ("fisher_divergence", "Fisher divergence"))
             if any(r[k] is not None for r in rows)]
    main = data.headline()
    density = main.key == "test_loglik"
    iw_headline = main.key == "test_iw_loglik"
    fd = not main.higher_is_better
    has = lambda k: any(r[k] is not None for r in rows)  # noqa: E731
    score_mem = has("score_step_peak_mib")
    kid = next((r["kid_metric"] for r in rows if r["kid_metric"]), "") if fd else ""
    kid_seeds = has("kid_se")  # ± the standard error across seeds, else one seed's std over subsets
    kid_col = f"{kid} ± {'se' if kid_seeds else 'std'}"
    side = [*(["gap to the true log-likelihood"] if density and has("gap_to_truth") else []),
            *(["bits/dim"] if density and has("test_bpd") else []), *(["IS effective samples"] if has("test_is_ess") else []),
            *(["KDE ELBO (diagnostic, biased up)"] if iw_headline and has("test_elbo") else []),
            *(["train-vs-test FD (floor)"] if fd and has("fd_train_vs_test") else []),
            *([kid_col, "train-vs-test KID"] if kid else [])]
    header = ["variant", "loss", "seeds", main.label, *side,
              "peak memory (MiB)", *(["score-net step memory (MiB)"] if score_mem else []), "ms/step", "parameters",
              "solver steps", "final residual", *(["test SSM loss"] if density else []), *(label for _, label in extra),
              "train steps"]
    spec = ".3f" if main.higher_is_better else ".2f"
    body = []
    for r in rows:
        value = Estimate(r["main_value"], r["main_se"], r["main_se_kind"], r["main_ci_low"], r["main_ci_high"],
                         r["main_unreliable"] or None).cell(spec)
        floor = Estimate(r["fd_train_vs_test"], low=r["fd_train_vs_test_ci_low"],
                         high=r["fd_train_vs_test_ci_high"]).cell(spec)
        cells = {"gap to the true log-likelihood": fmt(r["gap_to_truth"], ".3f"), "bits/dim": fmt(r["test_bpd"], ".3f"), "IS effective samples": fmt(r["test_is_ess"], ",.0f"),
                 "KDE ELBO (diagnostic, biased up)": fmt(r["test_elbo"], ".3f"), "train-vs-test FD (floor)": floor,
                 kid_col: Estimate(r["kid"], r["kid_se"] if kid_seeds else r["kid_std"]).cell(".4g"),
                 "train-vs-test KID": fmt(r["kid_train_vs_test"], ".4g")}
        mem = fmt(r["peak_mib"], ".3f")
        if len(kinds) > 1 and mem != DASH:
            mem += f" ({r['memory_kind']})"
        name = r["variant"] + (f" (depth {r['depth']})" if r["depth"] is not None else " (DEQ)" if r["kind"] == "deq" else "")
        body.append([name, r["loss"], fmt(r["n_seeds"], ".0f"), value, *(cells[c] for c in side),
                     mem, *([fmt(r["score_step_peak_mib"], ".3f")] if score_mem else []), fmt(r["step_ms_median"], ".1f"),
                     fmt(r["params"], ",.0f"), fmt(r["solver_nstep_mean"], ".1f"), fmt(r["solver_final_residual"], ".2e"),
                     *([fmt(r["test_ssm_loss"], ".4g")] if density else []), *(fmt(r[k], ".4g") for k, _ in extra),
                     fmt(r["train_steps"], ".0f")])
    notes = [f"Experiment `{data.name}`: dataset `{data.spec.dataset}`, model `{data.spec.model}`, "
             f"loss `{loss_label(data.spec)}`. {DASH}: not measured for that variant. Every figure is the mean over "
             "the variant's training seeds (`seeds`: how many; each seed a model trained from its own "
             "initialisation and batch order, evaluated on the same test data)."]
    if density and has("gap_to_truth"):
        truth = next(r["true_test_loglik"] for r in rows if r["true_test_loglik"] is not None)
        notes.append(f"Gap to the true log-likelihood: the data's own density (generated data) scores {truth:.3f} "
                     "on the same test rows; the gap is that minus the variant's test log-likelihood (0 for a perfect "
                     "model, in nats).")
    if density and has("test_bpd"):
        notes.append("Bits/dim: of the discrete pixels (the dequantisation bound −log₂ P(x) per pixel, with the pixel "
                     "levels and logit α of the prepared dataset's manifest), the figure the literature reports for "
                     "NICE; the test log-likelihood beside it is the density of the logit-transformed data.")
    if iw_headline:
        notes.append("Test log-likelihood bound: the importance-weighted bound log (1/K) Σ_k p(x, z_k) / r(z_k | x) "
                     "with a proposal r fitted per test x to the implicit encoder's samples (`deqsm.metrics.elbo`): "
                     "a lower bound on log p(x) in expectation, whatever r is. The KDE ELBO beside it plugs a kernel "
                     "density estimate into the encoder's entropy, a cross-entropy that is biased upwards by "
                     "KL(q ‖ q̂): a diagnostic, never ranked. Peak memory is the whole training step (score network and "
                     "VAE); score-net step memory is one score-network step, the part the variants differ in (the "
                     "paper's Table 1).")
    elif fd:
        notes.append(f"`{main.key}`: Fréchet distance between annealed-Langevin samples and the test images "
                     f"(features: {'Inception-v3' if main.key.startswith('fid_') else 'a digits classifier trained on the training split'}; "
                     "covariances not rescaled); [low, high]: an interval (level `fd_ci_level`, default 90%) for the "
                     "distance a second, independent set of samples of the same size would score (bootstrap of the "
                     "samples, test images fixed; `deqsm.metrics.sample_distances`); with several seeds the FD is their "
                     "mean ± the standard error across them, and the interval is shown for the floor only. The "
                     "train-vs-test FD is the same distance between training and test images at the same sample size: "
                     "the floor a perfect sampler would score." + (
                         f" {kid}: the kernel inception distance (torchmetrics) on the same features, unbiased at "
                         "small sample sizes; ± " + ("the standard error across seeds." if kid_seeds else
                                                    "its standard deviation over subsets.") if kid else ""))
    for r in rows:
        if r["main_unreliable"]:
            notes.append(f"`{r['variant']}` (unreliable): {r['main_unreliable']}; its {main.key} is shown, never ranked.")
    for k in kinds:
        notes.append(f"Peak memory counts `{k}`: {MEMORY_KINDS.get(k, 'as named')}.")
    for k in se_kinds:
        notes.append(f"± is `{k}`: {se_words(k)}.")
    notes.append("Solver steps: mean DEQ solver iterations per training step; final residual: the largest "
                 "absolute residual ‖f(z) − z‖ of the last logged training step (over DEQ layers).")
    from_curve = [r["variant"] for r in rows if r["solver_source"] == "curve"]
    if from_curve:
        notes.append(f"Solver steps of {', '.join(from_curve)}: averaged over the training curve's logged steps "
                     "(metrics.json has no solver_nstep_mean / solver_residual_max for them).")
    missing = [r["variant"] for r in rows if r["status"] != "ok"]
    if missing:
        notes.append(f"No metrics for {', '.join(missing)} (not in metrics.json: see the tuning section).")
    return md_table(header, body) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"



FIDELITY_COLUMNS = ["experiment", "variant", "k", "grad_cosine", "grad_rel_error", "score_rel_error", "rows", "loss",
                    "trained_backward"]


def fidelity_table_rows(fidelity: dict[str, dict]) -> list[dict[str, Any]]:
    return [{"experiment": exp, "variant": v, "k": r["k"], "grad_cosine": r.get("grad_cosine"),
             "grad_rel_error": r.get("grad_rel_error"), "score_rel_error": r.get("score_rel_error"),
             "rows": entry["rows"], "loss": entry["loss"], "trained_backward": entry["trained_backward"]}
            for exp, by_variant in fidelity.items() for v, entry in by_variant.items() for r in entry["results"]]


def fidelity_table_md(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "No experiment has a DEQ variant: nothing to compare.\n"
    body = [[f"{r['experiment']}/{r['variant']}", r["loss"], str(r["k"]), fmt(r["grad_cosine"], ".5f"),
             fmt(r["grad_rel_error"], ".3e"), fmt(r["score_rel_error"], ".3e"), str(r["rows"])] for r in rows]
    return (md_table(["model", "loss", "K", "cos(phantom, exact)", "gradient rel. error", "score rel. error",
                      "test rows"], body)
            + "\n\n- Exact: the differentiable `implicit` backward mode; phantom: K damped fixed-point steps. Both "
              "differentiate the same loss on the same rows with the same random projections.\n"
              "- Score rel. error: ‖s_phantom − s_exact‖ / ‖s_exact‖ with s = −∇ₓE (the phantom steps also "
              "change the forward output slightly).\n")

