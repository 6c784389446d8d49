"""DVC stage `evaluate`: test metrics of every trained variant of one experiment (log-likelihood, its
standard error, SSM/SM test losses, bits/dim; the VAE's ELBO; NCSN's Fréchet distance, ...) with the cost
figures of its training (peak memory, time per step, parameters, solver steps), for every seed's model.
``<results>/experiments/<experiment>/seeds.json`` holds each seed's figures, ``metrics.json`` per variant their
mean and standard error across seeds (:mod:`pipelines.seeds`); MLflow gets each seed's on its training run and
the means on the variant's run. Models that sample (VAE, NCSN) also get a sample grid of their first seed,
``<results>/experiments/<experiment>/samples/<variant>.png``, logged to that seed's MLflow run.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.artifacts import Artifacts, load_model, load_splits, prune_variants, write_json
from pipelines.settings import Settings, main_guard, run_experiment_stage
from pipelines.trials import experiment_eval_options


# What evaluate_variant returns that is not measured on the test data: the model's size and the memory of one
# of its steps. The MLflow run has its training figures already (the train stage logs them, named as the tune
# trials name them: params, peak_bytes, step_ms_median, steps, best_val_loss, solver_*).
MODEL_FIGURES = ("params", "score_net_params", "score_step_peak_bytes")


def mlflow_test_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """evaluate_variant's numbers as MLflow metrics: test-data measurements under ``test/`` (``test_loglik`` →
    ``test/loglik``, ``fd_digits_cnn`` → ``test/fd_digits_cnn``), the model's size and step memory under
    ``model/``; non-finite values are left out (metrics.json has them as null); metrics.json keeps its own names."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            model_figure = k in MODEL_FIGURES or k.removesuffix("_mean").removesuffix("_se_seeds") in MODEL_FIGURES
            out[f"model/{k}" if model_figure else "test/" + k.removeprefix("test_")] = v
    return out


def reliability_tags(metrics: dict[str, Any]) -> dict[str, str]:
    """``deqsm.reliable.<metric>`` = ``true`` / ``false`` for each estimate the evaluation judged (a
    ``<metric>_reliable`` flag, e.g. DKEF's importance-sampled log-likelihood against ``is_ess_floor``): the MLflow
    UI can filter the runs whose headline must not be ranked (``tags.`deqsm.reliable.test_loglik` = 'false'``)."""
    return {f"deqsm.reliable.{k.removesuffix('_reliable')}": "false" if v == 0 else "true"
            for k, v in metrics.items() if k.endswith("_reliable") and isinstance(v, (int, float))}


@dataclass(frozen=True)
class EvalJob:
    """One trained model (a variant's seed) to evaluate; plain data, so it crosses to a worker process."""

    variant: str
    seed: int
    path: str
    data_root: str
    dataset: str
    eval_options: dict[str, Any]
    eval_seed: int  # the evaluation's random draws: the same for every model
    keep_images: bool  # the variant's sample grid comes from its first seed

    def __str__(self) -> str:
        return f"{self.variant} seed {self.seed}"


@functools.lru_cache(maxsize=1)
def _eval_data(data_root: str, dataset: str) -> tuple[dict, Any, dict]:
    from deqsm.data import load_split, true_density
    from deqsm.data import load_splits as load

    splits = load(data_root, dataset)
    truth = true_density(data_root, dataset)  # generated data: exact score and log p
    labels = {s: load_split(data_root, dataset, s).y for s in ("train", "test")}
    return splits, truth, labels


def evaluate_seed(job: EvalJob) -> dict[str, Any]:
    """The test metrics (and samples) of one trained model, with what its file says of its training."""
    from deqsm.experiments import evaluate_variant

    splits, truth, labels = _eval_data(job.data_root, job.dataset)
    spec, model, saved = load_model(Path(job.path), splits["train"])
    torch.manual_seed(job.eval_seed)  # the same evaluation draws for every seed's model
    metrics, images = evaluate_variant(spec, model, splits, job.eval_options, truth, labels)
    return {"metrics": metrics, "images": images if job.keep_images else None,
            **{k: saved.get(k) for k in ("fit", "mlflow_run_id", "mlflow_variant_run_id")}}


