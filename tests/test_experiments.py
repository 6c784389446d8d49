"""The experiment bridge: every model × loss × variant takes a training step, DEQ variants train under
every backward mode, run() returns the metrics the pipeline logs, saved weights rebuild the same model,
and bad specs fail with errors that name the problem."""
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from deqsm.deq import DEQ
from deqsm.experiments import VariantSpec, build, evaluate_variant, run, train_model
from deqsm.models import MODELS
from deqsm.models.density import DensityEvalOptions
from deqsm.train import TrainSettings
from metric_references import gaussian_log_density, gaussian_score, grid_log_integral
from model_checks import assert_one_training_step

LOSSES = ["sm", "ssm", "ssm_vr", "dsm", "cp"]
TINY_OPTIONS = {"dkef": {"n_inducing": 5}, "nice": {"n_couplings": 2}, "energy_mlp": {}}


def gaussian_splits(n=300, d=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) @ torch.tensor([[1.0, 0.4], [0.0, 0.6]])[:d, :d] + 0.5
    a, b = int(0.6 * n), int(0.8 * n)
    return {"train": x[:a], "val": x[a:b], "test": x[b:]}


def spec(model="dkef", variant="explicit", loss="ssm", **kw):
    return VariantSpec(name=f"{model}-{variant}-{loss}", model=model, variant=variant, width=8,
                          model_options=kw.pop("model_options", TINY_OPTIONS[model]), loss={"name": loss}, **kw)


# the density models (2-D data here); the VAE and NCSN families are in test_generative.py
ENERGY_MODELS = [m for m in MODELS if MODELS.get(m).eval_options is DensityEvalOptions]
CASES = [(m, v, l) for m in ENERGY_MODELS for v in ("explicit", "deq")
         for l in LOSSES + (["mle"] if m == "nice" else [])]


@pytest.mark.parametrize("model,variant,loss", CASES)
def test_every_model_loss_and_variant_takes_a_training_step(model, variant, loss):
    train = gaussian_splits()["train"]
    torch.manual_seed(0)
    net, objective = build(spec(model, variant, loss), train)
    assert_one_training_step(net, objective, train[:16])


