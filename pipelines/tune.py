"""DVC stage `tune`: a Ray Tune search per experiment of params.yaml; every trial logged to MLflow.

Writes ``<out>/tune/<experiment>/best.json`` (the best configuration and metrics per model variant, which
the `train` stage retrains, and every finished trial's sample and metric, which the report plots). A failed
trial (NaN loss, diverging solver, crash after its retries) is reported and logged FAILED to MLflow while the
others go on; the stage exits non-zero, with a summary, only when an experiment has no finished trial at all.
"""
from __future__ import annotations

import argparse
import sys
import time

from pipelines.artifacts import Artifacts, load_splits, write_json
from pipelines.settings import ParamsError, Settings, load_params, main_guard
from pipelines.trials import trial_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.tune", description=__doc__)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--experiment", action="append", help="run only this experiment (repeatable)")
    return p.parse_args(argv)


# Train settings a trial does not take from params.yaml: its length is tune.steps, it prints no progress bar and
# checkpoints through Ray. dvc.yaml's tune stage lists the train.* params that remain.
NOT_FROM_TRAIN = ("steps", "progress", "checkpoint_every")


def search_config(settings: Settings, name: str, variant: str) -> dict:
    """What the search trains for one variant: :func:`trial_config` for ``tune.steps`` steps, without the
    settings the search does not read (:data:`NOT_FROM_TRAIN`, the evaluation options), so that changing them
    does not change the search or its best.json."""
    cfg = trial_config(settings, name, variant)
    cfg.pop("eval_options")
    for key in NOT_FROM_TRAIN:
        cfg["train"].pop(key)
    cfg["train"]["steps"] = settings.tune.steps
    return cfg


