"""DVC stage `report`: the paper-style tables, the figures and ``REPORT.md``, from what the earlier stages wrote.

Reads, per experiment of params.yaml:

- ``<results>/experiments/<experiment>/metrics.json`` (evaluate stage): ``{variant: {metric: value}}``;
- ``<results>/experiments/<experiment>/curves/<variant>.csv`` (train stage): the training curves;
- ``<out>/tune/<experiment>/best.json`` (tune stage; optional): trials, failures, best samples;
- ``<out>/models/<experiment>/<variant>.pt`` (train stage) of every DEQ variant: for the gradient fidelity;

and the memory-vs-depth benchmark ``<out>/benchmarks/memory_depth.jsonl`` (``make bench``). When that file
is absent the stage runs ``benchmarks/memory_depth.py`` itself at a small CPU size (about 15 s on 2 cores;
the report says so), so the memory figures always exist.

Writes, under ``--out-dir`` (default: params.yaml's ``base.results``; a folder apart from the inputs lets
DVC declare ``<results>`` as one dependency, which cannot contain the stage's own outputs):

- ``tables/<experiment>.md`` / ``.csv``: one row per variant (its loss; test log-likelihood ± standard
  error, bits/dim, peak memory in MiB and what it counts, ms per step, parameters, solver steps, final
  solver residual, test SSM loss, ...); ``tables/fidelity.md`` / ``.csv``;
- ``figures/``: ``memory_depth.png``, ``memory_iters.png``, ``training_<experiment>.png``,
  ``residual_<experiment>.png``, ``fidelity.png``;
- ``plots/``: the figures' data as CSV for ``dvc plots`` (``memory_depth.csv``, ``memory_iters.csv``,
  ``<experiment>_train_loss.csv``, ``<experiment>_val_loss.csv``, ``<experiment>_residual.csv``,
  ``fidelity_cosine.csv``) and ``memory_depth.jsonl`` (the benchmark rows used);
- ``fidelity.json``: per DEQ variant, cosine(phantom-K gradient, exact implicit gradient), their relative
  error and the relative error of the score, K = 1, 2, 4, 8 (:func:`deqsm.fidelity.gradient_fidelity`);
- ``REPORT.md``: all of it, with a "what to conclude / caveats" section computed from the numbers;

and logs REPORT.md, the tables, fidelity.json and the figures as artifacts of a run named ``report``
(tag ``stage=report``) in each experiment's MLflow experiment. A failure to log is an error.

Relative paths (base.out, base.results, data.root, a relative SQLite tracking URI) start at the folder
of the params file, as in every stage; ``--root`` takes them from another folder.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from pipelines.settings import ROOT, ExperimentSettings, ParamsError, Settings, load_params, main_guard

DASH = "—"
MIB = 2.0 ** 20
FIDELITY_K = (1, 2, 4, 8)
MEMORY_KINDS = {
    "autograd_saved_bytes": "bytes of the tensors autograd keeps for backward at the end of the loss "
                            "computation, parameters excluded (deterministic; the CPU measure)",
    "cuda_max_memory_allocated": "torch.cuda.max_memory_allocated over the training step, minus what was "
                                 "allocated when it began",
}
# The memory benchmark at a size that takes a few seconds on 2 CPU cores (the same code paths as the
# GPU-sized run; saved bytes scale with width × batch, so the ratios keep their meaning).
BENCH_CPU_ARGS = ("--device", "cpu", "--in-dim", "32", "--width", "64", "--batch", "16",
                  "--depths", "1", "2", "4", "8", "16", "32", "--iters", "5", "10", "20",
                  "--backwards", "phantom", "implicit", "unroll", "--repeats", "1")


class ReportError(ValueError):
    """An input of the report is missing or malformed, or logging to MLflow failed; the message says which."""


def log(message: str) -> None:
    print(f"report: {message}", flush=True)


# ------------------------------------------------------------------------------------------------------
# where things are
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """The report's inputs and outputs: params.yaml's folders resolved against ``root``."""

    settings: Settings
    root: Path
    out_dir: Path | None = None  # where the report's own files go; None: <base.results>

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def output(self) -> Path:
        return self.out_dir if self.out_dir is not None else self.results

    @property
    def results(self) -> Path:
        return self.path(self.settings.base.results)

    @property
    def out(self) -> Path:
        return self.path(self.settings.base.out)

    def metrics(self, experiment: str) -> Path:
        return self.results / "experiments" / experiment / "metrics.json"

    def curve(self, experiment: str, variant: str) -> Path:
        return self.results / "experiments" / experiment / "curves" / f"{variant}.csv"

    def tune_best(self, experiment: str) -> Path:
        return self.out / "tune" / experiment / "best.json"

    def model(self, experiment: str, variant: str) -> Path:
        return self.out / "models" / experiment / f"{variant}.pt"

    @property
    def data_root(self) -> Path:
        return self.path(self.settings.data.root)

    @property
    def tables(self) -> Path:
        return self.output / "tables"

    @property
    def figures(self) -> Path:
        return self.output / "figures"

    @property
    def plots(self) -> Path:
        return self.output / "plots"

    @property
    def fidelity(self) -> Path:
        return self.output / "fidelity.json"

    @property
    def report(self) -> Path:
        return self.output / "REPORT.md"

    def tracking_uri(self) -> str:
        """params.yaml's tracking URI, a relative SQLite path taken from ``root``."""
        uri = self.settings.tracking.uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return "sqlite:///" + str(self.root / uri[len("sqlite:///"):])
        return uri

    def rel(self, path: Path) -> str:
        """``path`` relative to the report's folder (links inside REPORT.md)."""
        return Path(os.path.relpath(path, self.output)).as_posix()


