"""How the report judges one variant against another on the experiment's headline metric.

A headline value comes with the uncertainty its evaluation measured, found by naming convention in
metrics.json (``<key>`` the headline's key):

- ``<key>_se``: a standard error (DKEF: the Monte-Carlo error of the importance-sampled log Z; the VAE's
  importance-weighted bound: the error over test rows); ``test_loglik`` falls back to ``test_loglik_sample_se``
  (the error of the mean over test rows, for exact likelihoods);
- ``<key>_ci_low`` / ``<key>_ci_high``: an interval (NCSN's Fréchet distance: a bootstrap interval);
- ``<key>_reliable`` = 0: the value is not an estimate to rank (DKEF: the importance sampler's effective sample
  size fell below ``is_ess_floor``).

:func:`compare` turns two of them into a verdict: with standard errors, "beats" / "is beaten by" when the
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


@dataclass(frozen=True)
class Estimate:
    """A variant's headline value with what qualifies it (None: not measured)."""

    value: float | None
    se: float | None = None
    se_kind: str = ""  # the metrics.json key of ``se``
    low: float | None = None  # an interval around value (both or neither)
    high: float | None = None
    unreliable: str | None = None  # why the value must not be ranked

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
    se_kind = next((k for k in (f"{key}_se", *(["test_loglik_sample_se"] if key == "test_loglik" else []))
                    if number(m.get(k)) is not None), "")
    low, high = number(m.get(f"{key}_ci_low")), number(m.get(f"{key}_ci_high"))
    if low is None or high is None:
        low = high = None
    unreliable = None
    if number(m.get(f"{key}_reliable")) == 0.0:
        ess = number(m.get("test_is_ess"))
        unreliable = ("the importance sampler's effective sample size "
                      + (f"{ess:.0f} " if ess is not None else "") + "is below eval.is_ess_floor")
    return Estimate(value, number(m.get(se_kind)) if se_kind else None, se_kind, low, high, unreliable)


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
