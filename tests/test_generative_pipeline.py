"""The generative experiments (implicit-encoder VAE, NCSN) through the whole pipeline: real DVC, Ray, MLflow.

One project copy runs `dvc repro` with only `vae-digits` and `ncsn-digits` (tiny budgets); the tests read
what it left: metrics.json with the ELBO / Fréchet distance, sample grids, MLflow runs holding both, and
the report's tables judged by those metrics.
"""
from __future__ import annotations

import json
import math

import pytest
import yaml
from PIL import Image

from pipeline_project import ROOT, make_project, run, tiny_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def generative_params() -> dict:
    raw = tiny_params()
    full = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["datasets"] = {k: full["data"]["datasets"][k] for k in ("digits", "digits_binary", "digits_images")}
    vae, ncsn = full["experiments"]["vae-digits"], full["experiments"]["ncsn-digits"]
    vae.update(width=32, model_options={"z_dim": 4, "hidden_width": 32, "val_elbo_samples": 8},
               variants={"deq": {"variant": "deq"}, "explicit": {"variant": "explicit", "depth": 2}},
               eval_options={"elbo_centres": 32, "elbo_eval": 8, "memory_batch": 16})
    ncsn.update(width=4, model_options={"sigma_max": 1.0, "sigma_min": 0.05, "sigma_levels": 3},
                variants={"deq": {"variant": "deq"}, "explicit-2": {"variant": "explicit", "depth": 2}},
                eval_options={"fd_samples": 64, "langevin_steps": 2, "classifier_epochs": 1})
    raw["experiments"] = {"vae-digits": vae, "ncsn-digits": ncsn}
    return raw


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("deqsm-generative"), generative_params())
    first = run(["dvc", "repro"], root)
    return root, first


def _metrics(root, exp: str) -> dict:
    """metrics.json with each mean over the seeds also under the metric's own name (as the report reads it)."""
    from pipelines.reporting.inputs import seed_view

    path = root / "results" / "experiments" / exp / "metrics.json"
    return {v: seed_view(m) for v, m in json.loads(path.read_text()).items()}


def test_vae_is_evaluated_by_its_elbo_with_the_score_network_memory(project):
    root, _ = project
    m = _metrics(root, "vae-digits")
    assert set(m) == {"deq", "explicit"}
    z_dim = generative_params()["experiments"]["vae-digits"]["model_options"]["z_dim"]
    for row in m.values():
        # binary pixels: log p(x|z) <= 0, so log p(x) <= 0 and the IW bound below it (within its Monte-Carlo error)
        assert row["test_recon"] < 0
        assert row["test_iw_loglik"] <= 3 * row["test_iw_loglik_mc_se"]
        # log N(z; 0, I) is largest at z = 0: E_q log p(z) <= -(z_dim / 2) log 2π, whatever the encoder
        assert row["test_log_prior"] <= -0.5 * z_dim * math.log(2 * math.pi)
        # the headline: the importance-weighted bound with its errors (a valid lower bound, unlike the KDE ELBO,
        # which is biased upwards and so is not compared with it); the smoothed encoder's ELBO, a looser bound,
        # lies below it
        assert row["test_iw_loglik_se"] > 0 and row["test_iw_loglik_mc_se"] > 0
        assert row["test_elbo_smoothed"] <= row["test_iw_loglik"] + 3 * row["test_iw_loglik_mc_se"]
        assert row["score_step_peak_bytes"] > 0 and row["score_net_params"] > 0 and row["peak_bytes"] > 0
        assert "test_loglik" not in row
    assert m["deq"]["solver_nstep_mean"] >= 1


def test_ncsn_is_evaluated_by_the_frechet_distance_of_its_samples(project):
    root, _ = project
    m = _metrics(root, "ncsn-digits")
    assert set(m) == {"deq", "explicit-2"}
    for row in m.values():
        assert row["fd_samples"] == 64 and row["test_loss"] > 0
        for key in ("fd_digits_cnn", "fd_digits_cnn_train_vs_test"):
            assert 0 <= row[f"{key}_ci_low"] <= row[key] <= row[f"{key}_ci_high"], key
        # real training digits are far closer to the test digits than a 12-step model's samples, in both
        # distances; the features separate the digits (10 classes: chance is 0.1)
        assert row["fd_digits_cnn_train_vs_test_ci_high"] < row["fd_digits_cnn_ci_low"]
        assert row["kid_digits_cnn_train_vs_test"] < row["kid_digits_cnn"] - 2 * row["kid_digits_cnn_std"]
        assert row["fd_classifier_test_accuracy"] > 0.5
        assert row["kid_digits_cnn_std"] >= 0
    # the reference (training vs test images) does not depend on the model
    assert m["deq"]["fd_digits_cnn_train_vs_test"] == m["explicit-2"]["fd_digits_cnn_train_vs_test"]


