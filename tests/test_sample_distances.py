"""Distances of generated samples on feature rows (deqsm.metrics.sample_distances): the exact row FD in both
of its forms, the bootstrap interval for a replicate's FD, torchmetrics' KID, and the metric keys, also as
NCSN's evaluation reports them."""
from __future__ import annotations

import math

import pytest
import torch

from deqsm.metrics.fid import frechet_distance_of_features
from deqsm.metrics.sample_distances import (fd_replicate_interval, frechet_to, kernel_distance,
                                            sample_distance_metrics)
from deqsm.models.ncsn import NCSNEvalOptions


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def rows(n, d, seed, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return shift + scale * torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("n_real,n_fake,d", [(50, 40, 8), (30, 25, 80)])  # d <= n: d×d form; d > n: cross-Gram form
def test_row_frechet_distance_equals_torchmetrics_in_both_forms(n_real, n_fake, d):
    real, fake = rows(n_real, d, 0), rows(n_fake, d, 1, shift=0.3, scale=1.5)
    assert frechet_to(real)(fake) == pytest.approx(frechet_distance_of_features(real, fake), rel=1e-6)
    assert frechet_to(real)(real) == pytest.approx(0.0, abs=1e-8)


def test_a_bootstrap_fd_interval_covers_the_fd_of_a_second_independent_sample_of_the_same_size(one_thread):
    """40 repetitions: a fixed reference (N(0, D²)), a generated set (shifted, 1.2× wider) and an independent
    replicate of it (same size); the 90% interval from the first set must hold the replicate's FD in >= 32/40
    (measured at writing: 37/40). With the nominal 90% true, fewer than 32 has probability ≈ 1% (binomial:
    mean 36, sd 1.9); the plain percentile interval of the resampled FDs, shifted upward by the duplicated rows
    of its resamples, covers clearly less often (measured: 20/40). Not trivially wide: the mean width is at most
    1.5× that of the ideal interval ±1.645·√2·sd(FD) from the replicates' own spread (measured: 0.85×)."""
    d, n, reps, boots = 16, 200, 40, 200
    scale = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)

    def draw(shift, wider):
        return shift + wider * scale * torch.randn(n, d, generator=g, dtype=torch.float64)

    covered = naive_covered = 0
    widths, replicate_fds = [], []
    for _ in range(reps):
        real, fake, replicate = draw(0.0, 1.0), draw(0.3, 1.2), draw(0.3, 1.2)
        fd = frechet_to(real)
        low, high = fd_replicate_interval(real, fake, boots=boots, level=0.9, generator=g)
        target = fd(replicate)
        covered += low <= target <= high
        widths.append(high - low)
        replicate_fds.append(target)
        resampled = torch.tensor([fd(fake[torch.randint(0, n, (n,), generator=g)]) for _ in range(boots)],
                                 dtype=torch.float64)
        q = torch.quantile(resampled, torch.tensor([0.05, 0.95], dtype=torch.float64))
        naive_covered += float(q[0]) <= target <= float(q[1])
    ideal_width = 2 * 1.645 * 2 ** 0.5 * float(torch.tensor(replicate_fds).std())
    assert covered >= 32, f"coverage {covered}/{reps}"
    assert naive_covered <= covered - 8, f"naive {naive_covered}/{reps} vs {covered}/{reps}"
    assert sum(widths) / reps <= 1.5 * ideal_width


def test_fd_interval_contains_its_point_and_is_reproducible():
    real, fake = rows(100, 6, 0), rows(80, 6, 1, shift=0.5)
    point = frechet_to(real)(fake)
    first = fd_replicate_interval(real, fake, boots=50, generator=torch.Generator().manual_seed(3))
    again = fd_replicate_interval(real, fake, boots=50, generator=torch.Generator().manual_seed(3))
    assert first == again and 0 <= first[0] < point < first[1]
    with pytest.raises(ValueError, match="boots must be >= 2"):
        fd_replicate_interval(real, fake, boots=1)
    with pytest.raises(ValueError, match="level must be in"):
        fd_replicate_interval(real, fake, level=1.0)
    with pytest.raises(ValueError, match=r"fake must be feature rows \(N >= 2, 6\)"):
        frechet_to(real)(rows(5, 7, 2))


