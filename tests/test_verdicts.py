"""The report's verdicts (pipelines.reporting.verdicts) and the tables that show what they rest on: a value with
its standard error or interval, an unreliable value never ranked."""
from __future__ import annotations

import pytest

from deqsm.models import Headline
from pipelines.reporting import tables
from pipelines.reporting.inputs import ExperimentData
from pipelines.reporting.verdicts import compare, estimate
from pipelines.settings import ExperimentSettings

LOGLIK = Headline("test_loglik", "test log-lik (nats) ± se", True, "nats")
FD = Headline("fd_digits_cnn", "fd_digits_cnn (lower is better)", False, "")


def test_estimate_reads_se_interval_and_reliability_by_name():
    e = estimate({"test_loglik": -2.0, "test_loglik_se": 0.1, "test_loglik_sample_se": 0.5}, "test_loglik")
    assert (e.value, e.se, e.se_kind, e.unreliable) == (-2.0, 0.1, "test_loglik_se", None)
    e = estimate({"test_loglik": -2.0, "test_loglik_sample_se": 0.5}, "test_loglik")
    assert (e.se, e.se_kind) == (0.5, "test_loglik_sample_se")
    e = estimate({"test_iw_loglik": -30.0, "test_iw_loglik_se": 0.2, "test_loglik_sample_se": 9.0}, "test_iw_loglik")
    assert (e.se, e.se_kind) == (0.2, "test_iw_loglik_se")  # the fallback is test_loglik's only
    e = estimate({"fd_digits_cnn": 40.0, "fd_digits_cnn_ci_low": 35.0, "fd_digits_cnn_ci_high": 47.0}, "fd_digits_cnn")
    assert (e.se, e.low, e.high) == (None, 35.0, 47.0) and e.cell(".1f") == "40.0 [35.0, 47.0]"
    e = estimate({"test_loglik": -2396.0, "test_loglik_se": 3.0, "test_loglik_reliable": 0.0, "test_is_ess": 36.0},
                 "test_loglik")
    assert e.unreliable and "36" in e.unreliable and e.cell(".1f") == "-2396.0 ± 3.0 (unreliable)"
    assert estimate({"test_loglik": -2.0, "test_loglik_reliable": 1.0}, "test_loglik").unreliable is None
    assert estimate(None, "test_loglik").cell(".3f") == "—"


@pytest.mark.parametrize("d, e, verdict", [
    (-2.0, -2.5, "beats"), (-2.5, -2.0, "is beaten by"), (-2.0, -2.1, "is within two standard errors of")])
def test_standard_errors_decide_higher_is_better(d, e, verdict):
    line, diff = compare("x", "deq", estimate({"test_loglik": d, "test_loglik_se": 0.05}, "test_loglik"),
                         "explicit", estimate({"test_loglik": e, "test_loglik_se": 0.05}, "test_loglik"), LOGLIK)
    assert f"`deq` {verdict} `explicit` in test log-likelihood" in line and diff == pytest.approx(d - e)


def test_lower_is_better_with_standard_errors_and_with_intervals():
    fd = lambda v, se: {"fd_digits_cnn": v, "fd_digits_cnn_se": se}  # noqa: E731
    line, _ = compare("n", "deq", estimate(fd(10.0, 1.0), FD.key), "ex", estimate(fd(20.0, 1.0), FD.key), FD)
    assert "`deq` beats `ex`" in line
    ci = lambda v, lo, hi: {"fd_digits_cnn": v, "fd_digits_cnn_ci_low": lo, "fd_digits_cnn_ci_high": hi}  # noqa: E731
    line, _ = compare("n", "deq", estimate(ci(10.0, 8.0, 13.0), FD.key), "ex", estimate(ci(20.0, 15.0, 26.0), FD.key), FD)
    assert "`deq` beats `ex`" in line and "do not overlap" in line
    line, _ = compare("n", "deq", estimate(ci(30.0, 25.0, 36.0), FD.key), "ex", estimate(ci(20.0, 15.0, 26.0), FD.key), FD)
    assert "`deq` is not separated from `ex`" in line and "the intervals overlap" in line
    line, _ = compare("n", "deq", estimate(ci(30.0, 28.0, 33.0), FD.key), "ex", estimate(ci(20.0, 15.0, 26.0), FD.key), FD)
    assert "`deq` is beaten by `ex`" in line


def test_an_unreliable_value_is_never_ranked():
    good = {"test_loglik": -2.0, "test_loglik_se": 0.01, "test_loglik_reliable": 1.0}
    bad = {"test_loglik": 5.0, "test_loglik_se": 0.01, "test_loglik_reliable": 0.0, "test_is_ess": 36.0}
    for d, e in ((good, bad), (bad, good)):
        line, diff = compare("x", "deq", estimate(d, "test_loglik"), "ex", estimate(e, "test_loglik"), LOGLIK)
        assert "not ranked" in line and "beats" not in line and "beaten" not in line and "36" in line
        assert diff is not None  # the difference is still recorded


