"""A variant trained over several seeds: its per-seed figures reduced to a mean and a standard error.

metrics.json holds, per variant, ``<metric>_mean`` and ``<metric>_se_seeds`` (the sample standard deviation
across seeds over √n: the error of the mean as an estimate of what a freshly trained model scores; each seed's
own evaluation noise is part of that spread), ``seeds`` (the seeds) and ``n_seeds``. A ``<metric>_reliable`` flag
is the least of the seeds' (one unreliable seed makes the mean unreliable); text values the seeds agree on are
kept as they are; a seed's own evaluation errors (``_se``, ``_std``, ``_ci_low``, ``_ci_high``) get
a mean only. The per-seed figures themselves go to ``seeds.json`` beside metrics.json.
"""
from __future__ import annotations

import math
import statistics
from typing import Any


# Errors and interval ends of a seed's own evaluation: their mean across seeds is kept (the typical evaluation
# error), their spread is not a figure anyone reads.
ERROR_SUFFIXES = ("_se", "_std", "_ci_low", "_ci_high")


def finite_number(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def mean_and_se(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error across seeds (None for one seed: no spread to measure)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def aggregate(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The metrics of one variant's seeds (seed → metrics) as mean / se / seeds (see the module docstring).

    A metric that is missing or not finite for some seed has a null mean and se (it is not averaged over the
    seeds that happen to have it); ``<metric>_n_finite`` then says for how many seeds it was."""
    seeds = sorted(per_seed)
    if not seeds:
        raise ValueError("no seeds to aggregate")
    out: dict[str, Any] = {"seeds": seeds, "n_seeds": len(seeds)}
    keys = sorted({k for m in per_seed.values() for k in m})
    for key in keys:
        values = [per_seed[s].get(key) for s in seeds]
        if key.endswith("_reliable"):
            nums = [finite_number(v) for v in values]
            out[key] = None if any(v is None for v in nums) else min(nums)
        elif any(isinstance(v, str) for v in values):
            out[key] = values[0] if len(set(map(str, values))) == 1 else ", ".join(map(str, values))
        else:
            nums = [finite_number(v) for v in values]
            if all(v is not None for v in nums):
                out[f"{key}_mean"], se = mean_and_se(nums)
                if not key.endswith(ERROR_SUFFIXES):
                    out[f"{key}_se_seeds"] = se
            else:
                out[f"{key}_mean"] = out[f"{key}_se_seeds"] = None
                out[f"{key}_n_finite"] = sum(v is not None for v in nums)
    return out
