"""Ray Tune: the search (with :mod:`pipelines.ray_session`, :mod:`pipelines.asha` and :mod:`pipelines.trial_logger`,
the only modules that call Ray; Ray renames its APIs often: four places to mend).

- Ray's session (local or a cluster, token auth, reachability) is :mod:`pipelines.ray_session`; the per-variant
  ASHA scheduler and the grid's middle-out order are :mod:`pipelines.asha`.
- :func:`run_search` runs one pipeline experiment: a grid over its model variants × the search space of
  params.yaml (a grid over ``deq`` settings multiplies the DEQ variants only:
  :func:`pipelines.trials.search_arms`), each trial calling :func:`deqsm.experiments.run`; data reaches trials
  once, through the object store (``tune.with_parameters``); trials checkpoint through Ray's API and a crashed trial is
  retried from its last checkpoint (``FailureConfig``). An interrupted search (Ctrl-C / SIGINT: Ray Tune
  stops it and :func:`run_search` raises ``KeyboardInterrupt``, the stage exits 130) is resumed by the next
  run when its configuration, data and code are unchanged; a finished search is never reused.
- Test hook: with ``DEQSM_TRIAL_PID_DIR=<folder>`` in the workers' environment, every trial (and every retry)
  writes its process id to ``<folder>/<trial_id>.pid`` (tests/test_reliability.py kills a trial with it).
- :class:`pipelines.trial_logger.MlflowTrialLogger` logs each trial from the driver as one MLflow run nested
  under the stage's parent run (a retried trial stays the same run; a failed one ends FAILED with a
  ``failure_reason``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Trials checkpoint at each evaluation; short trials do so often, which is expected: no warning per snapshot.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import FIFOScheduler  # noqa: E402
from ray.tune.search.basic_variant import BasicVariantGenerator  # noqa: E402

from pipelines.asha import VariantASHA, middle_out  # noqa: E402
from pipelines.trial_logger import RAY_BOOKKEEPING, MlflowTrialLogger, stopped_early  # noqa: E402
from pipelines.settings import Settings, SpaceEntry  # noqa: E402
from pipelines.trials import apply_sample, deq_only, search_arms, trial_point  # noqa: E402
from pipelines.provenance import device_label, provenance_tags  # noqa: E402
from pipelines.tracking import Tracker  # noqa: E402



class _NotReportedYet(logging.Filter):
    """Ray warns, with a traceback-like list, about every trial that has not reported a result yet whenever it
    reads a search's folder (on resume, and after an interrupted fit). Such a trial is expected there and
    handled by :func:`run_search`; other fetch failures still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not text.startswith("Failed to fetch metrics"):
            return True
        items = [ln for ln in text.splitlines()[1:] if ln.startswith("- ")]
        return not all("both result.json and progress.csv were not found" in ln for ln in items)


logging.getLogger("ray.tune.analysis.experiment_analysis").addFilter(_NotReportedYet())


def to_tune_domain(entry: SpaceEntry, asha: bool = False):
    kind = entry.kind
    value = getattr(entry, kind)
    if kind == "grid":
        return tune.grid_search(middle_out(list(value)) if asha else list(value))
    if kind == "choice":
        return tune.choice(list(value))
    if kind == "uniform":
        return tune.uniform(*value)
    if kind == "loguniform":
        return tune.loguniform(*value)
    return tune.randint(*value)


def _key(dotted: str) -> str:
    return dotted.replace(".", "__")  # Ray flattens nested configs with "/"; keep keys flat and plain


