"""params.yaml, parsed once into typed, validated settings.

Every section forbids unknown keys, so a typo is an error that names the key; bad values name the key,
the value and what is allowed. Each DVC stage reads only its sections (and dvc.yaml lists exactly those).
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from deqsm.config import DEQSettings, LossSettings, known_name
from deqsm.data.settings import DataSettings
from deqsm.train import TrainSettings
from pipelines import ParamsError, read_params_file

ROOT = Path(__file__).resolve().parents[1]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseSettings(Strict):
    seed: int = 0
    device: str = Field("auto", description="auto (CUDA when present) | cpu | cuda")
    out: str = Field("out", description="folder for intermediate outputs (Ray results, checkpoints)")
    results: str = Field("results", description="folder for metrics, tables and figures")
    threads: int | None = Field(1, ge=1, description="torch CPU threads of a stage process (null: torch's default)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "auto":
            import torch

            try:
                torch.device(v)
            except RuntimeError:
                raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda or cuda:<index>") from None
        return v

    def apply_threads(self) -> None:
        """Small models on a shared CPU run fastest single-threaded (and oversubscribed threads spin)."""
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)


class VariantSettings(Strict):
    """One model variant of an experiment (a row of the paper's tables)."""

    variant: Literal["deq", "explicit"]
    depth: int = Field(2, ge=1)
    width: int | None = Field(None, ge=1, description="overrides the experiment's width")


class ExperimentSettings(Strict):
    """One experiment: a dataset, a model family, a loss, and the variants compared."""

    dataset: str
    model: str
    width: int = Field(64, ge=1)
    model_options: dict[str, Any] = Field(default_factory=dict)
    loss: LossSettings = Field(default_factory=LossSettings)
    variants: dict[str, VariantSettings]
    eval_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        from deqsm.models import MODELS

        return known_name(v, MODELS)

    @field_validator("variants")
    @classmethod
    def _non_empty(cls, v: dict) -> dict:
        if not v:
            raise ValueError("an experiment needs at least one variant")
        return v


class SpaceEntry(Strict):
    """One search dimension: exactly one of grid / choice / uniform / loguniform / randint."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "SpaceEntry":
        given = [k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a search dimension needs exactly one of grid, choice, uniform, loguniform, "
                             f"randint; got {given or 'none'}")
        values = getattr(self, given[0])
        if given[0] in ("grid", "choice") and not values:
            raise ValueError(f"empty {given[0]} list: give at least one value")
        if given[0] in ("uniform", "loguniform", "randint") and not values[0] < values[1]:
            raise ValueError(f"{given[0]} bounds must satisfy low < high, got {list(values)}")
        if given[0] == "loguniform" and values[0] <= 0:
            raise ValueError(f"loguniform bounds must be positive, got {list(values)}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    def extremes(self) -> list[Any]:
        """Every value a grid / choice can take; the lowest and highest a range can (randint's high is exclusive)."""
        values = getattr(self, self.kind)
        return list(values) if self.kind in ("grid", "choice") else (
            [values[0], values[1] - 1] if self.kind == "randint" else list(values))


TUNABLE_SECTIONS = ("deq", "train", "loss", "model_options", "width")


class TuneSettings(Strict):
    search_space: dict[str, SpaceEntry] = Field(
        default_factory=dict, description="dotted key (deq.*, train.*, loss.options.*, model_options.*) → dimension")
    num_samples: int = Field(1, ge=1)
    scheduler: Literal["fifo", "asha"] = "fifo"
    metric: str = Field("val_loss", description="a metric every trial reports: val_loss (the best validation "
                        "loss), val_<term>, train_<term>, step_ms_median, peak_bytes or params")
    mode: Literal["min", "max"] = "min"
    max_concurrent: int = Field(2, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0, description="fractional values pack trials on a GPU")
    steps: int = Field(200, ge=1, description="training steps per trial (the train stage uses train.steps)")
    max_failures: int = Field(2, ge=0, description="retries of a crashed trial, from its last checkpoint")
    address: str | None = Field(None, description="Ray cluster to join; RAY_ADDRESS overrides; null: local")
    num_cpus: int | None = Field(2, ge=1, description="CPUs of a local Ray instance")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a local Ray instance (null: detect)")

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in ("step_ms_median", "peak_bytes", "params") and not v.startswith(("val_", "train_")):
            raise ValueError(f"unknown tune metric {v!r}; trials report val_loss, val_<term>, train_<term>, "
                             "step_ms_median, peak_bytes and params")
        return v

    @field_validator("search_space")
    @classmethod
    def _keys(cls, v: dict) -> dict:
        for key in v:
            if key.split(".")[0] not in TUNABLE_SECTIONS:
                raise ValueError(f"search_space key {key!r} must start with one of {', '.join(TUNABLE_SECTIONS)}")
        return v


class EvalSettings(Strict):
    is_samples: int = Field(100_000, ge=100, description="importance samples for log Z (paper: 10⁶)")
    batch_size: int = Field(500, ge=1)


class FidelitySettings(Strict):
    """The fidelity stage: phantom-K vs exact implicit gradients of every trained DEQ (the paper's appendix C)."""

    rows: int = Field(128, ge=1, description="test rows the gradients are taken on")
    ks: list[int] = Field([1, 2, 4, 8], min_length=1, description="phantom steps K compared with the exact gradient")

    @field_validator("ks")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError(f"phantom steps must be >= 1, got {v}")
        return v


class BenchSettings(Strict):
    """The bench stage: benchmarks/memory_depth.py (one SSM step of explicit depth L vs one DEQ layer). The
    defaults take seconds on 2 CPU cores; the paper's size is in_dim 784, width 1000, batch 128."""

    device: str = Field("cpu", description="cpu | cuda | auto")
    in_dim: int = Field(32, ge=1)
    width: int = Field(64, ge=1)
    batch: int = Field(16, ge=1)
    depths: list[int] = Field([1, 2, 4, 8, 16, 32], min_length=1, description="explicit depths L")
    iters: list[int] = Field([5, 10, 20], min_length=1, description="DEQ solver iterations")
    backwards: list[Literal["phantom", "implicit", "unroll"]] = Field(["phantom", "implicit", "unroll"], min_length=1)
    repeats: int = Field(1, ge=1, description="timed steps per variant (after one warm-up)")
    timeout: float = Field(600.0, gt=0, description="seconds before the benchmark is stopped")

    @field_validator("depths", "iters")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(x < 1 for x in v):
            raise ValueError(f"values must be >= 1, got {v}")
        return v

    def script_args(self) -> list[str]:
        return ["--device", self.device, "--in-dim", str(self.in_dim), "--width", str(self.width),
                "--batch", str(self.batch), "--depths", *map(str, self.depths), "--iters", *map(str, self.iters),
                "--backwards", *self.backwards, "--repeats", str(self.repeats)]


class TrackingSettings(Strict):
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI; relative sqlite paths are from the repo")
    experiment_prefix: str = ""


class Settings(Strict):
    base: BaseSettings = Field(default_factory=BaseSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    deq: DEQSettings = Field(default_factory=DEQSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    experiments: dict[str, ExperimentSettings] = Field(default_factory=dict)
    tune: TuneSettings = Field(default_factory=TuneSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    fidelity: FidelitySettings = Field(default_factory=FidelitySettings)
    bench: BenchSettings = Field(default_factory=BenchSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    _root: Path = PrivateAttr(default=ROOT)  # the folder of params.yaml: relative paths start there

    @model_validator(mode="after")
    def _datasets_exist(self) -> "Settings":
        known = set(self.data.dataset_names())
        for name, exp in self.experiments.items():
            if exp.dataset not in known:
                raise ValueError(f"experiments.{name}.dataset {exp.dataset!r} is not prepared by the data section; "
                                 f"prepared: {', '.join(sorted(known))}")
        return self

    @property
    def root(self) -> Path:
        """The folder of params.yaml (the DVC project): relative paths in the settings start there."""
        return self._root

    def tracking_uri(self, root: Path | None = None) -> str:
        """params.yaml's tracking URI; a relative SQLite path starts at ``root`` (default: params.yaml's folder)."""
        uri = self.tracking.uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return "sqlite:///" + str((root or self._root) / uri[len("sqlite:///"):])
        return uri


def _unknown_key(loc: tuple, root: type[BaseModel]) -> str:
    """'unknown key; known: ...' for the key at ``loc`` under ``root`` (walks fields, ``X | None`` and
    ``dict[str, X]`` down to the class that holds it)."""
    import types
    import typing

    node: Any = root
    for part in loc[:-1]:
        if isinstance(node, type) and issubclass(node, BaseModel) and str(part) in node.model_fields:
            node = node.model_fields[str(part)].annotation
        elif typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        else:
            return "unknown key"
        while typing.get_origin(node) in (typing.Union, types.UnionType):
            node = next(a for a in typing.get_args(node) if a is not type(None))
    if isinstance(node, type) and issubclass(node, BaseModel):
        return f"unknown key; known: {', '.join(node.model_fields)}"
    return "unknown key"


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = _unknown_key(tuple(e["loc"]), Settings)
        lines.append(f"  {key}: {msg} (got {e.get('input')!r})" if e["type"] != "extra_forbidden" else f"  {key}: {msg}")
    return "\n".join(lines)


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Settings:
    """Read and validate params.yaml; ``overrides`` maps dotted keys to values (applied before validation)."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = ROOT / path
    raw = read_params_file(path)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(f"invalid {path.name}:\n{_format(err)}") from None
    settings._root = path.resolve().parent
    problems = check_trials(settings)
    if problems:
        raise ParamsError(f"invalid {path.name}:\n" + "\n".join(f"  {p}" for p in problems))
    return settings


def check_trials(settings: Settings) -> list[str]:
    """Problems of the trial configurations the sections combine into (model options, loss options, eval
    options, every search-space value applied to every variant), found here rather than in each Ray trial."""
    from deqsm.experiments import EvalOptions, ExperimentSpec
    from deqsm.train import TrainSettings

    samples = [(key, {key: value}) for key, entry in settings.tune.search_space.items() for value in entry.extremes()]
    problems: dict[str, None] = {}  # ordered, without repeats (each variant meets the same mistakes)

    def check(cfg: dict[str, Any]) -> list[tuple[str, str]]:
        found = []
        for section, model, data in (("", ExperimentSpec, cfg["spec"]), ("train", TrainSettings, cfg["train"]),
                                     ("eval_options", EvalOptions, cfg["eval_options"])):
            try:
                model(**data)
            except ValidationError as err:
                for e in err.errors():
                    msg = (_unknown_key(tuple(e["loc"]), model) if e["type"] == "extra_forbidden"
                           else e["msg"].removeprefix("Value error, "))
                    found.append((".".join(str(p) for p in (section, *e["loc"]) if p != ""), msg))
        return found

    for name in settings.experiments:
        for variant in settings.experiments[name].variants:
            base = trial_config(settings, name, variant)
            found = check(base)
            for where, msg in found:
                problems[f"experiments.{name}{'.' + where if where else ''}: {msg}"] = None
            if found:
                continue  # the search-space values are checked on a valid configuration
            for key, sample in samples:
                for where, msg in check(apply_sample(base, sample)):
                    problems[f"tune.search_space.{key}: value {sample[key]!r} is invalid ({where}: {msg})"] = None
    return list(problems)


def load_experiment_stage(params: str | Path, experiment: str) -> Settings:
    """A per-experiment stage's start: validated settings (threads applied) that hold ``experiment``."""
    settings = load_params(params)
    settings.base.apply_threads()
    if experiment not in settings.experiments:
        raise ParamsError(f"unknown experiment {experiment!r}; in params.yaml: {', '.join(settings.experiments)}")
    return settings


def set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts → dotted keys (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def trial_config(settings: Settings, experiment: str, variant: str) -> dict[str, Any]:
    """The full, plain-data configuration of one variant's trials: the experiment's spec with the deq,
    train and eval sections (search values are applied on top by :func:`apply_sample`)."""
    exp = settings.experiments[experiment]
    var = exp.variants[variant]
    cfg = {
        "experiment": experiment,
        "variant_name": variant,
        "dataset": exp.dataset,
        "spec": {
            "name": f"{experiment}/{variant}",
            "model": exp.model,
            "variant": var.variant,
            "depth": var.depth,
            "width": var.width or exp.width,
            "model_options": copy.deepcopy(exp.model_options),
            "loss": exp.loss.model_dump(),
            "deq": settings.deq.model_dump(),
        },
        "train": settings.train.model_dump(),
        "eval_options": {**settings.eval.model_dump(), **exp.eval_options},
    }
    cfg["train"]["seed"] = settings.base.seed
    cfg["train"]["device"] = settings.base.device
    return cfg


def apply_sample(cfg: dict[str, Any], sample: dict[str, Any]) -> dict[str, Any]:
    """A copy of a trial config with sampled values (dotted keys: train.*, width, deq.*, loss.*, model_options.*)."""
    cfg = copy.deepcopy(cfg)
    for key, value in sample.items():
        section, _, rest = key.partition(".")
        if section == "train":
            set_dotted(cfg["train"], rest, value)
        elif section == "width":
            cfg["spec"]["width"] = value
        else:
            set_dotted(cfg["spec"], key, value)
    return cfg


def main_guard(fn) -> None:
    """Run a stage's main; a bad-input error becomes one clear line on stderr and exit status 2, an
    interrupt (Ctrl-C, or SIGINT from DVC) exit status 130 without a traceback."""
    try:
        fn()
    except (ParamsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; run `dvc repro` again to continue", file=sys.stderr)
        sys.exit(130)


os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