# ------------------------------------------------------------------------------------------------------
# reading the inputs
# ------------------------------------------------------------------------------------------------------
def number(value: Any) -> float | None:
    """A finite float, or None (missing, null, blank, NaN, inf, not a number)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def read_metrics(layout: Layout, experiment: str) -> dict[str, dict[str, Any]]:
    path = layout.metrics(experiment)
    if not path.exists():
        raise ReportError(f"{path} is missing: run the evaluate stage first (dvc repro evaluate@{experiment})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is not valid JSON ({err}): re-run dvc repro evaluate@{experiment}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ReportError(f"{path} must map variant names to {{metric: value}} objects")
    return data


class Curve:
    """One training curve (the train stage's CSV: a header that is the union of the logged keys; blanks
    where a row lacks a key)."""

    def __init__(self, path: Path, rows: list[dict[str, float | None]], columns: list[str]) -> None:
        self.path, self.rows, self.columns = path, rows, columns

    @classmethod
    def read(cls, path: Path) -> "Curve":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = [{k: number(v) for k, v in row.items() if k is not None} for row in reader]
        if "step" not in columns:
            raise ReportError(f"{path} has no 'step' column (columns: {', '.join(columns) or 'none'})")
        return cls(path, rows, columns)

    @property
    def loss_key(self) -> str | None:
        return next((k for k in ("train_loss", "loss") if k in self.columns), None)

    def series(self, key: str | None) -> tuple[list[float], list[float]]:
        """(steps, values) of the rows that hold ``key``."""
        pts = [(r["step"], r[key]) for r in self.rows if key and r.get("step") is not None and r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    def solver_series(self, suffix: str, reduce: Callable[[list[float]], float]) -> tuple[list[float], list[float]]:
        """(steps, reduce(values)) over every DEQ layer's ``solver*<suffix>`` column, per row."""
        cols = [c for c in self.columns if c.startswith("solver") and c.endswith(suffix)]
        steps, values = [], []
        for r in self.rows:
            vals = [r[c] for c in cols if r.get(c) is not None]
            if vals and r.get("step") is not None:
                steps.append(r["step"])
                values.append(reduce(vals))
        return steps, values

    def residuals(self) -> tuple[list[float], list[float]]:
        return self.solver_series("_abs_residual_max", max)

    def nsteps(self) -> tuple[list[float], list[float]]:
        return self.solver_series("_nstep", lambda v: sum(v) / len(v))


@dataclass
class ExperimentData:
    """Everything the report knows about one experiment."""

    name: str
    spec: ExperimentSettings
    metrics: dict[str, dict[str, Any]]
    curves: dict[str, Curve]
    tune: dict[str, Any] | None

    def variants(self) -> list[str]:
        """params.yaml's variants first (in its order), then any other variant found in metrics.json."""
        return list(self.spec.variants) + [v for v in self.metrics if v not in self.spec.variants]

    def kind(self, variant: str) -> str | None:
        v = self.spec.variants.get(variant)
        return v.variant if v is not None else None

    def depth(self, variant: str) -> int | None:
        v = self.spec.variants.get(variant)
        return v.depth if v is not None and v.variant == "explicit" else None

    def deq_variants(self) -> list[str]:
        return [v for v in self.variants() if self.kind(v) == "deq" and v in self.metrics]

    def explicit_variants(self) -> list[str]:
        """Explicit variants with metrics, deepest last."""
        return sorted((v for v in self.variants() if self.kind(v) == "explicit" and v in self.metrics),
                      key=lambda v: (self.depth(v) or 0, v))


def read_experiment(layout: Layout, name: str) -> ExperimentData:
    spec = layout.settings.experiments[name]
    metrics = read_metrics(layout, name)
    curves = {}
    for variant in metrics:
        path = layout.curve(name, variant)
        if not path.exists():
            raise ReportError(f"{path} is missing (metrics.json has variant {variant!r}): run the train stage "
                              f"(dvc repro train@{name})")
        curves[variant] = Curve.read(path)
    tune = None
    best = layout.tune_best(name)
    if best.exists():
        try:
            tune = json.loads(best.read_text())
        except json.JSONDecodeError as err:
            raise ReportError(f"{best} is not valid JSON ({err}): re-run dvc repro tune") from None
    for variant in metrics:
        if spec.variants.get(variant) is not None and spec.variants[variant].variant == "deq":
            model = layout.model(name, variant)
            if not model.exists():
                raise ReportError(f"{model} is missing (the gradient fidelity needs the trained DEQ): run the "
                                  f"train stage (dvc repro train@{name})")
    return ExperimentData(name, spec, metrics, curves, tune)


# ------------------------------------------------------------------------------------------------------
# the memory-vs-depth benchmark
# ------------------------------------------------------------------------------------------------------
@dataclass
class MemoryBench:
    rows: list[dict[str, Any]]
    source: str  # what produced the rows, in words

    def explicit(self) -> list[tuple[int, dict]]:
        out = []
        for r in self.rows:
            name = str(r.get("variant", ""))
            if name.startswith("explicit-") and name[len("explicit-"):].isdigit():
                out.append((int(name[len("explicit-"):]), r))
        return sorted(out, key=lambda t: t[0])

    def deq(self) -> dict[str, list[dict]]:
        """backward mode → rows sorted by solver iterations."""
        out: dict[str, list[dict]] = {}
        for r in self.rows:
            name = str(r.get("variant", ""))
            if name.startswith("deq-") and r.get("solver_iters") is not None:
                out.setdefault(name[len("deq-"):], []).append(r)
        return {k: sorted(v, key=lambda r: r["solver_iters"]) for k, v in out.items()}

    @property
    def memory_kind(self) -> str:
        return str(self.rows[0].get("memory_kind", "unknown")) if self.rows else "unknown"

    @property
    def device(self) -> str:
        return str(self.rows[0].get("device", "unknown")) if self.rows else "unknown"


def parse_bench_lines(lines: Iterable[str], where: str) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReportError(f"{where}, line {i}: not JSON ({err})") from None
        if isinstance(obj, dict) and "summary" not in obj:
            if "variant" not in obj or "peak_bytes" not in obj:
                raise ReportError(f"{where}, line {i}: a benchmark row needs 'variant' and 'peak_bytes'")
            rows.append(obj)
    if not rows:
        raise ReportError(f"{where}: no benchmark rows")
    return rows