def test_kid_is_zero_within_its_spread_for_one_distribution_and_positive_for_a_shifted_one():
    """KID is unbiased: two samples of N(0, I) give |KID| within 3 of its std over subsets; a sample shifted
    by 0.5 per coordinate gives a KID above 5 of its std."""
    real = rows(300, 16, 0)
    same, same_std = kernel_distance(real, rows(300, 16, 1))
    shifted, shifted_std = kernel_distance(real, rows(300, 16, 2, shift=0.5))
    assert same_std > 0 and abs(same) < 3 * same_std
    assert shifted > 5 * shifted_std > 0 and shifted > 10 * abs(same)


def test_kid_is_seeded_leaves_the_global_random_state_and_clamps_the_subset_size():
    real, fake = rows(40, 4, 0), rows(30, 4, 1, shift=0.2)
    state = torch.get_rng_state()
    assert kernel_distance(real, fake, subsets=20, subset_size=10, seed=5) == \
        kernel_distance(real, fake, subsets=20, subset_size=10, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    real = real[:30]  # both sets of 30 rows: a subset size clamped to 30 takes every row, in every subset
    kid, std = kernel_distance(real, fake, subsets=5, subset_size=1000)
    assert std == pytest.approx(0.0, abs=1e-12) and kid == pytest.approx(kernel_distance(real, fake, subsets=1)[0])
    with pytest.raises(ValueError, match="equal d"):
        kernel_distance(real, rows(30, 5, 2))


def test_sample_distance_metrics_names_its_keys():
    test, samples, reference = rows(60, 5, 0), rows(30, 5, 1, shift=0.4), rows(30, 5, 2)
    out = sample_distance_metrics("fd_x", "kid_x", test, samples, reference, boots=20, kid_subsets=10,
                                  kid_subset_size=10)
    assert list(out) == ["fd_x", "fd_x_ci_low", "fd_x_ci_high", "fd_x_train_vs_test", "fd_x_train_vs_test_ci_low",
                         "fd_x_train_vs_test_ci_high", "kid_x", "kid_x_std", "kid_x_train_vs_test"]
    assert out["fd_x"] == pytest.approx(frechet_distance_of_features(test, samples))
    assert out["fd_x"] > out["fd_x_train_vs_test"] and out["kid_x"] > out["kid_x_train_vs_test"]
    plain = sample_distance_metrics("fd_x", "kid_x", test, samples, reference, boots=0)
    assert not any(k.endswith(("_ci_low", "_ci_high")) for k in plain) and plain["fd_x"] == out["fd_x"]
    with pytest.raises(ValueError, match="as many rows as the samples"):
        sample_distance_metrics("fd_x", "kid_x", test, samples, reference[:20])


def test_ncsn_eval_defaults_are_ncsns_langevin_settings():
    """Song & Ermon (2019): T = 100 steps per noise level, ε = 2e-5."""
    opts = NCSNEvalOptions()
    assert (opts.langevin_steps, opts.langevin_lr) == (100, 2e-5)


def test_ncsn_evaluation_reports_fd_intervals_and_kid_in_the_same_features():
    from deqsm.experiments import VariantSpec, build, evaluate_variant

    x = torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    splits = {"train": x[:60], "val": x[60:80], "test": x[80:]}
    labels = {"train": torch.arange(60) % 10, "test": torch.arange(20) % 10}
    spec = VariantSpec(name="ncsn-deq", model="ncsn", variant="deq", width=4, loss={"name": "dsm"},
                       model_options={"sigma_max": "auto", "sigma_min": 0.1, "sigma_levels": 2})
    torch.manual_seed(0)
    net, _ = build(spec, splits["train"])
    opts = {"fd_samples": 16, "langevin_steps": 2, "classifier_epochs": 1, "fd_bootstrap": 30,
            "kid_subsets": 10, "kid_subset_size": 8}
    m, _ = evaluate_variant(spec, net, splits, opts, labels=labels)
    for key in ("fd_digits_cnn", "fd_digits_cnn_train_vs_test"):
        assert 0 <= m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"], key
    assert m["fd_digits_cnn"] > m["fd_digits_cnn_train_vs_test"] > 0 and m["fd_samples"] == 16
    assert m["kid_digits_cnn_std"] > 0 and all(math.isfinite(m[k]) for k in ("kid_digits_cnn",
                                                                              "kid_digits_cnn_train_vs_test"))
    assert next(k for k in m if k.endswith("_train_vs_test")) == "fd_digits_cnn_train_vs_test"
