"""params.yaml, parsed once into typed, validated settings.

Every section forbids unknown keys, so a typo is an error that names the key; bad values name the key,
the value and what is allowed. Each DVC stage reads only its sections (and dvc.yaml lists exactly those).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field, PrivateAttr, ValidationError, create_model, field_validator, model_validator

from deqsm.config import DEQSettings, LossSettings
from deqsm.schema import Strict, describe_errors
from deqsm.data.settings import DataSettings
from deqsm.experiments import Depth, ModelName, VariantName, Width
from deqsm.models import MODELS
from deqsm.train import TrainSettings
from pipelines import ParamsError, read_params_file

ROOT = Path(__file__).resolve().parents[1]


class BaseSettings(Strict):
    seed: int = 0
    device: str = Field("auto", description="auto (CUDA when present) | cpu | cuda")
    out: str = Field("out", description="folder for intermediate outputs (Ray results, checkpoints)")
    results: str = Field("results", description="folder for metrics, tables and figures")
    threads: int | None = Field(1, ge=1, description="torch CPU threads of a stage process (null: torch's default)")
    workers: int | None = Field(None, ge=1, description="processes the train and evaluate stages run their jobs (a "
                                "variant and seed each) in (null: as many as the CPUs hold `threads` each)")

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


# The train.* keys experiments.<name>.train may set (seed and device are base's; progress, checkpoints the stages')
EXPERIMENT_TRAIN_KEYS = tuple(k for k in TrainSettings.model_fields
                              if k not in ("seed", "device", "progress", "checkpoint_every"))


class VariantSettings(Strict):
    """One model variant of an experiment (a row of the paper's tables)."""

    variant: VariantName
    depth: Depth = 2
    width: Width | None = Field(None, description="overrides the experiment's width")
    deq: dict[str, Any] = Field(default_factory=dict, description="a DEQ variant's own values of deq.* keys "
                                "(over the deq section), e.g. {norm: spectral, lam: 1.01}")

    @model_validator(mode="after")
    def _deq_keys(self) -> "VariantSettings":
        if self.deq and self.variant != "deq":
            raise ValueError(f"deq settings ({', '.join(self.deq)}) apply to a DEQ variant only; this variant is "
                             f"{self.variant!r}")
        if unknown := sorted(set(self.deq) - set(DEQSettings.model_fields)):
            raise ValueError(f"unknown deq key(s) {', '.join(map(repr, unknown))}; known: "
                             f"{', '.join(DEQSettings.model_fields)}")
        return self


class ExperimentSettings(Strict):
    """One experiment: a dataset, a model family, a loss, and the variants compared."""

    dataset: str
    model: ModelName
    width: Width = 64
    model_options: dict[str, Any] = Field(default_factory=dict)
    loss: LossSettings = Field(default_factory=LossSettings)
    variants: dict[str, VariantSettings]
    eval_options: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict, description="train.* values of this experiment's runs")

    @field_validator("train")
    @classmethod
    def _train_keys(cls, v: dict) -> dict:
        if unknown := sorted(set(v) - set(EXPERIMENT_TRAIN_KEYS)):
            raise ValueError(f"unknown train key(s) {', '.join(map(repr, unknown))}; an experiment can set "
                             f"{', '.join(EXPERIMENT_TRAIN_KEYS)}")
        return v

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
    grace_period: int = Field(1, ge=1, description="asha: evaluations every trial gets before it can be stopped")
    reduction_factor: float = Field(3.0, gt=1, description="asha: about 1 in this many trials of a variant goes "
                                    "on from each rung (evaluations grace_period × factor^k)")
    metric: str = Field("val_loss", description="a metric every trial reports: val_loss (the best validation "
                        "loss), val_<term>, train_<term>, step_ms_median, peak_bytes or params")
    mode: Literal["min", "max"] = "min"
    max_concurrent: int = Field(2, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0, description="fractional values pack trials on a GPU")
    steps: int = Field(200, ge=1, description="training steps per trial (the train stage uses train.steps)")
    max_failures: int = Field(2, ge=0, description="retries of a crashed trial, from its last checkpoint")
    allow_missing_variants: bool = Field(False, description="false: a variant without a finished trial fails the "
                                         "stage; true: it is left out of the train stage with a warning")
    address: str | None = Field(None, description="Ray cluster to join; RAY_ADDRESS overrides; null: local")
    connect_timeout: float = Field(30.0, gt=0, description="seconds the Ray cluster at address (or RAY_ADDRESS) "
                                   "has to accept a connection before the stage fails (exit 3)")
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


def _eval_settings() -> type[Strict]:
    """The ``eval`` section: defaults for every experiment's evaluation, each applied to the experiments whose
    model family has that option (:func:`experiment_eval_options`). Its fields are the families' own
    (:attr:`deqsm.models.ModelFamily.eval_options`), not copies, so bounds cannot disagree."""
    fields: dict[str, Any] = {}
    for name in MODELS:
        for key, info in MODELS.get(name).eval_options.model_fields.items():
            if key in fields and repr(fields[key][1]) != repr(info):
                raise TypeError(f"evaluation option {key!r} is defined differently by two model families")
            fields[key] = (info.annotation, info)
    return create_model("EvalSettings", __base__=Strict, __doc__=_eval_settings.__doc__, **fields)