def evaluate_experiment(settings: Settings, name: str) -> dict[str, dict]:
    from deqsm.data.store import read_manifest
    from deqsm.experiments import with_data_facts
    from deqsm.models import MODELS
    from deqsm.sampling import save_image_grid
    from pipelines.provenance import provenance_tags
    from pipelines.seeds import aggregate
    from pipelines.tracking import Tracker
    from pipelines.workers import run_jobs, start_workers, worker_count

    mlflow_exp = settings.tracking.experiment_prefix + name
    artifacts = Artifacts.of(settings)
    files = artifacts.models(name)
    if not files:
        raise FileNotFoundError(f"no trained models in {artifacts.models_dir(name)}: run the train stage first "
                                f"(dvc repro train@{name})")
    # the workers start (and import torch) while this process opens the store and reads the dataset
    start_workers(worker_count(settings.base.workers, settings.base.threads, sum(map(len, files.values()))),
                  settings.base.threads)
    tracker = Tracker.open(settings.tracking_uri(), [mlflow_exp], settings.tracking.timeout)
    dataset = settings.experiments[name].dataset
    load_splits(artifacts, dataset)  # checked against its manifest here, before any job starts
    family = MODELS.get(settings.experiments[name].model)
    eval_options = with_data_facts(family, experiment_eval_options(settings, name),
                                   read_manifest(artifacts.data_root, dataset).get("info", {}), dataset)
    jobs = [EvalJob(variant, seed, str(path), str(artifacts.data_root), dataset, eval_options, settings.base.seed,
                    seed == min(by_seed))
            for variant, by_seed in files.items() for seed, path in by_seed.items()]
    workers = worker_count(settings.base.workers, settings.base.threads, len(jobs))
    print(f"{name}: evaluating {len(jobs)} model(s) ({len(files)} variant(s) x their seeds), {workers} at a time",
          flush=True)
    done = dict(((job.variant, job.seed), result) for job, result in
                run_jobs(evaluate_seed, jobs, workers, settings.train.progress, "evaluate", settings.base.threads))
    results: dict[str, dict] = {}
    per_seed: dict[str, dict[str, dict]] = {}
    artifacts.samples_dir(name).mkdir(parents=True, exist_ok=True)  # a DVC out, maybe empty
    tags = {"stage": "evaluate", **provenance_tags(settings, "pipelines.evaluate")}
    for variant, by_seed in files.items():
        seeds: dict[int, dict] = {}
        variant_run = None
        for seed in by_seed:
            result = done[variant, seed]
            metrics, images = result["metrics"], result["images"]
            # the training run, or a new one when this store does not hold it (deleted, or tracking.uri changed)
            run_id, new = tracker.run_or_new(result["mlflow_run_id"], mlflow_exp, f"{variant}/seed{seed}-evaluate",
                                             {**tags, "variant": variant, "seed": str(seed)})
            if new:
                print(f"{name}/{variant} seed {seed}: training run {result['mlflow_run_id']} is not in "
                      f"{settings.tracking_uri()}; logging to a new run {run_id}", flush=True)
            tracker.log_metrics(run_id, mlflow_test_metrics(metrics))
            tracker.set_tags(run_id, reliability_tags(metrics))
            tracker.log_dataset_inputs(run_id, artifacts.data_root, dataset, ("test",))
            if images is not None:  # one grid per variant: its first seed's samples
                grid = save_image_grid(images, artifacts.sample_grid(name, variant))
                tracker.log_artifact(run_id, grid, "samples")
            if new:
                tracker.end_run(run_id, "FINISHED")
            variant_run = variant_run or result["mlflow_variant_run_id"]
            metrics.update({f"train_{k}" if k in ("steps", "best_val_loss", "best_step") else k: v
                            for k, v in (result["fit"] or {}).items()})
            seeds[seed] = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
            print(f"{name}/{variant} seed {seed}: " + ", ".join(
                f"{k}={v:.4g}" for k, v in sorted(seeds[seed].items()) if isinstance(v, float) and k.startswith("test")),
                flush=True)
        results[variant] = aggregate(seeds)
        per_seed[variant] = {str(s): m for s, m in seeds.items()}
        run_id, new = tracker.run_or_new(variant_run, mlflow_exp, f"{variant}-evaluate", {**tags, "variant": variant})
        tracker.log_metrics(run_id, mlflow_test_metrics(results[variant]))
        tracker.set_tags(run_id, reliability_tags(results[variant]))
        if new:
            tracker.end_run(run_id, "FINISHED")
        agg = results[variant]
        shown = [(k.removesuffix("_mean"), v, agg.get(k.removesuffix("_mean") + "_se_seeds"))
                 for k, v in sorted(agg.items()) if k.startswith("test") and k.endswith("_mean") and isinstance(v, float)]
        print(f"{name}/{variant}: mean over {len(seeds)} seed(s): " + ", ".join(
            f"{k}={v:.4g}" + (f" ± {se:.2g}" if se is not None else "") for k, v, se in shown), flush=True)
    write_json(artifacts.seed_metrics(name), per_seed)
    write_json(artifacts.metrics(name), results)
    prune_variants(sorted(artifacts.samples_dir(name).glob("*.png")), keep=results)
    return results


def main(argv: list[str] | None = None) -> None:
    run_experiment_stage(evaluate_experiment, "pipelines.evaluate", __doc__, argv)


if __name__ == "__main__":
    main_guard(main)
