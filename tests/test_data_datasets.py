"""The dataset registry and the data settings (unknown names and keys list the valid ones), the offline
datasets (digits, gaussian, mixture) with every image preprocessing, seeded splits, and the true
densities kept in the manifest."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from sklearn.datasets import load_digits

from deqsm.data import DATASETS, DataSettings, load_split, prepare_datasets, read_manifest, true_density
from deqsm.registry import UnknownNameError

REAL = ["celeba64", "cifar10", "hepmass", "miniboone", "mnist", "parkinsons", "redwine", "whitewine"]


def prepare(tmp_path, datasets, seed=0):
    settings = DataSettings(root=str(tmp_path / "prepared"), raw_root=str(tmp_path / "raw"), seed=seed, datasets=datasets)
    return prepare_datasets(settings), tmp_path / "prepared"


def test_registry_lists_every_dataset_and_refuses_unknown_names():
    assert DATASETS.names() == sorted(["digits", "gaussian", "mixture"] + REAL)
    with pytest.raises(UnknownNameError, match="unknown dataset 'mnits'; known: celeba64, cifar10, digits"):
        DATASETS.get("mnits")


def test_import_deqsm_data_does_not_import_ray_mlflow_dvc():
    code = ("import sys, deqsm.data, deqsm.data.settings\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'mlflow', 'dvc'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("data,pattern", [
    ({"datasets": {"mnits": {}}}, r"unknown dataset 'mnits'; known: celeba64, cifar10, digits, gaussian, "
                                  r"hepmass, miniboone, mixture"),
    ({"datasets": {"x": {"dataset": "nope"}}}, r"unknown dataset 'nope'; known: "),
    ({"datasets": {"digits": {"dequantise": True}}}, r"digits.dequantise: unknown key; known: dataset, scale, "
                                                     r"dequantize, logit_alpha, binarize, val_fraction, test_fraction"),
    ({"datasets": {"gaussian": {"dims": 3, "n": 2}}}, r"gaussian.dims: unknown key; known: .*dim, mean, covariance.*; "
                                                      r"gaussian.n: unknown key"),
    ({"rooot": "x"}, r"unknown key 'rooot'; known: root, raw_root, seed, download, datasets"),
    ({"datasets": {"digits": {"scale": "half"}}}, r"digits\.scale: Input should be 'raw', 'unit' or 'symmetric'"),
    ({"datasets": {"digits": {"scale": "raw", "dequantize": True}}}, r"scale: raw .* excludes dequantize"),
    ({"datasets": {"digits": {"binarize": "threshold", "logit_alpha": 0.01}}}, r"binarize needs scale: unit"),
    ({"datasets": {"digits": {"logit_alpha": 0.0}}}, r"logit_alpha: 0 without dequantize"),
    ({"datasets": {"gaussian": {"dim": 3, "mean": [1, 2]}}}, r"mean has 2 entries, dim is 3"),
    ({"datasets": {"mixture": {"shape": "rings", "dim": 3}}}, r"shape 'rings' is 2-D"),
    ({"datasets": {"../x": {"dataset": "digits"}}}, r"must match"),
    ({"datasets": {}}, r"datasets must map output names to options"),
])
def test_bad_data_settings_name_the_problem(data, pattern):
    with pytest.raises(ValidationError, match=pattern):
        DataSettings.model_validate(data)


def test_defaults_are_the_offline_datasets_and_entries_may_share_a_dataset():
    assert DataSettings().dataset_names() == ["digits", "gaussian", "mixture"]
    s = DataSettings(datasets={"digits_ncsn": {"dataset": "digits", "scale": "symmetric"}, "mnist": None})
    assert s.registry_name("digits_ncsn") == "digits" and s.registry_name("mnist") == "mnist"
    assert s.datasets["digits_ncsn"].scale == "symmetric"
    assert DataSettings.model_validate(s.model_dump()) == s     # dumps every option, reloads the same


def test_digits_every_preprocessing_from_the_same_split(tmp_path):
    variants = {"raw": {"scale": "raw"}, "unit": {}, "sym": {"scale": "symmetric"},
                "nice": {"dequantize": True, "logit_alpha": 0.05}, "vae": {"binarize": "threshold"},
                "vae_bern": {"binarize": "bernoulli"}, "deq_sym": {"dequantize": True, "scale": "symmetric"}}
    _, root = prepare(tmp_path, {k: {"dataset": "digits", **v} for k, v in variants.items()})
    raw = load_split(root, "raw", "train")
    x = raw.x.numpy().astype(np.float64)
    assert raw.x.dtype == torch.uint8 and x.max() == 16
    source, labels = load_digits(return_X_y=True)
    for s in ("train", "val", "test"):  # every entry has the same rows and labels, in the same order
        assert all(torch.equal(load_split(root, k, s).y, load_split(root, "raw", s).y) for k in variants)
    all_rows = np.concatenate([load_split(root, "raw", s).x.numpy().reshape(-1, 64) for s in ("train", "val", "test")])
    assert sorted(map(bytes, all_rows)) == sorted(map(bytes, source.astype(np.uint8)))
    get = lambda k: load_split(root, k, "train").x.double().numpy()  # noqa: E731
    assert np.allclose(get("unit"), x / 16) and np.allclose(get("sym"), 2 * x / 16 - 1)
    u = (1 / (1 + np.exp(-get("nice"))) - 0.05) / 0.9
    assert np.array_equal(np.floor(u * 17 + 1e-6), x) and get("nice").std() > 0
    assert np.array_equal(get("vae"), (x / 16 > 0.5).astype(float))
    bern = get("vae_bern")
    assert set(np.unique(bern)) <= {0.0, 1.0} and bern[x == 0].max() == 0 and bern[x == 16].min() == 1
    deq = get("deq_sym")
    assert deq.min() >= -1 and deq.max() < 1 and np.array_equal(np.floor((deq + 1) / 2 * 17 + 1e-6), x)
    m = read_manifest(root, "nice")
    assert m["info"]["pixel_levels"] == 17 and m["info"]["logit_alpha"] == 0.05
    assert m["preprocessing"]["dequantize"] is True and m["preprocessing"]["seed"] == 0
    assert [m["splits"][s]["rows"] for s in ("train", "val", "test")] == [1295, 143, 359]


def test_same_seed_same_files_other_seed_other_split(tmp_path):
    datasets = {"digits": {"dequantize": True}, "mixture": {"n_train": 50, "n_val": 5, "n_test": 5}}
    a, _ = prepare(tmp_path / "a", datasets)
    b, _ = prepare(tmp_path / "b", datasets)
    c, _ = prepare(tmp_path / "c", datasets, seed=1)
    for name in datasets:
        assert a[name]["splits"] == b[name]["splits"]
        assert a[name]["splits"]["train"]["sha256"] != c[name]["splits"]["train"]["sha256"]


def test_gaussian_samples_match_the_true_density_in_the_manifest(tmp_path):
    _, root = prepare(tmp_path, {"gaussian": {"dim": 3, "mean": [1.0, -2.0, 0.5], "n_train": 20000, "dtype": "float64"}})
    info = read_manifest(root, "gaussian")["info"]["true_density"]
    mean, cov = np.array(info["mean"]), np.array(info["covariance"])
    assert np.allclose(np.linalg.eigvalsh(cov), [0.1, 10 ** -0.5, 1.0])   # condition 10, geometric spacing
    x = load_split(root, "gaussian", "train").x.numpy()
    assert np.abs(x.mean(0) - mean).max() < 0.03 and np.abs(np.cov(x.T) - cov).max() < 0.04
    dist = true_density(root, "gaussian")
    assert torch.allclose(dist.mean, torch.tensor(mean)) and torch.allclose(dist.covariance_matrix, torch.tensor(cov))
    test = load_split(root, "gaussian", "test").x
    score = torch.linalg.solve(dist.covariance_matrix, (dist.mean - test).T).T   # −Σ⁻¹(x − μ)
    xg = test.clone().requires_grad_(True)
    assert torch.allclose(torch.autograd.grad(dist.log_prob(xg).sum(), xg)[0], score)


@pytest.mark.parametrize("shape,components", [("grid", 25), ("rings", 48), ("moons", 32), ("gaussians", 8)])
def test_mixture_shapes_label_their_components(tmp_path, shape, components):
    dim = 4 if shape == "gaussians" else 2
    _, root = prepare(tmp_path, {"mixture": {"shape": shape, "dim": dim, "std": 0.01, "n_train": 3000}})
    info = read_manifest(root, "mixture")["info"]["true_density"]
    means = np.array(info["means"])
    assert means.shape == (components, dim) and info["family"] == "gaussian_mixture"
    train = load_split(root, "mixture", "train")
    nearest = np.linalg.norm(train.x.numpy()[:, None] - means[None], axis=2).argmin(1)
    assert (nearest == train.y.numpy()).mean() > 0.99
    assert len(np.unique(train.y.numpy())) == components
    log_p = true_density(root, "mixture").log_prob(train.x.double())
    assert torch.isfinite(log_p).all() and log_p.mean() > 0   # std 0.01: a sharply peaked density