def memory_benchmark(path: Path, timeout: float) -> MemoryBench:
    """The benchmark rows of ``path``; when it does not exist, run benchmarks/memory_depth.py at a small
    CPU size and use its rows."""
    if path.exists():
        return MemoryBench(parse_bench_lines(path.read_text().splitlines(), str(path)), f"`{path}`")
    script = ROOT / "benchmarks" / "memory_depth.py"
    cmd = [sys.executable, str(script), *BENCH_CPU_ARGS]
    log(f"{path} not found: running the memory benchmark at a small CPU size ({' '.join(BENCH_CPU_ARGS)})")
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ReportError(f"the memory benchmark ({' '.join(cmd)}) took over {timeout:.0f} s; run `make bench` "
                          f"to write {path}, or raise --memory-bench-timeout") from None
    if done.returncode != 0:
        raise ReportError(f"the memory benchmark failed (exit {done.returncode}): {' '.join(cmd)}\n"
                          f"{done.stderr.strip()[-2000:]}")
    log(f"memory benchmark done in {time.perf_counter() - t0:.1f} s")
    args = " ".join(BENCH_CPU_ARGS)
    return MemoryBench(parse_bench_lines(done.stdout.splitlines(), "benchmarks/memory_depth.py output"),
                       f"`benchmarks/memory_depth.py {args}`, run by this stage because `{path}` was absent")


def depth_matching(bench: MemoryBench, peak: float) -> float | None:
    """The explicit depth whose memory equals ``peak`` (linear interpolation between measured depths)."""
    pts = [(d, float(r["peak_bytes"])) for d, r in bench.explicit()]
    for (d0, b0), (d1, b1) in zip(pts, pts[1:]):
        if b0 <= peak <= b1 and b1 > b0:
            return d0 + (d1 - d0) * (peak - b0) / (b1 - b0)
    if pts and peak < pts[0][1] and pts[0][1] > 0:
        return pts[0][0] * peak / pts[0][1]
    return None


# ------------------------------------------------------------------------------------------------------
# gradient fidelity
# ------------------------------------------------------------------------------------------------------
def gradient_fidelity_of(layout: Layout, data: ExperimentData, rows: int, ks: tuple[int, ...], seed: int) -> dict:
    """Per DEQ variant: phantom-K vs exact implicit gradients of the experiment's loss on ``rows`` test rows."""
    variants = data.deq_variants()
    if not variants:
        return {}
    import torch

    from deqsm.data import load_splits
    from deqsm.experiments import make_objective
    from deqsm.fidelity import gradient_fidelity
    from pipelines.evaluate import load_model

    splits = load_splits(layout.data_root, data.spec.dataset)
    out = {}
    for variant in variants:
        path = layout.model(data.name, variant)
        spec, model, _ = load_model(path, splits["train"])
        x = splits["test"][:rows]
        objective = make_objective(spec, splits["train"])
        log(f"fidelity {data.name}/{variant}: phantom K={','.join(map(str, ks))} vs implicit on {x.shape[0]} test rows")
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        results = gradient_fidelity(model, objective, x, ks=ks, seed=seed)
        out[variant] = {
            "model_file": str(path), "rows": int(x.shape[0]), "loss": spec.loss.name,
            "trained_backward": spec.deq.backward, "trained_k": spec.deq.k, "solver": spec.deq.solver,
            "seconds": time.perf_counter() - t0,
            "results": [{**r, "k": int(r["k"])} for r in results],
        }
        log(f"fidelity {data.name}/{variant}: " + ", ".join(f"K={int(r['k'])} cos={r['grad_cosine']:.4f}"
                                                           for r in results))
    return out


# ------------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------------
def fmt(value: Any, spec: str) -> str:
    v = number(value)
    return DASH if v is None else format(v, spec)


def loss_label(spec: ExperimentSettings) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in sorted(spec.loss.options.items()))
    return f"{spec.loss.name} ({opts})" if opts else spec.loss.name


@dataclass(frozen=True)
class MainMetric:
    """The number an experiment is judged by: test log-likelihood (density models), test ELBO (VAE) or a
    Fréchet distance of samples (NCSN; its key names the feature extractor)."""

    key: str
    label: str  # the table's column header
    higher_is_better: bool
    unit: str  # words after a value in the findings


def main_metric(data: ExperimentData) -> MainMetric:
    from deqsm.metrics.fid import FEATURE_EXTRACTORS

    keys = {k for m in data.metrics.values() for k in m}
    if "test_elbo" in keys:
        return MainMetric("test_elbo", "test ELBO (nats)", True, "nats")
    fd = sorted(keys & {FEATURE_EXTRACTORS.get(name).metric_name for name in FEATURE_EXTRACTORS})
    if fd:
        return MainMetric(fd[0], f"{fd[0]} (lower is better)", False, "")
    return MainMetric("test_loglik", "test log-lik (nats) ± se", True, "nats")


def table_rows(data: ExperimentData) -> list[dict[str, Any]]:
    """One row per variant (× the experiment's loss): raw values, None where unknown."""
    rows = []
    main = main_metric(data)
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
        se, se_kind = g("test_loglik_se"), "test_loglik_se"
        if se is None and g("test_loglik_sample_se") is not None:
            se, se_kind = g("test_loglik_sample_se"), "test_loglik_sample_se"
        peak = g("peak_bytes")
        score_peak = g("score_step_peak_bytes")
        rows.append({
            "main_metric": main.key, "main_value": g(main.key),
            "main_se": se if main.key == "test_loglik" else None,
            "test_elbo": g("test_elbo"), "test_iw_loglik": g("test_iw_loglik"),
            "fd_train_vs_test": g(f"{main.key}_train_vs_test") if not main.higher_is_better else None,
            "score_step_peak_mib": score_peak / MIB if score_peak is not None else None,
            "experiment": data.name, "variant": variant, "kind": data.kind(variant) or "",
            "depth": data.depth(variant), "loss": loss_label(data.spec), "status": "ok" if m is not None else "no metrics",
            "test_loglik": g("test_loglik"), "test_loglik_se": se, "se_kind": se_kind if se is not None else "",
            "test_bpd": g("test_bpd"), "peak_mib": peak / MIB if peak is not None else None,
            "peak_bytes": peak, "memory_kind": (m or {}).get("memory_kind") or "",
            "step_ms_median": g("step_ms_median"), "params": g("params"),
            "solver_nstep_mean": nstep_mean, "solver_final_residual": residual,
            "solver_residual_max": residual_max, "solver_source": solver_source, "test_ssm_loss": g("test_ssm_loss"),
            "test_sm_loss": g("test_sm_loss"), "test_loss": g("test_loss"), "fisher_divergence": g("fisher_divergence"),
            "train_steps": g("train_steps"), "train_best_val_loss": g("train_best_val_loss"),
        })
    return rows