EvalSettings = _eval_settings()


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


class PipelineTrainSettings(TrainSettings):
    """params.yaml's ``train`` section: the settings of every trial and retrained model
    (:class:`deqsm.train.TrainSettings`), and how often the train stage repeats each variant's training."""

    seeds: int = Field(3, ge=1, description="training seeds per variant (base.seed, base.seed + 1, ...): the "
                       "report's standard errors and verdicts are across them")
    def fit_settings(self) -> dict[str, Any]:
        """The keys :class:`deqsm.train.TrainSettings` takes (what a trial or one seed's training reads)."""
        return self.model_dump(exclude={"seeds"})

    def seed_values(self, base_seed: int) -> list[int]:
        return [base_seed + i for i in range(self.seeds)]


class TrackingSettings(Strict):
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI; relative sqlite paths are from the DVC "
                     "project's root (the one `dvc exp run --temp/--queue` started from)")
    experiment_prefix: str = ""
    timeout: float = Field(30.0, gt=0, description="seconds a stage waits for the store (a server's /health, a "
                           "locked SQLite file) before it stops with one line naming it")


class Settings(Strict):
    base: BaseSettings = Field(default_factory=BaseSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    deq: DEQSettings = Field(default_factory=DEQSettings)
    train: PipelineTrainSettings = Field(default_factory=PipelineTrainSettings)
    experiments: dict[str, ExperimentSettings] = Field(default_factory=dict)
    tune: TuneSettings = Field(default_factory=TuneSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    fidelity: FidelitySettings = Field(default_factory=FidelitySettings)
    bench: BenchSettings = Field(default_factory=BenchSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    _root: Path = PrivateAttr(default=ROOT)  # the folder of params.yaml: relative paths start there

    def experiment_train(self, name: str) -> dict[str, Any]:
        """Experiment ``name``'s train settings: the train section's, with the experiment's own over them."""
        return {**self.train.fit_settings(), **self.experiments[name].train}

    @model_validator(mode="after")
    def _datasets_exist(self) -> "Settings":
        known = set(self.data.dataset_names())
        for name, exp in self.experiments.items():
            if exp.dataset not in known:
                raise ValueError(f"experiments.{name}.dataset {exp.dataset!r} is not prepared by the data section "
                                 f"(prepared: {', '.join(sorted(known))}); declare it under data.datasets or "
                                 "name one of those")
        return self

    @property
    def root(self) -> Path:
        """The folder of params.yaml (the DVC project): relative paths in the settings start there."""
        return self._root

    def tracking_uri(self, root: Path | None = None) -> str:
        """params.yaml's tracking URI. A relative SQLite path starts at ``root``; by default at the DVC project
        the stage runs for (``DVC_ROOT``, which DVC sets for stage commands: under ``dvc exp run --temp`` or
        ``--queue`` it names the project the experiment was started from, not its temporary copy, so those
        runs land in the project's store), else at params.yaml's folder."""
        uri = self.tracking.uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            base = root or Path(os.environ.get("DVC_ROOT") or self._root)
            return "sqlite:///" + str(base / uri[len("sqlite:///"):])
        return uri


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Settings:
    """Read and validate params.yaml; ``overrides`` maps dotted keys to values (applied before validation)."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = ROOT / path
    from pipelines.trials import check_trials, set_dotted

    raw = read_params_file(path)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(f"invalid {path.name}:\n" + "\n".join(f"  {line}" for line in describe_errors(err))) from None
    settings._root = path.resolve().parent
    problems = check_trials(settings)
    if problems:
        raise ParamsError(f"invalid {path.name}:\n" + "\n".join(f"  {p}" for p in problems))
    return settings


def load_experiment_stage(params: str | Path, experiment: str) -> Settings:
    """A per-experiment stage's start: validated settings (threads applied) that hold ``experiment``."""
    settings = load_params(params)
    settings.base.apply_threads()
    if experiment not in settings.experiments:
        raise ParamsError(f"unknown experiment {experiment!r}; in params.yaml: {', '.join(settings.experiments)}")
    return settings


def run_experiment_stage(stage: Callable[[Settings, str], Any], module: str, doc: str | None,
                         argv: list[str] | None = None) -> None:
    """The command line of a per-experiment stage (``python -m <module> --params P --experiment E``):
    ``stage(settings, experiment)`` with validated settings, threads applied."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--experiment", required=True, help="the experiment of params.yaml to run this stage for")
    args = p.parse_args(argv)
    stage(load_experiment_stage(args.params, args.experiment), args.experiment)


from pipelines.guard import main_guard, terminate_as_interrupt  # noqa: E402,F401 (the stages' import)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