class _TrialReporter:
    """deqsm.train callbacks → tune.report: each checkpoint goes to Ray with the latest metrics."""

    def __init__(self, ckpt_dir: Path, device: str) -> None:
        self.ckpt_dir = ckpt_dir
        self.latest: dict[str, float | str] = {"device": device}  # the worker's device: the trial run's tag
        self.step = 0  # the last step completed

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.latest.update(metrics)
        self.step = step

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.latest.update(metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        tune.report({**self.latest, "step": step}, checkpoint=tune.Checkpoint.from_directory(str(self.ckpt_dir)))


def _latest_checkpoint(trial_root: str | None, trial_id: str) -> Path | None:
    """The trial's newest readable checkpoint in the search's folder (shared storage), or None.

    Ray restores a trial from the checkpoint its last experiment snapshot names, and takes that snapshot every
    10 s or so: a search killed between a trial's checkpoint (or its end) and the next snapshot would retrain
    the trial from that older checkpoint or from scratch. A worker writes its checkpoints to storage itself
    before it reports them, so the newest one there is where the trial really was."""
    from deqsm.train import TrainingError, load_checkpoint

    if not trial_root:
        return None
    found = sorted((p for d in Path(trial_root).glob(f"*_{trial_id}_*") for p in d.glob("checkpoint_*/last.pt")),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for path in found:
        try:
            load_checkpoint(path)  # a checkpoint cut short by the kill is passed over for the one before
        except TrainingError:
            continue
        return path.parent
    return None


def _trainable(config: dict[str, Any], base_configs: dict[str, dict], splits: dict,
               trial_root: str | None = None, worst: dict[str, float] | None = None,
               floor: tuple[float, float] | None = None) -> None:
    """One trial (runs in a Ray worker): train on the train split, select on the validation split. The test
    split is left to the evaluate stage, so model selection never sees it.

    Training that cannot go on (:class:`deqsm.train.TrainingError`: a non-finite loss, a solver that keeps
    missing its tolerance) ends the trial with a result that names the error (``failed``) and holds ``worst``
    (the search metric's worst value), rather than raising: the configuration diverged, so a retry
    (``tune.max_failures``) would diverge again, and a raised error also costs the worker process (the next
    trial then starts a new one and imports torch again). The trial logger marks such a run FAILED."""
    from deqsm.experiments import VariantSpec, SolverRecorder, train_model
    from deqsm.train import TrainingError, TrainSettings

    variant, sample = trial_point(config)
    cfg = apply_sample(base_configs[variant], sample)
    spec = VariantSpec(**cfg["spec"])
    train = TrainSettings(**{**cfg["train"], "progress": False, "checkpoint_every": None})
    ckpt_dir = Path(tempfile.mkdtemp(prefix="deqsm-trial-"))
    pid_dir = os.environ.get("DEQSM_TRIAL_PID_DIR")
    if pid_dir:  # opt-in (tests/test_reliability.py): which process runs each trial, so a test can kill it
        Path(pid_dir, f"{tune.get_context().get_trial_id()}.pid").write_text(str(os.getpid()))
    latest = _latest_checkpoint(trial_root, tune.get_context().get_trial_id())
    if latest is not None:  # a retried or resumed trial goes on from its newest checkpoint
        shutil.copytree(latest, ckpt_dir, dirs_exist_ok=True)
    elif (restored := tune.get_checkpoint()) is not None:  # storage not seen from this node: Ray's checkpoint
        with restored.as_directory() as d:
            shutil.copytree(d, ckpt_dir, dirs_exist_ok=True)
    recorder = SolverRecorder()
    device = device_label(train.device)  # as fit resolves it, in this worker (which may see no GPU)
    reporter = _TrialReporter(ckpt_dir, device)
    try:
        try:
            model, fit = train_model(spec, splits, train, callbacks=[reporter, recorder], checkpoint_dir=ckpt_dir,
                                     loss_floor=floor)
        except TrainingError as err:
            tune.report({**(worst or {}), "failed": f"{type(err).__module__}.{type(err).__name__}: {err}",
                         "final": 1.0, "device": device, "step": reporter.step})
            return
        summary = {k: v for k, v in fit.summary().items() if isinstance(v, (int, float))}
        # a DEQ's depth where its kept weights were taken (the best validation step): the study's depth axis
        at_best = next((h for h in fit.history if h.get("step") == fit.best_step), {})
        summary.update({f"best_{k}": v for k, v in at_best.items() if k.startswith("deq_")})
        summary["val_loss"] = fit.best_val_loss  # the selection metric: the best validation loss reached
        summary["params"] = float(sum(p.numel() for p in model.parameters()))
        # node_id: which Ray node ran the trial (the cluster test checks trials spread over nodes)
        # step: the last training step, so the summary is the latest value of its MLflow metrics (val_loss: best)
        tune.report({**summary, **recorder.summary(), "final": 1.0, "device": device, "step": fit.steps,
                     "node_id": ray.get_runtime_context().get_node_id()})
    finally:
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def _digest(splits: dict) -> str:
    """The trials' data and the code they run: an unfinished search is resumed only when neither changed."""
    import deqsm

    h = hashlib.sha256()
    for key in sorted(splits):
        h.update(key.encode())
        h.update(splits[key].contiguous().cpu().numpy().tobytes())
    for package in (Path(deqsm.__file__).parent, Path(__file__).parent):
        for path in sorted(package.rglob("*.py")):
            h.update(path.read_bytes())
    return h.hexdigest()


# What a result holds besides the trial's own figures: Ray's bookkeeping (when, where, which process) and the
# trial's timings. They differ on every run of the same search, so they stay in MLflow and out of best.json,
# which DVC hashes: an unchanged search then leaves best.json byte-identical and its downstream stages alone.
_RUN_SPECIFIC = RAY_BOOKKEEPING - {"training_iteration"} | {"step_ms_median", "peak_bytes", "memory_kind", "device"}


def reproducible_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """A trial's reported figures without run-specific ones (:data:`_RUN_SPECIFIC`), sorted by name."""
    return {k: v for k, v in sorted(metrics.items())
            if isinstance(v, (int, float, str)) and not isinstance(v, bool) and k not in _RUN_SPECIFIC}


# What each trial's entry in best.json's results holds besides its metric: the DEQ's depth at its best step (a
# trial ASHA stopped: at its last evaluation) and what it cost (the report's depth study plots the metric against
# them). On the CPU the memory figure is the autograd graph's saved bytes, the same on every run of one
# configuration.
STUDY_KEYS = ("best_deq_contraction", "best_deq_iterations", "best_deq_depth_gain", "best_deq_weight_norm",
              "peak_bytes", "params", "best_step")


@dataclass
class SearchOutcome:
    best: dict[str, dict]        # variant → {"config": trial config, "metrics": last result}
    failed: dict[str, list[str]]  # variant → failure reasons
    results: list[dict]           # every finished trial: variant, sample, the metric, steps, stopped early or not
    n_trials: int
    parent_run_id: str            # the MLflow run the trials are nested under (a resumed search keeps its first)


def run_search(settings: Settings, experiment: str, base_configs: dict[str, dict], splits: dict,
               tracker: Tracker, parent_run_id: str, storage: Path,
               floor: tuple[float, float] | None = None) -> SearchOutcome:
    """Tune one experiment: variants × search space; returns the best trial per variant. ``floor``: the data's
    score-matching floor (generated data), for the trials' degenerate-loss guard (:mod:`deqsm.floor`)."""
    ts = settings.tune
    # Grids over deq settings multiply the DEQ variants only: each (variant, deq values) pair is one "arm"
    deq_grids = {key: list(entry.grid) for key, entry in ts.search_space.items() if deq_only(key) and entry.grid}
    arms = search_arms({v: c["spec"]["variant"] for v, c in base_configs.items()}, deq_grids)
    param_space: dict[str, Any] = ({"arm": tune.grid_search(arms)} if deq_grids
                                   else {"variant_name": tune.grid_search(sorted(base_configs))})
    for key, entry in ts.search_space.items():
        if key not in deq_grids:
            param_space[_key(key)] = to_tune_domain(entry, asha=ts.scheduler == "asha")
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, base_configs=base_configs, splits=splits, floor=floor,
                             trial_root=str((storage / experiment).resolve()),
                             worst={ts.metric: math.inf if ts.mode == "min" else -math.inf}),
        {"cpu": ts.cpus_per_trial, "gpu": ts.gpus_per_trial})
    n_evals = max(1, base_configs[next(iter(base_configs))]["train"]["steps"]
                  // base_configs[next(iter(base_configs))]["train"]["eval_every"])
    # A trial reports at each evaluation and once at its end: n_evals + 1 results; ASHA's rungs count them. It runs
    # to its end from its last evaluation (stopping it there would only lose its summary report).
    scheduler = (VariantASHA(max_t=n_evals + 1, grace_period=min(ts.grace_period, n_evals + 1),
                             reduction_factor=ts.reduction_factor, last_stop=n_evals - 1)
                 if ts.scheduler == "asha" else FIFOScheduler())
    storage.mkdir(parents=True, exist_ok=True)
    name = experiment
    run_dir = storage / name
    fingerprint = hashlib.sha256(json.dumps([base_configs, {k: v.model_dump() for k, v in ts.search_space.items()},
                                             ts.num_samples, ts.scheduler, ts.grace_period, ts.reduction_factor,
                                             settings.base.seed, _digest(splits)], sort_keys=True, default=str)
                                 .encode()).hexdigest()
    # The marker exists only while a search is unfinished (removed below once tuner.fit has run to the end).
    marker = storage / f"{name}.fingerprint"
    parent_file = storage / f"{name}.parent"  # the MLflow parent run the (restored) trial logger nests under
    trials_parent = parent_run_id
    total = ts.num_samples * len(arms) * math.prod(len(e.grid) for k, e in ts.search_space.items()
                                                    if e.grid and k not in deq_grids)
    callback = MlflowTrialLogger(tracker, settings.tracking.experiment_prefix + experiment, parent_run_id, base_configs,
                                 provenance_tags(settings, "pipelines.tune", device=False), total,
                                 settings.root / settings.data.root)
    if (marker.exists() and marker.read_text() == fingerprint and tune.Tuner.can_restore(str(run_dir))):
        # An interrupted search with the same configuration: finish it instead of starting over. Ray restores
        # the saved trial logger too, which keeps nesting trials under the first attempt's parent run.
        if parent_file.exists():
            trials_parent = parent_file.read_text().strip()
        print(f"{experiment}: resuming the interrupted search in {run_dir} (same configuration, data and code); "
              "finished trials are kept, unfinished ones go on from their newest checkpoint", flush=True)
        tuner = tune.Tuner.restore(str(run_dir), trainable=trainable, resume_errored=True, param_space=param_space)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        marker.write_text(fingerprint)
        parent_file.write_text(parent_run_id)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            # Sampled dimensions (uniform, loguniform, ...) are drawn from base.seed: the same params draw the
            # same configurations, so an unchanged search selects the same best (and best.json, which DVC hashes).
            tune_config=tune.TuneConfig(metric=ts.metric, mode=ts.mode, num_samples=ts.num_samples,
                                        scheduler=scheduler,  # the generator limits concurrency itself
                                        # a finished trial's worker process runs the next trial: no new
                                        # process (and torch import) per trial, seconds each on 2 cores
                                        reuse_actors=True,
                                        search_alg=BasicVariantGenerator(max_concurrent=ts.max_concurrent,
                                                                         random_state=settings.base.seed)),
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage.resolve()), callbacks=[callback],
                failure_config=tune.FailureConfig(max_failures=ts.max_failures),
                # Every checkpoint is kept: with num_to_keep=1 a trial deleted checkpoint N as it wrote N+1,
                # while Ray's experiment snapshot (what a run killed at that moment resumes from) still named
                # N, and the resumed trial then failed ("does not exist on storage anymore"). A trial saves
                # one per evaluation (tune.steps / train.eval_every), and a finished search's folder is
                # replaced by the next one.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                verbose=0),  # progress: one line per finished trial (MlflowTrialLogger)
        )
    grid = tuner.fit()
    # Ray Tune catches SIGINT itself: fit() then returns normally with the running trials cut short. Its last
    # experiment snapshot (on disk, taken before Ray's cleanup marks them TERMINATED) still says RUNNING/PENDING.
    unfinished = [t.trial_id for t in tune.ExperimentAnalysis(str(run_dir)).trials
                  if t.status not in ("TERMINATED", "ERROR")]
    if unfinished:
        raise KeyboardInterrupt(f"tune search {name!r} interrupted with {len(unfinished)} unfinished trial(s); "
                                f"its state is in {run_dir} and the next run resumes it")
    marker.unlink(missing_ok=True)  # finished: a later run (changed code or data) starts a new search
    trials = [(trial_point(r.config), r.metrics, r.error) for r in grid]
    best, failed, results = select_trials(trials, base_configs, ts.metric, ts.mode)
    return SearchOutcome(best, failed, results, len(grid), trials_parent)