CSV_COLUMNS = ["experiment", "variant", "kind", "depth", "loss", "status", "main_metric", "main_value",
               "test_loglik", "test_loglik_se", "se_kind", "test_elbo", "test_iw_loglik", "fd_train_vs_test",
               "score_step_peak_mib", "test_bpd", "peak_mib", "peak_bytes", "memory_kind", "step_ms_median", "params", "solver_nstep_mean",
               "solver_final_residual", "solver_residual_max", "solver_source", "test_ssm_loss", "test_sm_loss", "test_loss",
               "fisher_divergence", "train_steps", "train_best_val_loss"]


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
    se_kinds = sorted({r["se_kind"] for r in rows if r["se_kind"]})
    extra = [(k, label) for k, label in (("test_sm_loss", "test SM loss"), ("fisher_divergence", "Fisher divergence"))
             if any(r[k] is not None for r in rows)]
    main = main_metric(data)
    density = main.key == "test_loglik"
    score_mem = any(r["score_step_peak_mib"] is not None for r in rows)
    header = ["variant", "loss", main.label, *(["bits/dim"] if density else []),
              *(["IW bound (nats)"] if any(r["test_iw_loglik"] is not None for r in rows) else []),
              "peak memory (MiB)", *(["score-net step memory (MiB)"] if score_mem else []), "ms/step", "parameters",
              "solver steps", "final residual", *(["test SSM loss"] if density else []), *(label for _, label in extra),
              "train steps"]
    body = []
    for r in rows:
        value = fmt(r["main_value"], ".3f" if main.higher_is_better else ".2f")
        if value != DASH and r["main_se"] is not None:
            value += f" ± {r['main_se']:.3f}"
        mem = fmt(r["peak_mib"], ".3f")
        if len(kinds) > 1 and mem != DASH:
            mem += f" ({r['memory_kind']})"
        name = r["variant"] + (f" (depth {r['depth']})" if r["depth"] is not None else " (DEQ)" if r["kind"] == "deq" else "")
        body.append([name, r["loss"], value, *([fmt(r["test_bpd"], ".3f")] if density else []),
                     *([fmt(r["test_iw_loglik"], ".3f")] if "IW bound (nats)" in header else []),
                     mem, *([fmt(r["score_step_peak_mib"], ".3f")] if score_mem else []), fmt(r["step_ms_median"], ".1f"),
                     fmt(r["params"], ",.0f"), fmt(r["solver_nstep_mean"], ".1f"), fmt(r["solver_final_residual"], ".2e"),
                     *([fmt(r["test_ssm_loss"], ".4g")] if density else []), *(fmt(r[k], ".4g") for k, _ in extra),
                     fmt(r["train_steps"], ".0f")])
    notes = [f"Experiment `{data.name}`: dataset `{data.spec.dataset}`, model `{data.spec.model}`, "
             f"loss `{loss_label(data.spec)}`. {DASH}: not measured for that variant."]
    if main.key == "test_elbo":
        notes.append("Test ELBO: E_q[log p(x|z) + log p(z)] plus the implicit encoder's entropy estimated per test x "
                     "by a kernel density estimate of q(z|x) (`deqsm.metrics.elbo`). Peak memory is the whole "
                     "training step (score network and VAE); score-net step memory is one score-network step, the "
                     "part the variants differ in (the paper's Table 1).")
    elif not main.higher_is_better:
        refs = [r["fd_train_vs_test"] for r in rows if r["fd_train_vs_test"] is not None]
        notes.append(f"`{main.key}`: Fréchet distance between annealed-Langevin samples and the test images "
                     f"(features: {'Inception-v3' if main.key.startswith('fid_') else 'a digits classifier trained on the training split'}; "
                     "covariances not rescaled)" + (f"; training images vs test images score {refs[0]:.2f} on the "
                                                   "same features (a floor for the sample size)." if refs else "."))
    for k in kinds:
        notes.append(f"Peak memory counts `{k}`: {MEMORY_KINDS.get(k, 'as named')}.")
    se_words = {"test_loglik_se": "the Monte-Carlo standard error of the importance-sampled log Z",
                "test_loglik_sample_se": "the standard error of the mean over test rows"}
    for k in se_kinds:
        notes.append(f"± is `{k}`: {se_words.get(k, k)}.")
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


# ------------------------------------------------------------------------------------------------------
# figures and plot data
# ------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def wide_csv(path: Path, x_name: str, series: dict[str, tuple[list[float], list[float]]]) -> Path:
    """Series → one CSV: an x column and one column per series (blank where a series has no point)."""
    xs = sorted({x for s in series.values() for x in s[0]})
    lookup = {name: dict(zip(*s)) for name, s in series.items()}
    plain = lambda v: int(v) if isinstance(v, float) and v.is_integer() else v  # noqa: E731 — steps, depths
    rows = [{x_name: plain(x), **{name: lookup[name].get(x) for name in series}} for x in xs]
    write_csv(path, rows, [x_name, *series])
    return path


