"""The extension point for models: a new family is one ModelFamily (build, objective, evaluation with its own
options, headline metric) registered in MODELS; the spec, training, evaluation and the report's tables and
findings then work without touching any other file."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import Field, ValidationError

from deqsm.config import DEQSettings
from deqsm.experiments import VariantSpec, evaluate_variant, train_model
from deqsm.losses import get_score_loss
from deqsm.models import MODELS, EvalOptions, Headline, ModelFamily
from deqsm.models.blocks import make_net
from deqsm.train import TrainSettings, mean_loss
from pipelines.reporting import findings, inputs, tables
from pipelines.settings import ExperimentSettings


class ToyEvalOptions(EvalOptions):
    sigma: float = Field(0.1, gt=0, description="noise level of the test DSM loss")


def build_toy(dim, *, variant, width, depth, deq, train, hidden: int | None = None):
    return make_net(variant, dim, hidden or width, dim, depth=depth, deq=deq)  # s(x): a score network


def toy_objective(loss, options, train):
    loss_fn = get_score_loss(loss, **options)
    return lambda model, batch: loss_fn(model, batch)


def evaluate_toy(model, splits, opts, spec, *, true_density=None, labels=None):
    dsm = get_score_loss("dsm", sigma=opts.sigma)
    test = mean_loss(model, lambda m, x: dsm(m, x), splits["test"], opts.batch_size)["loss"]
    return {"test_dsm_loss": test}, None


TOY = ModelFamily("toy_score", build=build_toy, objective=toy_objective, evaluate=evaluate_toy,
                  eval_options=ToyEvalOptions,
                  headline=Headline("test_dsm_loss", "test DSM loss (lower is better)", False, ""))


@pytest.fixture
def toy_family():
    MODELS.register("toy_score")(TOY)
    try:
        yield TOY
    finally:
        del MODELS._items["toy_score"]


def splits(n: int = 96) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g) * torch.tensor([1.0, 0.5]) + 0.3
    return {"train": x[:64], "val": x[64:80], "test": x[80:]}


def test_a_registered_family_trains_evaluates_and_is_judged_by_its_headline(toy_family):
    data = splits()
    metrics = {}
    for variant, depth in (("deq", 2), ("explicit", 4)):
        spec = VariantSpec(name=f"toy/{variant}", model="toy_score", variant=variant, depth=depth, width=8,
                           model_options={"hidden": 12}, loss={"name": "dsm", "options": {"sigma": 0.2}},
                           deq=DEQSettings(max_iter=20))
        model, fit = train_model(spec, data, TrainSettings(steps=3, batch_size=16, eval_every=3, progress=False))
        got, images = evaluate_variant(spec, model, data, {"sigma": 0.2})
        assert images is None and got["params"] > 0 and math.isfinite(got["test_dsm_loss"])
        metrics[f"{variant}-{depth}" if variant == "explicit" else variant] = {
            **got, "peak_bytes": float(fit.peak_bytes), "memory_kind": fit.memory_kind}
    with pytest.raises(ValidationError, match="unknown key 'is_samples'; known: batch_size, seed, sigma"):
        evaluate_variant(spec, model, data, {"is_samples": 1000})

    exp = ExperimentSettings(dataset="gaussian", model="toy_score", loss={"name": "dsm"},
                             variants={"deq": {"variant": "deq"}, "explicit-4": {"variant": "explicit", "depth": 4}})
    result = inputs.ExperimentData("toy", exp, metrics, {}, None)
    assert result.headline().key == "test_dsm_loss"
    rows = tables.table_rows(result)
    md = tables.experiment_table_md(result, rows)
    assert "test DSM loss (lower is better)" in md and f"{metrics['deq']['test_dsm_loss']:.2f}" in md
    lines, numbers = findings.experiment_findings(result, rows, deq_tol=1e-4)
    diff = metrics["deq"]["test_dsm_loss"] - metrics["explicit-4"]["test_dsm_loss"]
    assert numbers["deq_minus_explicit-4_test_dsm_loss"] == pytest.approx(diff)
    assert any("lower is better" in line and "test_dsm_loss" in line for line in lines)