def test_without_uncertainty_the_verdict_says_so():
    line, _ = compare("n", "deq", estimate({FD.key: 10.0}, FD.key), "ex", estimate({FD.key: 20.0}, FD.key), FD)
    assert "`deq`'s fd_digits_cnn is better than `ex`'s" in line and "no standard error" in line


def _data(model: str, metrics: dict) -> ExperimentData:
    spec = ExperimentSettings(dataset="d", model=model, variants={"deq": {"variant": "deq"},
                                                                  "explicit-2": {"variant": "explicit", "depth": 2}})
    return ExperimentData("e", spec, metrics, {}, None)


def _cells(md: str) -> dict[str, dict[str, str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    return {row[0]: dict(zip(header, row)) for row in ([c.strip() for c in line.split("|")[1:-1]] for line in lines[1:])}


def test_ncsn_table_shows_the_interval_floor_and_kid():
    m = {v: {"fd_digits_cnn": fd, "fd_digits_cnn_ci_low": fd - 3, "fd_digits_cnn_ci_high": fd + 4,
             "fd_digits_cnn_train_vs_test": 12.0, "fd_digits_cnn_train_vs_test_ci_low": 10.0,
             "fd_digits_cnn_train_vs_test_ci_high": 15.0, "kid_digits_cnn": kid, "kid_digits_cnn_std": 0.01,
             "kid_digits_cnn_train_vs_test": 0.001}
         for v, fd, kid in (("deq", 40.0, 0.2), ("explicit-2", 50.0, 0.3))}
    data = _data("ncsn", m)
    md = tables.experiment_table_md(data, tables.table_rows(data))
    row = _cells(md)["deq (DEQ)"]
    assert row["fd_digits_cnn (lower is better)"] == "40.00 [37.00, 44.00]"
    assert row["train-vs-test FD (floor)"] == "12.00 [10.00, 15.00]"
    assert row["kid_digits_cnn ± std"] == "0.2 ± 0.01" and row["train-vs-test KID"] == "0.001"
    assert "bootstrap of the samples" in md and "floor" in md


def test_density_table_marks_an_unreliable_loglik():
    m = {"deq": {"test_loglik": -2396.0, "test_loglik_se": 3.0, "test_loglik_reliable": 0.0, "test_is_ess": 36.0},
         "explicit-2": {"test_loglik": -2.2, "test_loglik_se": 0.01, "test_loglik_reliable": 1.0, "test_is_ess": 9000.0}}
    data = _data("dkef", m)
    rows = tables.table_rows(data)
    md = tables.experiment_table_md(data, rows)
    cells = _cells(md)
    assert cells["deq (DEQ)"]["test log-lik (nats) ± se"] == "-2396.000 ± 3.000 (unreliable)"
    assert cells["explicit-2 (depth 2)"]["test log-lik (nats) ± se"] == "-2.200 ± 0.010"
    assert "`deq` (unreliable)" in md and "never ranked" in md
    assert [r["main_unreliable"] != "" for r in rows] == [True, False]


def test_vae_table_heads_with_the_valid_bound_and_keeps_the_kde_elbo_as_a_diagnostic():
    m = {v: {"test_iw_loglik": iw, "test_iw_loglik_se": 0.2, "test_iw_loglik_mc_se": 0.01, "test_elbo": iw + 1.5}
         for v, iw in (("deq", -30.0), ("explicit-2", -31.0))}
    data = _data("vae", m)
    assert data.headline().key == "test_iw_loglik"
    md = tables.experiment_table_md(data, tables.table_rows(data))
    row = _cells(md)["deq (DEQ)"]
    assert row["test log-likelihood bound (IW, nats)"] == "-30.000 ± 0.200"
    assert row["KDE ELBO (diagnostic, biased up)"] == "-28.500" and "IW bound (nats)" not in md
    assert "never ranked" in md and "test_iw_loglik_se" in md


def test_evaluate_tags_each_judged_estimate_for_the_mlflow_ui():
    from pipelines.evaluate import reliability_tags

    tags = reliability_tags({"test_loglik": -2396.0, "test_loglik_reliable": 0.0, "test_x_reliable": 1.0,
                             "test_is_ess": 36.0, "memory_kind": "autograd_saved_bytes"})
    assert tags == {"deqsm.reliable.test_loglik": "false", "deqsm.reliable.test_x": "true"}
    assert reliability_tags({"fd_digits_cnn": 40.0}) == {}
