"""Several seeds per variant: pipelines.seeds reduces them to a mean and its standard error across seeds, and the
report's verdicts judge two variants on those errors (Welch's t), not on one seed's evaluation error."""
from __future__ import annotations

import math

import pytest

from deqsm.models import Headline
from pipelines.reporting.inputs import seed_view
from pipelines.reporting.verdicts import compare, estimate
from pipelines.seeds import aggregate

LOGLIK = Headline("test_loglik", "test log-lik (nats) ± se", True, "nats")


def test_the_standard_error_is_taken_across_seeds():
    per_seed = {0: {"test_loglik": -2.0, "test_loglik_se": 0.01, "memory_kind": "autograd_saved_bytes"},
                1: {"test_loglik": -2.3, "test_loglik_se": 0.03, "memory_kind": "autograd_saved_bytes"},
                2: {"test_loglik": -2.6, "test_loglik_se": 0.02, "memory_kind": "autograd_saved_bytes"}}
    out = aggregate(per_seed)
    assert out["seeds"] == [0, 1, 2] and out["n_seeds"] == 3
    assert out["test_loglik_mean"] == pytest.approx(-2.3)
    # sample sd of (-2.0, -2.3, -2.6) is 0.3, so the se of the mean is 0.3 / sqrt(3): not a seed's own 0.01-0.03
    assert out["test_loglik_se_seeds"] == pytest.approx(0.3 / math.sqrt(3))
    assert out["test_loglik_se_mean"] == pytest.approx(0.02) and "test_loglik_se_se_seeds" not in out
    assert out["memory_kind"] == "autograd_saved_bytes"


def test_a_missing_or_non_finite_seed_voids_the_mean_and_one_unreliable_seed_the_flag():
    out = aggregate({0: {"fd": 10.0, "fd_reliable": 1.0}, 1: {"fd": None, "fd_reliable": 1.0},
                     2: {"fd": 12.0, "fd_reliable": 0.0}})
    assert out["fd_mean"] is None and out["fd_se_seeds"] is None and out["fd_n_finite"] == 2
    assert out["fd_reliable"] == 0.0
    one = aggregate({5: {"fd": 10.0}})
    assert one["fd_mean"] == 10.0 and one["fd_se_seeds"] is None and one["seeds"] == [5]
    with pytest.raises(ValueError, match="no seeds"):
        aggregate({})


def _variant(values: list[float], eval_se: float = 0.001) -> dict:
    return seed_view(aggregate({s: {"test_loglik": v, "test_loglik_se": eval_se} for s, v in enumerate(values)}))


def test_verdicts_rest_on_the_seeds_not_on_one_evaluation():
    """Tiny evaluation errors (0.001) but seeds that scatter by ~0.3: a 0.2 difference is not separated; the
    estimate takes the across-seed error first."""
    d, e = estimate(_variant([-2.0, -2.3, -2.6]), "test_loglik"), estimate(_variant([-2.2, -2.5, -2.8]), "test_loglik")
    assert d.se_kind == "test_loglik_se_seeds" and d.se == pytest.approx(0.3 / math.sqrt(3)) and d.n == 3
    line, diff = compare("x", "deq", d, "ex", e, LOGLIK)
    assert "`deq` is not separated from `ex`" in line and "3 vs 3 seeds" in line and diff == pytest.approx(0.2)
    # the same means, seeds that agree: separated; Welch's quantile at 4 df is 2.78, not 2
    d, e = estimate(_variant([-2.29, -2.30, -2.31]), "test_loglik"), estimate(_variant([-2.49, -2.50, -2.51]), "test_loglik")
    line, _ = compare("x", "deq", d, "ex", e, LOGLIK)
    assert "`deq` beats `ex`" in line and "±2.78 at 4.0 df" in line
    line, _ = compare("x", "ex", e, "deq", d, LOGLIK)
    assert "`ex` is beaten by `deq`" in line


def test_the_welch_quantile_is_stricter_than_two_standard_errors_with_few_seeds():
    """A difference of 2.5 combined standard errors: 'beats' under the two-se rule, not with 3 seeds (t at 4 df)."""
    se_each = 0.1 / math.sqrt(3)  # seeds spread with sd 0.1
    diff = 2.5 * math.hypot(se_each, se_each)
    d = estimate(_variant([-2.0 - 0.1, -2.0, -2.0 + 0.1]), "test_loglik")
    e = estimate(_variant([-2.0 - diff - 0.1, -2.0 - diff, -2.0 - diff + 0.1]), "test_loglik")
    line, _ = compare("x", "deq", d, "ex", e, LOGLIK)
    assert "is not separated from" in line and "Welch t = +2.50" in line


def test_one_seed_falls_back_to_the_evaluation_error():
    d, e = estimate(_variant([-2.0], 0.01), "test_loglik"), estimate(_variant([-2.5], 0.01), "test_loglik")
    assert d.se_kind == "test_loglik_se" and not d.across_seeds
    line, _ = compare("x", "deq", d, "ex", e, LOGLIK)
    assert "`deq` beats `ex`" in line and "combined se 0.014" in line


def test_the_ncsn_table_shows_means_and_errors_over_seeds():
    """FD and KID: mean ± the se across seeds (not one seed's interval or subset std); the floor keeps its interval."""
    from pipelines.reporting import tables
    from pipelines.reporting.inputs import ExperimentData
    from pipelines.settings import ExperimentSettings

    def seed(fd: float, kid: float) -> dict:
        return {"fd_digits_cnn": fd, "fd_digits_cnn_ci_low": fd - 3, "fd_digits_cnn_ci_high": fd + 4,
                "fd_digits_cnn_train_vs_test": 12.0, "fd_digits_cnn_train_vs_test_ci_low": 10.0,
                "fd_digits_cnn_train_vs_test_ci_high": 15.0, "kid_digits_cnn": kid, "kid_digits_cnn_std": 0.5,
                "kid_digits_cnn_train_vs_test": 0.001}

    m = {"deq": seed_view(aggregate({0: seed(40.0, 0.2), 1: seed(44.0, 0.3), 2: seed(48.0, 0.4)})),
         "explicit-2": seed_view(aggregate({0: seed(60.0, 0.5), 1: seed(61.0, 0.5), 2: seed(62.0, 0.5)}))}
    spec = ExperimentSettings(dataset="d", model="ncsn", variants={"deq": {"variant": "deq"},
                                                                   "explicit-2": {"variant": "explicit", "depth": 2}})
    data = ExperimentData("e", spec, m, {}, None)
    md = tables.experiment_table_md(data, tables.table_rows(data))
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    row = dict(zip(header, [c.strip() for c in lines[1].split("|")[1:-1]]))
    assert row["seeds"] == "3" and row["fd_digits_cnn (lower is better)"] == f"44.00 ± {4 / math.sqrt(3):.2f}"
    assert row["kid_digits_cnn ± se"] == f"0.3 ± {0.1 / math.sqrt(3):.4g}"
    assert row["train-vs-test FD (floor)"] == "12.00 [10.00, 15.00]"
    assert "`fd_digits_cnn_se_seeds`" in md  # the footnote names the error
