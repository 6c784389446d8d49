"""ASHA for a search over model variants: :class:`VariantASHA` (successive halving within each variant) and
:func:`middle_out` (the order a grid's values start in). Ray's scheduler API; :mod:`pipelines.ray_search` uses
both."""
from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from pipelines.trials import trial_point


def middle_out(values: list) -> list:
    """Grid values from the middle outwards (indices 3, 4, 2, 5, 1, 6, 0, 7 of eight): ASHA judges a trial against
    those that reached its rung before it, so the likely-good middle runs first and the extremes meet it there.
    In the grid's own order (say, learning rates ascending) each trial tends to beat the one before and none stops."""
    mid = (len(values) - 1) // 2
    order = sorted(range(len(values)), key=lambda i: (abs(i - mid - 0.5), i))
    return [values[i] for i in order]


class VariantASHA(FIFOScheduler):
    """ASHA (asynchronous successive halving) run separately within each model variant of a search.

    One search trains every variant (``config["variant_name"]``), and their validation losses live on different
    scales (a DKEF DEQ reaches −12 where a deeper explicit net sits at −0.3): a single ASHA compares every
    trial at a rung with all the others and would stop a whole variant's trials. Here each variant has its own
    :class:`ASHAScheduler` (the same ``max_t``, ``grace_period``, ``reduction_factor``), so a trial races only
    its own variant's trials and each variant keeps its best. Trials start in FIFO order (Ray's default).

    ``last_stop``: the last iteration at which a trial may be stopped (None: any). A trial's last evaluation is
    followed by its summary (steps, time per step, memory, solver statistics): stopping it there saves nothing
    and would lose the summary, so the search passes its second-last evaluation."""

    def __init__(self, *, max_t: int, grace_period: int, reduction_factor: float,
                 time_attr: str = "training_iteration", last_stop: int | None = None) -> None:
        super().__init__()
        if not 1 <= grace_period <= max_t:
            raise ValueError(f"grace_period must lie in [1, max_t = {max_t}], got {grace_period}")
        self._options = {"time_attr": time_attr, "max_t": max_t, "grace_period": grace_period,
                         "reduction_factor": reduction_factor}
        self._last_stop = last_stop
        self._mode: str | None = None
        self._by_variant: dict[str, ASHAScheduler] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def variant_scheduler(self, variant: str) -> ASHAScheduler:
        """The ASHA instance that judges ``variant``'s trials (made on first use)."""
        if variant not in self._by_variant:
            self._by_variant[variant] = ASHAScheduler(metric=self._metric, mode=self._mode, **self._options)
        return self._by_variant[variant]

    def _of(self, trial) -> ASHAScheduler:
        return self.variant_scheduler(trial_point(trial.config)[0])

    def on_trial_add(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if "failed" in result:  # a diverged trial's last result (the metric's worst, ±inf): it ends anyway; an
            return TrialScheduler.CONTINUE  # infinite value at a rung makes numpy warn and skews the rung's cutoff
        decision = self._of(trial).on_trial_result(tune_controller, trial, result)  # records it at its rung
        late = self._last_stop is not None and result.get(self._options["time_attr"], 0) > self._last_stop
        return TrialScheduler.CONTINUE if late else decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if "failed" in (result or {}):  # not recorded at a rung either (see on_trial_result): Ray's ASHA
            result = {}                   # records nothing for a result without the metric
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{v}: {s.debug_string()}" for v, s in sorted(self._by_variant.items())) or "VariantASHA"
