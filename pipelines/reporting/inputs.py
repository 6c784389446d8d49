"""The report's inputs: the files the other stages wrote (:mod:`pipelines.artifacts`), read and checked.

Each reader names the missing or malformed file and the stage that writes it.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from deqsm.models import MODELS, Headline
from pipelines.artifacts import Artifacts, memory_bench_rows
from pipelines.settings import ExperimentSettings, Settings

MIB = 2.0 ** 20
MEMORY_KINDS = {
    "autograd_saved_bytes": "bytes of the tensors autograd keeps for backward at the end of the loss "
                            "computation, parameters excluded (deterministic; the CPU measure)",
    "cuda_max_memory_allocated": "torch.cuda.max_memory_allocated over the training step, minus what was "
                                 "allocated when it began",
}


class ReportError(ValueError):
    """An input of the report is missing or malformed, or logging to MLflow failed; the message says which."""


def number(value: Any) -> float | None:
    """A finite float, or None (missing, null, blank, NaN, inf, not a number)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None



def seed_view(metrics: dict[str, Any]) -> dict[str, Any]:
    """A variant's metrics.json entry with each ``<metric>_mean`` (the mean over seeds) also under ``<metric>``,
    so that every column reads its figure by one name; ``<metric>_se_seeds`` stays the error that verdicts use
    (:func:`pipelines.reporting.verdicts.estimate`)."""
    return {**{k.removesuffix("_mean"): v for k, v in metrics.items() if k.endswith("_mean")}, **metrics}


def read_metrics(artifacts: Artifacts, experiment: str) -> dict[str, dict[str, Any]]:
    path = artifacts.metrics(experiment)
    data = read_json(path, f"evaluate@{experiment}")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ReportError(f"{path} must map variant names to {{metric: value}} objects")
    bad = [v for v, m in data.items() if not isinstance(m.get("seeds"), list) or not m["seeds"]]
    if bad:
        raise ReportError(f"{path}: variant(s) {', '.join(bad)} have no 'seeds' list (metrics.json from before the "
                          f"train stage trained several seeds?): re-run dvc repro evaluate@{experiment}")
    return {v: seed_view(m) for v, m in data.items()}



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
    metrics: dict[str, dict[str, Any]]  # variant → seed_view of its metrics.json entry
    seed_curves: dict[str, dict[int, Curve]]  # variant → seed → training curve
    tune: dict[str, Any] | None
    fidelity: dict[str, Any] | None = None  # the fidelity stage's rows per DEQ variant
    seed_metrics: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)  # seeds.json: variant → seed → metrics

    @property
    def curves(self) -> dict[str, Curve]:
        """Each variant's first seed's curve (the solver columns and the figures' solid lines)."""
        return {v: c[min(c)] for v, c in self.seed_curves.items() if c}

    def headline(self) -> Headline:
        """What the experiment is judged by: its model family says (:meth:`deqsm.models.ModelFamily.headline_of`)."""
        return MODELS.get(self.spec.model).headline_of({k for m in self.metrics.values() for k in m})

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



def read_json(path: Path, stage: str) -> Any:
    """A JSON file another stage wrote; missing or garbled, an error naming the file and the stage to re-run."""
    if not path.exists():
        raise ReportError(f"{path} is missing: run the {stage.split('@')[0]} stage first (dvc repro {stage})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is not valid JSON ({err}): re-run dvc repro {stage}") from None


def read_experiment(artifacts: Artifacts, settings: Settings, name: str) -> ExperimentData:
    """Metrics (evaluate), curves (train), the tuning summary (tune; optional) and the gradient fidelity
    (fidelity) of one experiment."""
    spec = settings.experiments[name]
    metrics = read_metrics(artifacts, name)
    curves: dict[str, dict[int, Curve]] = {}
    for variant, m in metrics.items():
        curves[variant] = {}
        for seed in m["seeds"]:
            path = artifacts.curve(name, variant, int(seed))
            if not path.exists():
                raise ReportError(f"{path} is missing (metrics.json has variant {variant!r} seed {seed}): run the "
                                  f"train stage (dvc repro train@{name})")
            curves[variant][int(seed)] = Curve.read(path)
    best = artifacts.tune_best(name)
    tune = read_json(best, f"tune@{name}") if best.exists() else None
    fidelity = read_json(artifacts.fidelity(name), f"fidelity@{name}")
    if not isinstance(fidelity, dict):
        raise ReportError(f"{artifacts.fidelity(name)} must map DEQ variants to their fidelity rows")
    per_seed = read_json(artifacts.seed_metrics(name), f"evaluate@{name}")
    if not isinstance(per_seed, dict) or not all(isinstance(v, dict) for v in per_seed.values()):
        raise ReportError(f"{artifacts.seed_metrics(name)} must map variants to {{seed: metrics}} objects")
    seed_metrics = {v: {int(seed): m for seed, m in by_seed.items()} for v, by_seed in per_seed.items()}
    return ExperimentData(name, spec, metrics, curves, tune, fidelity, seed_metrics)


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


def read_memory_bench(path: Path, shown: str | None = None) -> MemoryBench:
    """The bench stage's rows (``shown``: how the report names the file)."""
    if not path.exists():
        raise ReportError(f"{path} is missing: run the bench stage first (dvc repro bench)")
    try:
        rows = memory_bench_rows(path.read_text().splitlines(), str(path))
    except ValueError as err:
        raise ReportError(f"{err}: re-run dvc repro bench") from None
    return MemoryBench(rows, f"`{shown or path}`")