def test_sample_grids_are_written_and_logged_to_mlflow(project):
    root, _ = project
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'out' / 'mlflow.db'}")
    for exp, variants in (("vae-digits", ("deq", "explicit")), ("ncsn-digits", ("deq", "explicit-2"))):
        for v in variants:
            png = root / "results" / "experiments" / exp / "samples" / f"{v}.png"
            with Image.open(png) as img:
                assert img.size[0] >= 8 * 32, "64 upscaled 8x8 images, 8 per row"
        runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id], "tags.stage = 'train'")
        trained = {r.data.tags["variant"]: r for r in runs if "variant" in r.data.tags and "seed" not in r.data.tags}
        first = {r.data.tags["variant"]: r for r in runs if r.data.tags.get("seed") == "0"}
        assert set(trained) == set(first) == set(variants)
        key = "test/iw_loglik" if exp == "vae-digits" else "test/fd_digits_cnn"
        for v, r in trained.items():
            assert key + "_mean" in r.data.metrics and key + "_se_seeds" in r.data.metrics, sorted(r.data.metrics)
        for v, r in first.items():  # the grid: the first seed's samples, on that seed's run
            assert key in r.data.metrics, sorted(r.data.metrics)
            assert [a.path for a in client.list_artifacts(r.info.run_id, "samples")] == [f"samples/{v}.png"]


def test_report_judges_them_by_the_iw_bound_and_the_fd_interval(project):
    root, _ = project
    report = (root / "results" / "REPORT.md").read_text()
    vae_table = (root / "results" / "tables" / "vae-digits.md").read_text()
    ncsn_table = (root / "results" / "tables" / "ncsn-digits.md").read_text()
    vae, ncsn = _metrics(root, "vae-digits"), _metrics(root, "ncsn-digits")
    assert "test log-likelihood bound (IW, nats)" in vae_table and "KDE ELBO (diagnostic, biased up)" in vae_table
    assert f"{vae['deq']['test_iw_loglik']:.3f} ± {vae['deq']['test_iw_loglik_se_seeds']:.3f}" in vae_table
    assert f"{vae['deq']['test_elbo']:.3f}" in vae_table
    assert "score-net step memory (MiB)" in vae_table
    d = ncsn["deq"]
    assert "fd_digits_cnn (lower is better)" in ncsn_table
    assert f"{d['fd_digits_cnn']:.2f} ± {d['fd_digits_cnn_se_seeds']:.2f}" in ncsn_table  # over the seeds
    assert "train-vs-test FD (floor)" in ncsn_table and "kid_digits_cnn ± se" in ncsn_table  # across the seeds
    assert "test log-lik (nats)" not in vae_table + ncsn_table  # not headed as the density models are
    diff = vae["deq"]["test_iw_loglik"] - vae["explicit"]["test_iw_loglik"]
    assert f"difference {diff:+.3f}" in report
    assert "experiments/vae-digits/samples/deq.png" in report and "experiments/ncsn-digits/samples/deq.png" in report
    fidelity = {exp: json.loads((root / "results" / "experiments" / exp / "fidelity.json").read_text())
                for exp in ("vae-digits", "ncsn-digits")}
    assert all(set(f) == {"deq"} for f in fidelity.values()), "phantom-vs-exact gradients of the DEQ score nets too"
    for exp in fidelity.values():
        ks = [r["k"] for r in exp["deq"]["results"]]
        assert ks == sorted(ks) and all(-1 <= r["grad_cosine"] <= 1 for r in exp["deq"]["results"])


def test_a_second_repro_does_nothing(project):
    root, _ = project
    again = run(["dvc", "repro"], root)
    assert "Running stage" not in again.stdout + again.stderr