@pytest.mark.parametrize("backward", ["phantom", "unroll", "implicit"])
@pytest.mark.parametrize("model", ENERGY_MODELS)
def test_deq_variants_train_with_every_backward_mode(model, backward):
    splits = gaussian_splits(120)
    s = spec(model, "deq", "ssm", deq={"backward": backward, "solver": "anderson", "max_iter": 40})
    torch.manual_seed(0)  # train_model seeds the same way before building: same initial weights
    before = {k: v.clone() for k, v in build(s, splits["train"])[0].state_dict().items()}
    net, result = train_model(s, splits, TrainSettings(steps=3, batch_size=32, eval_every=3, progress=False, seed=0))
    deqs = [m for m in net.modules() if isinstance(m, DEQ)]
    assert deqs and all(m.backward == backward for m in deqs)
    assert result.steps == 3
    changed = [k for k, v in net.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed
    assert all(torch.isfinite(v).all() for v in net.state_dict().values())


def _score(model, x):
    """s = −∇ₓE of the model at the rows of x (autograd, float32)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        return -torch.autograd.grad(model(x).sum(), x)[0].detach()


def test_run_dkef_returns_the_pipeline_metrics(monkeypatch):
    """run()'s density metrics against references computed here from the trained model and the known density:
    the true log-likelihood and score in closed form, log Z by quadrature on a 2-D grid, the SM loss with its
    Laplacian by central differences of the score."""
    import deqsm.experiments as experiments

    seen = {}

    def keep_model(s, model, *args, **kwargs):  # the trained, finalised model run() evaluates
        seen["model"] = model
        return evaluate_variant(s, model, *args, **kwargs)

    monkeypatch.setattr(experiments, "evaluate_variant", keep_model)
    splits = gaussian_splits(300)
    mean, tril = torch.full((2,), 0.5), torch.tensor([[1.0, 0.0], [0.4, 0.6]])  # the law gaussian_splits draws
    true = torch.distributions.MultivariateNormal(mean, scale_tril=tril)
    metrics = run(spec("dkef", "deq", "ssm"), splits,
                  TrainSettings(steps=6, batch_size=32, eval_every=3, progress=False),
                  eval_options={"is_samples": 2000, "is_batch_size": 700}, true_density=true)
    for key in ("peak_bytes", "step_ms_median", "solver_nstep_mean", "solver_residual_max", "best_val_loss"):
        assert isinstance(metrics[key], float), key
    assert metrics["memory_kind"] == "autograd_saved_bytes"
    assert metrics["train_steps"] == 6 and metrics["test_loglik_se"] > 0
    model, test = seen["model"], splits["test"]
    assert metrics["params"] == sum(p.numel() for p in model.parameters())

    # the truth, written out
    true_rows = gaussian_log_density(test, mean, tril)
    assert metrics["true_test_loglik"] == pytest.approx(float(true_rows.mean()), rel=1e-6)
    s_model = _score(model, test)
    fisher = 0.5 * float((s_model.double() - gaussian_score(test, mean, tril)).pow(2).sum(1).mean())
    assert metrics["fisher_divergence"] == pytest.approx(fisher, rel=1e-4)

    # log Z: the importance-sampled estimate against quadrature (the density decays like q0 = N(0, σ0² I))
    lim = 10 * float(model.log_q0_scale.detach().exp())
    log_z = grid_log_integral(lambda x: -model(x), lim, lim / 100)
    se = metrics["test_loglik_se"]
    assert abs(metrics["test_log_z"] - log_z) <= 4 * se + 1e-3
    with torch.no_grad():
        model_rows = -model(test).double()
    assert metrics["test_loglik"] == pytest.approx(float(model_rows.mean()) - metrics["test_log_z"], abs=1e-5)
    # the fitted model against the truth on the test rows: their mean log-ratio estimates KL(p ‖ p_model) >= 0
    log_ratio = true_rows - (model_rows - log_z)
    ratio_se = float(log_ratio.std()) / len(test) ** 0.5
    assert metrics["test_loglik"] <= metrics["true_test_loglik"] + 3 * ratio_se + 4 * se
    # and the fit is real: q0 = N(0, 4I) alone is KL ≈ 1.15 nats from the truth
    assert metrics["test_loglik"] >= metrics["true_test_loglik"] - 0.5

    # SM loss = mean(½‖s‖² + tr ∂s/∂x); SSM (Rademacher v) estimates it with variance 2 Σ_{i≠j} B_ij² per row,
    # B = sym(∂s/∂x) + ½ s sᵀ (v'Bv with v_i² = 1)
    h = 1e-2
    jac = torch.stack([(_score(model, test + h * e) - _score(model, test - h * e)) / (2 * h)
                       for e in torch.eye(2)], 2).double()  # jac[b, i, j] = ∂s_i / ∂x_j
    s = s_model.double()
    sm = float((0.5 * s.pow(2).sum(1) + jac.diagonal(dim1=1, dim2=2).sum(1)).mean())
    assert metrics["test_sm_loss"] == pytest.approx(sm, abs=0.03)
    b = 0.5 * (jac + jac.transpose(1, 2)) + 0.5 * s[:, :, None] * s[:, None, :]
    off = b - torch.diag_embed(b.diagonal(dim1=1, dim2=2))
    ssm_se = float((2 * off.pow(2).sum((1, 2))).sum().sqrt()) / len(test)
    assert abs(metrics["test_ssm_loss"] - sm) <= 4 * ssm_se and abs(metrics["test_loss"] - sm) <= 4 * ssm_se


def test_run_nice_reports_exact_loglik_and_bits_per_dim():
    splits = gaussian_splits(200)
    metrics = run(spec("nice", "explicit", "mle"), splits,
                  TrainSettings(steps=4, batch_size=32, eval_every=2, progress=False),
                  eval_options={"logit_alpha": 0.05, "pixel_levels": 17})
    assert {"test_loglik", "test_bpd", "test_ssm_loss", "test_sm_loss", "test_nll"} <= set(metrics)
    assert "test_loglik_se" not in metrics and "solver_nstep_mean" not in metrics  # exact; no DEQ
    assert metrics["test_nll"] == pytest.approx(-metrics["test_loglik"], rel=1e-5)


def test_saved_weights_rebuild_the_same_finalised_dkef():
    """The pipeline's evaluate stage: build(spec, train) then load_state_dict, α included."""
    splits = gaussian_splits(200)
    s = spec("dkef", "explicit", "sm")
    net, _ = train_model(s, splits, TrainSettings(steps=3, batch_size=32, eval_every=3, progress=False))
    assert float(net.alpha.abs().sum()) > 0
    rebuilt, _ = build(s, splits["train"])
    rebuilt.load_state_dict(net.state_dict())
    opts = {"is_samples": 500}
    assert (evaluate_variant(s, rebuilt, splits, opts)[0]["test_loglik"]
            == pytest.approx(evaluate_variant(s, net, splits, opts)[0]["test_loglik"]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(model="gan"), "unknown model 'gan'; known: dkef, energy_mlp, ncsn, nice, vae"),
    (dict(variant="deepest"), "deq"),
    (dict(loss={"name": "ssmm"}), "unknown loss 'ssmm'"),
    (dict(loss={"name": "ssm", "options": {"nosie": "gaussian"}}), r"unknown option\(s\) \['nosie'\] for loss 'ssm'"),
    (dict(loss={"name": "mle"}), "loss 'mle' needs a model with an exact log-likelihood; 'dkef' is unnormalised"),
    (dict(model_options={"n_inducingg": 3}), r"unknown model_options \['n_inducingg'\]"),
    (dict(deq={"solver": "newton"}), "unknown solver 'newton'"),
    (dict(colour="red"), "unknown key 'colour'; known: name, model, variant"),
])
def test_bad_specs_fail_clearly(kwargs, match):
    base = dict(name="x", model="dkef", variant="explicit", loss={"name": "ssm"})
    with pytest.raises(ValidationError, match=match):
        VariantSpec(**{**base, **kwargs})