def select_trials(trials: list[tuple[tuple[str, dict], dict | None, Exception | None]], base_configs: dict[str, dict],
                  metric: str, mode: str) -> tuple[dict[str, dict], dict[str, list[str]], list[dict]]:
    """A finished search's trials (``((variant, sample), metrics, error)`` each) → the best configuration per
    variant, the failures per variant, and every finished trial's entry of best.json's ``results``. A trial that
    failed, or whose loss fell below the data's floor (``loss_degenerate``, :mod:`deqsm.floor`), is not selected."""
    best: dict[str, dict] = {}
    failed: dict[str, list[str]] = {}
    results: list[dict] = []
    for (variant, sample), metrics, error in trials:
        if error is not None or not metrics or metric not in metrics:
            failed.setdefault(variant, []).append(str(error).strip().splitlines()[-1] if error
                                                  else f"no {metric} reported")
            continue
        if isinstance(metrics.get("failed"), str):  # training stopped on an error (see _trainable)
            failed.setdefault(variant, []).append(metrics["failed"].splitlines()[0])
            continue
        value = metrics[metric]
        degenerate = bool(metrics.get("loss_degenerate"))
        # a trial ASHA stopped sent no summary: its depth is the one at its last evaluation
        study = {k: metrics[k] for k in STUDY_KEYS if isinstance(metrics.get(k), (int, float))}
        study.update({f"best_{k}": v for k, v in metrics.items() if k.startswith("deq_")
                      and f"best_{k}" in STUDY_KEYS and f"best_{k}" not in study and isinstance(v, (int, float))})
        results.append({"variant": variant, "sample": sample, metric: value, "step": metrics.get("step"),
                        "stopped_early": stopped_early(metrics), "degenerate": degenerate, **study})
        if degenerate:  # its loss fell below what the data allow: not a model to select
            continue
        prev = best.get(variant)
        if prev is None or (value < prev["metrics"][metric] if mode == "min" else value > prev["metrics"][metric]):
            best[variant] = {"config": apply_sample(base_configs[variant], sample), "sample": sample,
                             "metrics": reproducible_metrics(metrics)}
    results.sort(key=lambda r: (r["variant"], json.dumps(r["sample"], sort_keys=True, default=str)))
    return best, failed, results
