"""How the report judges one variant against another on the experiment's headline metric.

A headline value comes with its uncertainty, found by naming convention in metrics.json (``<key>`` the
headline's key):

- ``<key>_se_seeds``: the standard error of the mean over the variant's training seeds (``n_seeds`` of them;
  :mod:`pipelines.seeds`). It comes first: it is the error of what a freshly trained model scores, each seed's
  evaluation noise included. Two variants are then judged by Welch's t: "beats" / "is beaten by" when
  |difference| exceeds the 97.5% quantile of Student's t (Welch–Satterthwaite degrees of freedom) times the
  combined standard error, else "is not separated from" (with 3 seeds that quantile is about 2.8–4.3, not 2);
- with one seed, the evaluation's own error: ``<key>_se``: a standard error (DKEF: the Monte-Carlo error of the importance-sampled log Z; the VAE's
  importance-weighted bound: the error over test rows); ``test_loglik`` falls back to ``test_loglik_sample_se``
  (the error of the mean over test rows, for exact likelihoods);
- ``<key>_ci_low`` / ``<key>_ci_high``: an interval (NCSN's Fréchet distance: a bootstrap interval);
- ``<key>_reliable`` = 0: the value is not an estimate to rank (DKEF: the importance sampler's effective sample
  size fell below ``is_ess_floor``).

:func:`compare` turns two of them into a verdict: across seeds as above; with evaluation standard errors, "beats" / "is beaten by" when the
difference exceeds two combined standard errors, else "is within two standard errors of"; with intervals,
when the intervals do not overlap; an unreliable value is never ranked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from deqsm.models import Headline
from pipelines.reporting.inputs import number

SE_WORDS = {"test_loglik_se": "the Monte-Carlo standard error of the importance-sampled log Z",
            "test_loglik_sample_se": "the standard error of the mean over test rows",
            "test_iw_loglik_se": "the standard error of the mean over test rows of the per-row bound (its "
                                 "Monte-Carlo error included)"}


def se_words(kind: str) -> str:
    """What the standard error named ``kind`` (a metrics.json key) measures, in words."""
    if kind.endswith("_se_seeds"):
        return ("the standard error of the mean over the training seeds (the seeds' sample standard deviation / √n; "
                "each seed's evaluation noise is part of that spread)")
    return SE_WORDS.get(kind, kind)


@dataclass(frozen=True)
class Estimate:
    """A variant's headline value with what qualifies it (None: not measured)."""

    value: float | None
    se: float | None = None
    se_kind: str = ""  # the metrics.json key of ``se``
    low: float | None = None  # an interval around value (both or neither)
    high: float | None = None
    unreliable: str | None = None  # why the value must not be ranked
    n: int | None = None  # training seeds behind value and se (se across seeds when se_kind ends in _se_seeds)

    @property
    def across_seeds(self) -> bool:
        return self.se is not None and self.se_kind.endswith("_se_seeds") and (self.n or 0) > 1

    def cell(self, spec: str) -> str:
        """The value as a table cell: ``v ± se``, ``v [low, high]``, marked when unreliable."""
        if self.value is None:
            return "—"
        text = format(self.value, spec)
        if self.se is not None:
            text += f" ± {self.se:{spec}}"
        elif self.low is not None:
            text += f" [{self.low:{spec}}, {self.high:{spec}}]"
        return text + (" (unreliable)" if self.unreliable else "")


def estimate(metrics: dict[str, Any] | None, key: str) -> Estimate:
    """The headline ``key`` of one variant's metrics, with its standard error or interval and reliability."""
    m = metrics or {}
    value = number(m.get(key))
    se_kind = next((k for k in (f"{key}_se_seeds", f"{key}_se",
                                *(["test_loglik_sample_se"] if key == "test_loglik" else []))
                    if number(m.get(k)) is not None), "")
    low, high = number(m.get(f"{key}_ci_low")), number(m.get(f"{key}_ci_high"))
    if low is None or high is None:
        low = high = None
    unreliable = None
    if number(m.get(f"{key}_reliable")) == 0.0:
        ess = number(m.get("test_is_ess"))
        unreliable = ("the importance sampler's effective sample size "
                      + (f"{ess:.0f} " if ess is not None else "") + "is below eval.is_ess_floor")
    if se_kind.endswith("_se_seeds"):
        low = high = None  # a seed's own interval says nothing about the spread across seeds
    n = number(m.get("n_seeds"))
    return Estimate(value, number(m.get(se_kind)) if se_kind else None, se_kind, low, high, unreliable,
                    int(n) if n is not None else None)