def memory_figures(layout: Layout, bench: MemoryBench) -> list[Path]:
    plt = _pyplot()
    explicit, deq = bench.explicit(), bench.deq()
    kind = bench.memory_kind
    paths = []

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if explicit:
        ax.plot([d for d, _ in explicit], [r["peak_bytes"] / MIB for _, r in explicit], "o-", label="explicit, depth L")
    for backward, runs in sorted(deq.items()):
        if backward == "unroll":
            continue  # unrolled backward grows with iterations: shown in memory_iters.png
        peak = max(r["peak_bytes"] for r in runs) / MIB
        iters = f"{runs[0]['solver_iters']}–{runs[-1]['solver_iters']}" if len(runs) > 1 else f"{runs[0]['solver_iters']}"
        ax.axhline(peak, ls="--", color="C1" if backward == "phantom" else "C2",
                   label=f"DEQ, {backward} backward ({iters} solver iterations)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("explicit depth L")
    ax.set_ylabel(f"peak memory (MiB, {kind})")
    ax.set_title(f"SSM step memory vs depth ({bench.device})")
    ax.legend(fontsize=8)
    paths.append(_save(fig, layout.figures / "memory_depth.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for backward, runs in sorted(deq.items()):
        ax.plot([r["solver_iters"] for r in runs], [r["peak_bytes"] / MIB for r in runs], "o-", label=f"DEQ, {backward}")
    if explicit:
        d, r = explicit[-1]
        ax.axhline(r["peak_bytes"] / MIB, ls=":", color="gray", label=f"explicit, depth {d}")
    ax.set_xlabel("DEQ solver iterations")
    ax.set_ylabel(f"peak memory (MiB, {kind})")
    ax.set_title(f"SSM step memory vs solver iterations ({bench.device})")
    ax.legend(fontsize=8)
    paths.append(_save(fig, layout.figures / "memory_iters.png"))

    depths = [float(d) for d, _ in explicit]
    series = {"explicit_bytes": (depths, [float(r["peak_bytes"]) for _, r in explicit])}
    for backward, runs in sorted(deq.items()):
        if backward != "unroll":
            series[f"deq_{backward}_bytes"] = (depths, [float(max(r["peak_bytes"] for r in runs))] * len(depths))
    wide_csv(layout.plots / "memory_depth.csv", "depth", series)
    wide_csv(layout.plots / "memory_iters.csv", "solver_iters",
             {f"deq_{b}_bytes": ([float(r["solver_iters"]) for r in runs], [float(r["peak_bytes"]) for r in runs])
              for b, runs in sorted(deq.items())})
    (layout.plots / "memory_depth.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench.rows))
    return paths


def experiment_figures(layout: Layout, data: ExperimentData, deq_tol: float) -> list[Path]:
    plt = _pyplot()
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    train_series, val_series = {}, {}
    for i, variant in enumerate(data.variants()):
        curve = data.curves.get(variant)
        if curve is None:
            continue
        steps, loss = curve.series(curve.loss_key)
        vsteps, vloss = curve.series("val_loss")
        if steps:
            ax.plot(steps, loss, color=f"C{i % 10}", lw=1.2, label=f"{variant} train")
            train_series[variant] = (steps, loss)
        if vsteps:
            ax.plot(vsteps, vloss, "o--", color=f"C{i % 10}", ms=3, lw=1, label=f"{variant} val")
            val_series[variant] = (vsteps, vloss)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{loss_label(data.spec)} loss")
    ax.set_title(f"{data.name}: training curves")
    if train_series or val_series:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no curve has a loss column", ha="center", transform=ax.transAxes)
    paths.append(_save(fig, layout.figures / f"training_{data.name}.png"))
    wide_csv(layout.plots / f"{data.name}_train_loss.csv", "step", train_series)
    wide_csv(layout.plots / f"{data.name}_val_loss.csv", "step", val_series)

    fig, (ax_r, ax_n) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    res_series = {}
    for i, variant in enumerate(data.variants()):
        curve = data.curves.get(variant)
        if curve is None:
            continue
        steps, res = curve.residuals()
        nsteps, n = curve.nsteps()
        if steps:
            ax_r.plot(steps, res, color=f"C{i % 10}", lw=1.2, label=variant)
            res_series[variant] = (steps, res)
        if nsteps:
            ax_n.plot(nsteps, n, color=f"C{i % 10}", lw=1.2, label=variant)
    if res_series:
        ax_r.axhline(deq_tol, ls=":", color="gray", label=f"deq.tol = {deq_tol:g}")
        ax_r.set_yscale("log")
        ax_r.legend(fontsize=8)
    else:
        ax_r.text(0.5, 0.5, "no DEQ variant: no solver residuals", ha="center", transform=ax_r.transAxes)
    ax_r.set_ylabel("max |f(z) − z| (abs residual)")
    ax_r.set_title(f"{data.name}: DEQ solver over training")
    ax_n.set_ylabel("solver iterations")
    ax_n.set_xlabel("training step")
    paths.append(_save(fig, layout.figures / f"residual_{data.name}.png"))
    wide_csv(layout.plots / f"{data.name}_residual.csv", "step", res_series)
    return paths


def fidelity_figure(layout: Layout, fidelity: dict[str, dict]) -> Path:
    plt = _pyplot()
    fig, (ax_c, ax_e) = plt.subplots(1, 2, figsize=(10, 4))
    cos_series = {}
    for exp, by_variant in fidelity.items():
        for variant, entry in by_variant.items():
            ks = [float(r["k"]) for r in entry["results"]]
            cos = [r["grad_cosine"] for r in entry["results"]]
            ax_c.plot(ks, cos, "o-", label=f"{exp}/{variant}")
            ax_e.plot(ks, [r["grad_rel_error"] for r in entry["results"]], "o-", label=f"{exp}/{variant} gradient")
            if all("score_rel_error" in r for r in entry["results"]):
                ax_e.plot(ks, [max(r["score_rel_error"], 1e-16) for r in entry["results"]], "s:",
                          label=f"{exp}/{variant} score")
            cos_series[f"{exp}/{variant}"] = (ks, cos)
    if cos_series:
        for ax in (ax_c, ax_e):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("phantom steps K")
            ax.legend(fontsize=7)
        ax_e.set_yscale("log")
    else:
        ax_c.text(0.5, 0.5, "no DEQ variant", ha="center", transform=ax_c.transAxes)
    ax_c.set_ylabel("cos(phantom gradient, exact gradient)")
    ax_e.set_ylabel("relative error vs exact")
    fig.suptitle("Phantom vs exact implicit gradients of the trained DEQs")
    wide_csv(layout.plots / "fidelity_cosine.csv", "k", cos_series)
    return _save(fig, layout.figures / "fidelity.png")


# ------------------------------------------------------------------------------------------------------
# conclusions, computed from the numbers
# ------------------------------------------------------------------------------------------------------
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
        main = main_metric(data)
        for ev in explicits:
            e = by[ev]
            if main.key != "test_loglik":
                if d["main_value"] is None or e["main_value"] is None:
                    lines.append(f"`{data.name}`: no {main.key} to compare `{dv}` with `{ev}`.")
                    continue
                diff = d["main_value"] - e["main_value"]
                numbers[f"{dv}_minus_{ev}_{main.key}"] = diff
                better = diff > 0 if main.higher_is_better else diff < 0
                verdict = "better than" if better and diff != 0 else "equal to" if diff == 0 else "worse than"
                lines.append(f"`{data.name}`: `{dv}`'s {main.key} is {verdict} `{ev}`'s ({d['main_value']:.3f} vs "
                             f"{e['main_value']:.3f}{' ' + main.unit if main.unit else ''}, difference {diff:+.3f}; "
                             f"{'higher' if main.higher_is_better else 'lower'} is better; one seed, no standard error).")
                continue
            if d["test_loglik"] is None or e["test_loglik"] is None:
                lines.append(f"`{data.name}`: no test log-likelihood to compare `{dv}` with `{ev}`.")
                continue
            diff = d["test_loglik"] - e["test_loglik"]
            numbers[f"{dv}_minus_{ev}_test_loglik"] = diff
            if d["test_loglik_se"] is not None and e["test_loglik_se"] is not None:
                se = math.hypot(d["test_loglik_se"], e["test_loglik_se"])
                verdict = ("beats" if diff > 2 * se else "is beaten by" if diff < -2 * se
                           else "is within two standard errors of")
                lines.append(f"`{data.name}`: `{dv}` {verdict} `{ev}` in test log-likelihood "
                             f"({d['test_loglik']:.3f} vs {e['test_loglik']:.3f} nats, difference {diff:+.3f}, "
                             f"combined se {se:.3f}).")
            else:
                verdict = "above" if diff > 0 else "below" if diff < 0 else "equal to"
                lines.append(f"`{data.name}`: `{dv}`'s test log-likelihood is {verdict} `{ev}`'s ({d['test_loglik']:.3f} "
                             f"vs {e['test_loglik']:.3f} nats, difference {diff:+.3f}; no standard error to judge it).")
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


def caveats(layout: Layout, datas: list[ExperimentData], all_rows: dict[str, list[dict]], bench: MemoryBench,
            generated_bench: bool) -> list[str]:
    s = layout.settings
    out = []
    kinds = sorted({r["memory_kind"] for rows in all_rows.values() for r in rows if r["memory_kind"]} | {bench.memory_kind})
    if "autograd_saved_bytes" in kinds:
        out.append("Memory marked `autograd_saved_bytes` is what autograd keeps for backward (a CPU-side, "
                   "deterministic count), not an allocator peak; the CUDA peak comes from "
                   "`bash benchmarks/gpu_check.sh` on a GPU.")
    if generated_bench:
        out.append(f"The memory benchmark was run by this stage at a small CPU size ({' '.join(BENCH_CPU_ARGS)}); "
                   "`make bench` measures the paper's size (input 784, width 1000, batch 128).")
    for data in datas:
        steps = sorted({int(r["train_steps"]) for r in all_rows[data.name] if r["train_steps"] is not None})
        if steps:
            out.append(f"`{data.name}` variants trained for {', '.join(map(str, steps))} steps (train.steps = "
                       f"{s.train.steps}); differences may reflect optimisation speed as much as model capacity.")
        ess = [number(m.get("test_is_ess")) for m in data.metrics.values()]
        ess = [e for e in ess if e is not None]
        if ess:
            n_is = {**s.eval.model_dump(), **data.spec.eval_options}.get("is_samples")
            out.append(f"`{data.name}`: log-likelihoods use an importance-sampled log Z ({n_is} samples, effective "
                       f"sample size {min(ess):.0f}–{max(ess):.0f}); the paper uses 10⁶ samples.")
        missing = [r["variant"] for r in all_rows[data.name] if r["status"] != "ok"]
        if missing:
            out.append(f"`{data.name}`: no metrics for {', '.join(missing)}.")
        if data.tune and data.tune.get("failed"):
            failed = {v: len(r) if isinstance(r, list) else 1 for v, r in data.tune["failed"].items() if r}
            if failed:
                out.append(f"`{data.name}`: failed tuning trials — " + ", ".join(f"{v}: {n}" for v, n in sorted(failed.items())) + ".")
    return out


# ------------------------------------------------------------------------------------------------------
# REPORT.md
# ------------------------------------------------------------------------------------------------------
def tuning_md(data: ExperimentData, metric: str) -> str:
    if data.tune is None:
        return "No tuning summary (`best.json` of the tune stage not found).\n"
    lines = [f"Tune stage: {data.tune.get('trials', DASH)} trials."]
    for variant, entry in sorted((data.tune.get("best") or {}).items()):
        sample = ", ".join(f"`{k}={v}`" for k, v in sorted((entry.get("sample") or {}).items())) or "(no search values)"
        value = (entry.get("metrics") or {}).get(metric)
        lines.append(f"- `{variant}`: best {metric} {fmt(value, '.4g')} with {sample}")
    for variant, reasons in sorted((data.tune.get("failed") or {}).items()):
        if reasons:
            shown = reasons if isinstance(reasons, list) else [reasons]
            lines.append(f"- `{variant}`: {len(shown)} failed trial(s): {'; '.join(map(str, shown[:3]))}")
    return "\n".join(lines) + "\n"


def sample_grids(layout: Layout, data: ExperimentData) -> list[Path]:
    """The evaluate stage's sample grids of this experiment (``samples/<variant>.png``), in variant order."""
    folder = layout.metrics(data.name).parent / "samples"
    return [p for v in data.variants() if (p := folder / f"{v}.png").exists()]


def sample_grids_md(layout: Layout, data: ExperimentData) -> list[str]:
    grids = sample_grids(layout, data)
    if not grids:
        return []
    return ["### Samples\n", *(f"`{p.stem}`:\n\n![samples of {p.stem}]({layout.rel(p)})\n" for p in grids)]


def write_report(layout: Layout, params: Path, datas: list[ExperimentData], tables: dict[str, str],
                 bench: MemoryBench, generated_bench: bool, fidelity_md: str, conclusions: list[str],
                 caveat_lines: list[str], figures: dict[str, list[Path]], tags: dict[str, str]) -> Path:
    s = layout.settings
    md = ["# deqsm report\n",
          f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by `python -m pipelines.report` from `{params}`; "
          f"git commit `{tags.get('git_commit', 'unknown')}`, dvc.lock sha256 `{tags.get('dvc_lock_sha256', 'none')[:12]}`. "
          f"Experiments: {', '.join(f'`{d.name}`' for d in datas)}. Every number below is read from the files "
          "the pipeline wrote; the same files are logged to MLflow (run `report` of each experiment).\n",
          "## What to conclude\n", *(f"- {c}" for c in conclusions), "",
          "## Caveats\n", *(f"- {c}" for c in caveat_lines or ["None found in the numbers."]), ""]
    for data in datas:
        md += [f"## {data.name}\n",
               f"Dataset `{data.spec.dataset}`, model `{data.spec.model}`, loss `{loss_label(data.spec)}`; "
               f"table also as [CSV](tables/{data.name}.csv), metrics from "
               f"`{layout.rel(layout.metrics(data.name))}`.\n", tables[data.name],
               f"![training curves]({layout.rel(layout.figures / f'training_{data.name}.png')})\n",
               f"![solver residual]({layout.rel(layout.figures / f'residual_{data.name}.png')})\n",
               *sample_grids_md(layout, data),
               "### Tuning\n", tuning_md(data, s.tune.metric)]
    explicit, deq = bench.explicit(), bench.deq()
    body = [[f"explicit-{d}", DASH, f"{r['peak_bytes'] / MIB:.3f}", fmt(r.get("step_ms"), ".1f")] for d, r in explicit]
    body += [[f"deq-{b}", str(r["solver_iters"]), f"{r['peak_bytes'] / MIB:.3f}", fmt(r.get("step_ms"), ".1f")]
             for b, runs in sorted(deq.items()) for r in runs]
    md += ["## Memory vs depth (benchmark)\n",
           f"One SSM training step of an energy MLP, explicit depth L against one DEQ layer ({bench.device}; "
           f"memory: `{bench.memory_kind}` — {MEMORY_KINDS.get(bench.memory_kind, 'as named')}). Source: "
           f"{bench.source}; rows in [plots/memory_depth.jsonl](plots/memory_depth.jsonl).\n",
           md_table(["variant", "solver iterations", "peak memory (MiB)", "ms/step"], body), "",
           "![memory vs depth](figures/memory_depth.png)\n", "![memory vs solver iterations](figures/memory_iters.png)\n",
           "## Phantom vs exact gradients (fidelity)\n", fidelity_md,
           "Also as [tables/fidelity.csv](tables/fidelity.csv) and [fidelity.json](fidelity.json).\n",
           "![fidelity](figures/fidelity.png)\n",
           "## Files\n",
           *(f"- [{layout.rel(p)}]({layout.rel(p)})" for ps in figures.values() for p in ps),
           *(f"- [tables/{d.name}.md](tables/{d.name}.md), [tables/{d.name}.csv](tables/{d.name}.csv)" for d in datas),
           "- [tables/fidelity.md](tables/fidelity.md), [fidelity.json](fidelity.json)",
           "- `plots/*.csv`: the figures' data for `dvc plots show`", ""]
    layout.report.parent.mkdir(parents=True, exist_ok=True)
    layout.report.write_text("\n".join(md))
    return layout.report


# ------------------------------------------------------------------------------------------------------
# MLflow
# ------------------------------------------------------------------------------------------------------
def log_to_mlflow(layout: Layout, datas: list[ExperimentData], numbers: dict[str, dict[str, float]],
                  common: list[Path], per_experiment: dict[str, list[Path]], tags: dict[str, str],
                  params: dict[str, Any]) -> dict[str, str]:
    """A run named ``report`` (tag stage=report) per experiment holding the report's files; run ids by experiment."""
    from pipelines.tracking import Tracker

    uri = layout.tracking_uri()
    run_ids = {}
    try:
        tracker = Tracker(uri)
    except Exception as err:  # noqa: BLE001 — re-raised with the URI
        raise ReportError(f"cannot open MLflow tracking URI {uri}: {type(err).__name__}: {err}") from err
    for data in datas:
        experiment = layout.settings.tracking.experiment_prefix + data.name
        run_id = None
        try:
            run_id = tracker.start_run(experiment, "report", params, {"stage": "report", **tags})
            tracker.log_metrics(run_id, numbers.get(data.name, {}))
            for path in common:
                tracker.log_artifact(run_id, path, _artifact_dir(layout, path))
            for path in per_experiment.get(data.name, []):
                tracker.log_artifact(run_id, path, _artifact_dir(layout, path))
            tracker.end_run(run_id, "FINISHED")
        except Exception as err:  # noqa: BLE001 — re-raised naming the run and the URI
            if run_id is not None:
                try:
                    tracker.end_run(run_id, "FAILED", failure_reason=f"{type(err).__name__}: {err}")
                except Exception:  # noqa: BLE001 — the original error is the one to report
                    pass
            raise ReportError(f"logging the report to MLflow ({uri}, experiment {experiment!r}) failed: "
                              f"{type(err).__name__}: {err}") from err
        run_ids[data.name] = run_id
        log(f"MLflow: {experiment} run 'report' {run_id}")
    return run_ids


def _artifact_dir(layout: Layout, path: Path) -> str | None:
    parent = path.parent.relative_to(layout.output).as_posix() if path.is_relative_to(layout.output) else None
    return None if parent in (None, ".") else parent


# ------------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--root", type=Path, default=None,
                   help="folder that relative paths of params.yaml are taken from (default: the params file's folder)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="folder of the report's own files (default: base.results); relative paths from --root")
    p.add_argument("--memory-jsonl", type=Path, default=None,
                   help="memory-vs-depth benchmark rows (default: <base.out>/benchmarks/memory_depth.jsonl; "
                        "absent: the benchmark runs at a small CPU size)")
    p.add_argument("--memory-bench-timeout", type=float, default=120.0, help="seconds (default: 120)")
    p.add_argument("--fidelity-rows", type=int, default=128, help="test rows for the gradient fidelity (default: 128)")
    p.add_argument("--fidelity-k", type=int, nargs="+", default=list(FIDELITY_K), help="phantom steps K compared")
    return p.parse_args(argv)


def run_report(settings: Settings, params: Path, root: Path, memory_jsonl: Path | None = None,
               bench_timeout: float = 120.0, fidelity_rows: int = 128,
               fidelity_k: tuple[int, ...] = FIDELITY_K, out_dir: Path | None = None) -> dict[str, Any]:
    """Build the whole report; returns the written paths and the MLflow run ids."""
    if not settings.experiments:
        raise ParamsError("params.yaml has no experiments: nothing to report")
    if fidelity_rows < 1 or any(k < 1 for k in fidelity_k):
        raise ReportError("--fidelity-rows and --fidelity-k must be positive")
    root = root.resolve()
    layout = Layout(settings, root, None if out_dir is None else root / out_dir)
    t0 = time.perf_counter()
    # Every input first: a missing file fails before any work.
    datas = [read_experiment(layout, name) for name in settings.experiments]
    log(f"read {len(datas)} experiment(s): " + ", ".join(f"{d.name} ({len(d.metrics)} variants)" for d in datas))
    bench_path = memory_jsonl or layout.out / "benchmarks" / "memory_depth.jsonl"
    generated = not bench_path.exists()
    bench = memory_benchmark(bench_path, bench_timeout)

    fidelity = {d.name: f for d in datas if (f := gradient_fidelity_of(layout, d, fidelity_rows, tuple(fidelity_k),
                                                                        settings.base.seed))}
    layout.fidelity.parent.mkdir(parents=True, exist_ok=True)
    layout.fidelity.write_text(json.dumps(fidelity, indent=2, sort_keys=True))

    all_rows, tables = {}, {}
    for data in datas:
        rows = all_rows[data.name] = table_rows(data)
        write_csv(layout.tables / f"{data.name}.csv", rows, CSV_COLUMNS)
        tables[data.name] = experiment_table_md(data, rows)
        (layout.tables / f"{data.name}.md").write_text(f"# {data.name}\n\n{tables[data.name]}")
    fid_rows = fidelity_table_rows(fidelity)
    write_csv(layout.tables / "fidelity.csv", fid_rows,
              ["experiment", "variant", "k", "grad_cosine", "grad_rel_error", "score_rel_error", "rows", "loss",
               "trained_backward"])
    fidelity_md = fidelity_table_md(fid_rows)
    (layout.tables / "fidelity.md").write_text(f"# Phantom vs exact gradient fidelity\n\n{fidelity_md}")

    log("figures")
    figures = {"memory": memory_figures(layout, bench)}
    for data in datas:
        figures[data.name] = experiment_figures(layout, data, settings.deq.tol)
    figures["fidelity"] = [fidelity_figure(layout, fidelity)]

    bench_lines, bench_numbers = memory_findings(bench)
    conclusions, numbers = list(bench_lines), {}
    fid_lines, fid_numbers = fidelity_findings(fidelity)
    for data in datas:
        lines, nums = experiment_findings(data, all_rows[data.name], settings.deq.tol)
        conclusions += lines
        _, own_fid = fidelity_findings({data.name: fidelity.get(data.name, {})})
        numbers[data.name] = {**bench_numbers, **nums, **own_fid}
    conclusions += fid_lines
    from pipelines.tracking import provenance_tags

    tags = provenance_tags(settings.base.device, layout.root)
    report = write_report(layout, params, datas, tables, bench, generated, fidelity_md, conclusions,
                          caveats(layout, datas, all_rows, bench, generated), figures, tags)
    log(f"wrote {report}")

    common = [report, layout.fidelity, layout.tables / "fidelity.md", layout.tables / "fidelity.csv",
              *figures["memory"], *figures["fidelity"], layout.plots / "memory_depth.csv"]
    per_exp = {d.name: [layout.tables / f"{d.name}.md", layout.tables / f"{d.name}.csv", *figures[d.name],
                        *sample_grids(layout, d)] for d in datas}
    run_ids = log_to_mlflow(layout, datas, numbers, common, per_exp, tags,
                            {"report.params": str(params), "report.memory_source": bench.source,
                             "report.fidelity_rows": fidelity_rows, "report.fidelity_k": list(fidelity_k)})
    log(f"done in {time.perf_counter() - t0:.1f} s")
    return {"report": report, "figures": figures, "tables": layout.tables, "fidelity": layout.fidelity,
            "run_ids": run_ids}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = load_params(args.params)
    settings.base.apply_threads()
    run_report(settings, Path(args.params), args.root or settings.root, args.memory_jsonl, args.memory_bench_timeout,
               args.fidelity_rows, tuple(args.fidelity_k), args.out_dir)


if __name__ == "__main__":
    main_guard(main)