def check_models_build(settings: Settings, names: list[str], splits: dict[str, dict]) -> None:
    """Build every variant's model on its training split once, before Ray starts: a model that does not fit
    its data (a VAE on pixels that are not binarised, NCSN on vectors, ...) is one clear error here instead
    of a FAILED trial per search point."""
    import torch

    from deqsm.experiments import VariantSpec, build

    for name in names:
        for variant in settings.experiments[name].variants:
            cfg = trial_config(settings, name, variant)
            try:
                with torch.random.fork_rng():  # building draws initial weights: leave the seeds as they were
                    build(VariantSpec(**cfg["spec"]), splits[name]["train"])
            except ValueError as err:
                raise ParamsError(f"experiments.{name}.variants.{variant} (model {cfg['spec']['model']!r} on "
                                  f"dataset {cfg['dataset']!r}): {err}") from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = load_params(args.params)
    names = args.experiment or list(settings.experiments)
    unknown = sorted(set(names) - set(settings.experiments))
    if unknown:
        raise ParamsError(f"unknown experiment(s) {unknown}; in params.yaml: {', '.join(settings.experiments)}")
    # Check every input and service before anything is written (a missing or corrupt dataset, a model that does
    # not fit its data, an unreachable or broken MLflow store, then the Ray cluster as the session starts).
    from pipelines.provenance import provenance_tags
    from pipelines.tracking import Tracker, check_store

    check_store(settings.tracking_uri(), settings.tracking.timeout)
    artifacts = Artifacts.of(settings)
    splits = {name: load_splits(artifacts, settings.experiments[name].dataset) for name in names}
    check_models_build(settings, names, splits)

    from deqsm.data import true_density
    from deqsm.floor import data_floor
    from pipelines.ray_search import run_search
    from pipelines.ray_session import ray_session

    storage = artifacts.ray_storage
    failures: list[str] = []
    with ray_session(settings) as resources:
        print(f"ray: {resources}", flush=True)
        tracker = Tracker.open(settings.tracking_uri(), [settings.tracking.experiment_prefix + n for n in names],
                               settings.tracking.timeout)
        for name in names:
            exp = settings.experiments[name]
            mlflow_exp = settings.tracking.experiment_prefix + name
            base = {v: search_config(settings, name, v) for v in exp.variants}
            parent = tracker.start_run(mlflow_exp, f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                                       {"tune.num_samples": settings.tune.num_samples,
                                        "tune.scheduler": settings.tune.scheduler,
                                        "tune.steps": settings.tune.steps,
                                        **({"tune.grace_period": settings.tune.grace_period,
                                            "tune.reduction_factor": settings.tune.reduction_factor}
                                           if settings.tune.scheduler == "asha" else {}),
                                        **{f"tune.search_space.{k}": v.model_dump(exclude_none=True)
                                           for k, v in settings.tune.search_space.items()}},
                                       {"stage": "tune", **provenance_tags(settings, "pipelines.tune")})
            trial_splits = {k: v for k, v in splits[name].items() if k != "test"}  # test: evaluate stage only
            try:
                outcome = run_search(settings, name, base, trial_splits, tracker, parent, storage,
                                     floor=data_floor(true_density(artifacts.data_root, exp.dataset),
                                                      trial_splits["train"]))
            except BaseException as err:  # an interrupt ends the parent run KILLED, an error FAILED
                interrupted = isinstance(err, KeyboardInterrupt)
                tracker.end_run(parent, "KILLED" if interrupted else "FAILED",
                                failure_reason=None if interrupted else f"{type(err).__name__}: {err}")
                # the trials cut short (Ray calls no callback for them): KILLED too, not RUNNING forever
                tracker.end_own_runs(mlflow_exp, "KILLED", failure_reason="the tune stage was interrupted; "
                                     "the next run resumes this trial" if interrupted else f"{type(err).__name__}")
                raise
            missing = sorted(set(exp.variants) - set(outcome.best))
            reason = "; ".join(f"{v}: {', '.join(outcome.failed.get(v, ['no result']))}" for v in missing) or None
            for run in {parent, outcome.parent_run_id}:  # the best trial's metric per variant, on the parent run(s)
                tracker.log_best(run, settings.tune.metric, settings.tune.mode,
                                 {v: b["metrics"].get(settings.tune.metric) for v, b in outcome.best.items()})
            # A variant without a finished trial fails the stage (its row would vanish from every table),
            # unless tune.allow_missing_variants: then it is reported and left out of the train stage. An
            # experiment without any finished trial always fails.
            complete = bool(outcome.best) and (not missing or settings.tune.allow_missing_variants)
            tracker.end_run(parent, "FINISHED" if complete else "FAILED", failure_reason=reason)
            if outcome.parent_run_id != parent:  # a resumed search: its trials sit under the first attempt's run
                tracker.set_tags(parent, {"resumed_search_parent": outcome.parent_run_id})
                tracker.set_tags(outcome.parent_run_id, {"resumed_by": parent})
                tracker.end_run(outcome.parent_run_id, "FINISHED" if complete else "FAILED", failure_reason=reason)
            if not outcome.best:
                failures.append(f"{name}: no trial finished — {reason}")
            elif missing and not settings.tune.allow_missing_variants:
                failures.append(f"{name}: no finished trial for variant(s) {missing} — {reason} (set "
                                "tune.allow_missing_variants: true to train the others without them)")
            elif missing:
                print(f"warning: {name}: no finished trial for variant(s) {missing}, left out "
                      f"(tune.allow_missing_variants) — {reason}", file=sys.stderr)
            # Only what the search decided: no run ids, dates or timings, so an unchanged search rewrites the
            # same bytes and DVC leaves the stages after it alone (the MLflow parent run holds the rest).
            # results: every finished trial's sample and metric (the report plots the metric against the sample)
            write_json(artifacts.tune_best(name), {"experiment": name, "trials": outcome.n_trials,
                                                   "failed": outcome.failed, "best": outcome.best,
                                                   "results": outcome.results})
            print(f"{name}: {outcome.n_trials} trials, best per variant: "
                  + ", ".join(f"{v}={b['metrics'].get(settings.tune.metric):.4g}" for v, b in sorted(outcome.best.items())),
                  flush=True)
    if failures:
        print("tune failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main_guard(main)