def welch_threshold(d: Estimate, e: Estimate) -> tuple[float, float]:
    """(Welch–Satterthwaite degrees of freedom, the 97.5% quantile of Student's t there) for two means over
    seeds with standard errors ``d.se``, ``e.se`` from ``d.n``, ``e.n`` seeds."""
    from scipy.stats import t

    a, b = d.se ** 2, e.se ** 2
    if a + b == 0:
        return math.inf, float(t.ppf(0.975, 1e9))
    df = (a + b) ** 2 / (a ** 2 / (d.n - 1) + b ** 2 / (e.n - 1))
    return df, float(t.ppf(0.975, df))


WORDS = {"test_loglik": "test log-likelihood", "test_iw_loglik": "the test log-likelihood bound"}


def metric_words(main: Headline) -> str:
    return WORDS.get(main.key, main.key)


def compare(exp: str, dv: str, d: Estimate, ev: str, e: Estimate, main: Headline) -> tuple[str, float | None]:
    """The sentence judging variant ``dv`` against ``ev`` on ``main``, and their difference (None: not compared)."""
    what = metric_words(main)
    unit = f" {main.unit}" if main.unit else ""
    if d.value is None or e.value is None:
        return f"`{exp}`: no {what} to compare `{dv}` with `{ev}`.", None
    diff = d.value - e.value
    shown = f"{d.value:.3f} vs {e.value:.3f}{unit}, difference {diff:+.3f}"
    bad = [f"`{v}`'s ({est.unreliable})" for v, est in ((dv, d), (ev, e)) if est.unreliable]
    if bad:
        return (f"`{exp}`: `{dv}` and `{ev}` are not ranked on {what} ({shown}): it is unreliable for "
                f"{' and '.join(bad)}.", diff)
    sign = 1.0 if main.higher_is_better else -1.0
    if d.across_seeds and e.across_seeds:
        se = math.hypot(d.se, e.se)
        df, q = welch_threshold(d, e)
        verdict = ("beats" if sign * diff > q * se else "is beaten by" if sign * diff < -q * se
                   else "is not separated from")
        tstat = f"{diff / se:+.2f}" if se > 0 else "inf"
        return (f"`{exp}`: `{dv}` {verdict} `{ev}` in {what} ({shown}; mean over {d.n} vs {e.n} seeds, combined "
                f"se {se:.3f}, Welch t = {tstat} against ±{q:.2f} at {df:.1f} df).", diff)
    if d.se is not None and e.se is not None:
        se = math.hypot(d.se, e.se)
        verdict = ("beats" if sign * diff > 2 * se else "is beaten by" if sign * diff < -2 * se
                   else "is within two standard errors of")
        return f"`{exp}`: `{dv}` {verdict} `{ev}` in {what} ({shown}, combined se {se:.3f}).", diff
    if d.low is not None and e.low is not None:
        separated = d.high < e.low or e.high < d.low
        verdict = ("beats" if separated and sign * diff > 0 else "is beaten by" if separated
                   else "is not separated from")
        return (f"`{exp}`: `{dv}` {verdict} `{ev}` in {what} ({d.value:.3f} [{d.low:.3f}, {d.high:.3f}] vs "
                f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]{unit}, difference {diff:+.3f}; "
                f"{'the intervals do not overlap' if separated else 'the intervals overlap'}).", diff)
    better = "above" if diff > 0 else "below" if diff < 0 else "equal to"
    if main.key != "test_loglik":
        better = ("better than" if sign * diff > 0 else "worse than" if sign * diff < 0 else "equal to")
    return (f"`{exp}`: `{dv}`'s {what} is {better} `{ev}`'s ({shown}; "
            f"{'higher' if main.higher_is_better else 'lower'} is better; no standard error to judge it).", diff)