def test_bad_data_and_eval_options_fail_clearly():
    splits = gaussian_splits(60)
    s = spec("nice", "explicit", "ssm")
    with pytest.raises(ValidationError, match="is_sample"):
        DensityEvalOptions(is_sample=10)
    with pytest.raises(ValueError, match=r"splits lack \['test'\]"):
        run(s, {"train": splits["train"], "val": splits["val"]}, TrainSettings(steps=1, progress=False))
    with pytest.raises(ValueError, match="floating-point"):
        build(s, torch.zeros(5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="sample shape"):
        run(s, {**splits, "test": torch.zeros(4, 3)}, TrainSettings(steps=1, progress=False))


def test_experiments_do_not_import_the_orchestration_stack():
    code = ("import sys, deqsm.experiments\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'mlflow', 'dvc'})\n"
            "print(bad); sys.exit(1 if bad else 0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_data_facts_come_from_the_manifest_and_a_conflicting_setting_names_both():
    """#13: pixel levels, logit α (NICE's bits/dim) and the pixel range (NCSN) are read from the prepared
    dataset's manifest; a setting that disagrees is refused with both values, one that agrees is kept."""
    from deqsm.experiments import with_data_facts
    from deqsm.models import MODELS

    digits = {"pixel_levels": 17, "logit_alpha": 1e-6, "scale": "unit"}
    nice, ncsn = MODELS.get("nice"), MODELS.get("ncsn")
    assert with_data_facts(nice, {"is_samples": 500}, digits, "digits") == \
        {"is_samples": 500, "pixel_levels": 17, "logit_alpha": 1e-6}
    assert with_data_facts(nice, {"pixel_levels": 17}, digits, "digits")["pixel_levels"] == 17
    with pytest.raises(ValueError) as err:
        with_data_facts(nice, {"pixel_levels": 256}, digits, "digits")
    assert ("eval_options.pixel_levels = 256 conflicts with the prepared dataset 'digits', whose manifest records "
            "pixel_levels = 17") in str(err.value)
    assert with_data_facts(ncsn, {}, {**digits, "scale": "symmetric"}, "images")["pixel_range"] == "symmetric"
    with pytest.raises(ValueError, match=r"pixel_range = 'unit' conflicts .* scale = 'symmetric'"):
        with_data_facts(ncsn, {"pixel_range": "unit"}, {**digits, "scale": "symmetric"}, "images")
    assert with_data_facts(MODELS.get("dkef"), {}, {"true_density": {}}, "mixture") == {}  # generated: no pixels
