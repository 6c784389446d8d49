"""The configuration of one variant's trials, combined from params.yaml's sections, and its checks.

:func:`trial_config` is what the tune stage gives each Ray trial and the train stage retrains (plain data:
the variant's spec with the deq, train and evaluation settings); :func:`apply_sample` puts a search-space
point on top; :func:`check_trials` validates every combination before any work starts.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from deqsm.models import MODELS
from deqsm.schema import error_items

if TYPE_CHECKING:
    from pipelines.settings import Settings


def experiment_eval_options(settings: "Settings", experiment: str) -> dict[str, Any]:
    """The evaluation options of ``experiment``: the ``eval`` section's values that its model family has,
    overridden by the experiment's own ``eval_options``."""
    exp = settings.experiments[experiment]
    known = MODELS.get(exp.model).eval_options.model_fields
    shared = {k: v for k, v in settings.eval.model_dump(exclude_unset=True).items() if k in known}
    return {**shared, **exp.eval_options}


def check_trials(settings: "Settings") -> list[str]:
    """Problems of the trial configurations the sections combine into (model options, loss options, eval
    options, every search-space value applied to every variant), found here rather than in each Ray trial."""
    from deqsm.experiments import VariantSpec
    from deqsm.train import TrainSettings

    samples = [(key, {key: value}) for key, entry in settings.tune.search_space.items() for value in entry.extremes()]
    problems: dict[str, None] = {}  # ordered, without repeats (each variant meets the same mistakes)

    def check(cfg: dict[str, Any]) -> list[tuple[str, str]]:
        found = []
        checks = [("", VariantSpec, cfg["spec"]), ("train", TrainSettings, cfg["train"])]
        if cfg["spec"]["model"] in MODELS:  # else the spec's check names the unknown model
            checks.append(("eval_options", MODELS.get(cfg["spec"]["model"]).eval_options, cfg["eval_options"]))
        for section, model, data in checks:
            try:
                model(**data)
            except ValidationError as err:
                found += error_items(err, section, with_input=False)
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


def trial_config(settings: "Settings", experiment: str, variant: str) -> dict[str, Any]:
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
            "deq": {**settings.deq.model_dump(), **copy.deepcopy(var.deq)},  # the variant's own values win
        },
        "train": settings.experiment_train(experiment),
        "eval_options": experiment_eval_options(settings, experiment),
    }
    cfg["train"]["seed"] = settings.base.seed
    cfg["train"]["device"] = settings.base.device
    return cfg


def apply_sample(cfg: dict[str, Any], sample: dict[str, Any]) -> dict[str, Any]:
    """A copy of a trial config with sampled values (dotted keys: train.*, width, deq.*, loss.*, model_options.*).
    A mapping value is merged into the settings at its key (``deq: {norm: spectral, lam: 1.01}`` sets those two
    deq keys and keeps the others): one search value can then be a bundle of settings that belong together."""
    cfg = copy.deepcopy(cfg)
    for key, value in sample.items():
        section, _, rest = key.partition(".")
        if section == "train":
            tree, key = cfg["train"], rest
        elif section == "width":
            cfg["spec"]["width"] = value
            continue
        else:
            tree = cfg["spec"]
        if isinstance(value, dict):
            for sub, v in value.items():
                set_dotted(tree, f"{key}.{sub}" if key else sub, copy.deepcopy(v))
        else:
            set_dotted(tree, key, value)
    return cfg


# Search dimensions that only a DEQ variant reads: the deq section (an explicit variant has no fixed point).
DEQ_ONLY = "deq"


def deq_only(key: str) -> bool:
    """Whether search dimension ``key`` changes only DEQ variants (``deq`` or ``deq.*``)."""
    return key.split(".")[0] == DEQ_ONLY


def search_arms(variants: dict[str, str], grids: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The (variant, DEQ settings) pairs a search trains: each DEQ variant (``variants``: name → its
    ``variant`` kind) with every combination of the deq-only grids, every other variant once, since the deq
    values would train it again unchanged. Each arm: ``{"variant_name": name, "sample": {dotted key: value}}``."""
    import itertools

    arms = []
    for name in sorted(variants):
        if variants[name] != "deq" or not grids:
            arms.append({"variant_name": name, "sample": {}})
            continue
        for values in itertools.product(*grids.values()):
            arms.append({"variant_name": name, "sample": dict(zip(grids, values))})
    return arms


def trial_point(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A Ray trial's variant and its search values (dotted keys) from its config: ``variant_name`` and one key per
    dimension (``__`` for dots), or an ``arm`` (:func:`search_arms`) where the search has deq-only grids."""
    arm = config.get("arm") or {"variant_name": config["variant_name"], "sample": {}}
    sample = {k.replace("__", "."): v for k, v in config.items() if k not in ("variant_name", "arm")}
    return arm["variant_name"], {**sample, **arm["sample"]}
