"""The floor of a score-matching loss on data whose score is known, and a training callback that flags a run
whose loss falls below it (score matching's degeneracy).

For the Hyvärinen objective, integration by parts gives
    J(θ) = E_p[½‖s_θ‖² + tr ∇s_θ] = ½ E_p‖s_θ − ∇log p‖² − ½ E_p‖∇log p‖²  ≥  −½ E_p‖∇log p‖²,
with equality at s_θ = ∇log p. The losses ``sm``, ``ssm``, ``ssm_vr`` and ``cp`` estimate J(θ) without bias. A loss
far below the floor is not a better fit. It means the integration by parts no longer holds for the model: its
density does not vanish where the data's does, or its score blows up between the samples, and the loss then
has no lower bound. One example: a DKEF with a DEQ at λ = 1.05 whose SSM loss ran to −2.6e5 on training and
validation data, with a test log-likelihood of −2396.

On training rows a flexible model can dip below the floor by overfitting, and a batch's loss is noisy. So the
guard compares the median training loss since the last evaluation (robust to a few wild batches and to a trend)
and the validation loss with ``floor − (3 floor_se + slack |floor|)``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from deqsm.metrics.density import true_score_function
from deqsm.train import Callback

Tensor = torch.Tensor

FLOOR_LOSSES = ("sm", "ssm", "ssm_vr", "cp")  # unbiased estimates of J(θ) (dsm has another constant)


def data_floor(true_density: Any, rows: Tensor, draws: int = 100_000) -> tuple[float, float] | None:
    """The floor of data whose ``true_density`` is known (None: unknown): from ``draws`` seeded samples of it, or from
    ``rows`` when it cannot sample. It costs about a second for the default mixture: compute it once per data set."""
    if true_density is None:
        return None
    if hasattr(true_density, "sample"):
        with torch.random.fork_rng():  # the same draws every time, and the caller's random state left alone
            torch.manual_seed(0)
            rows = true_density.sample((draws,))
    return loss_floor(true_score_function(true_density), rows.flatten(1).double())


def loss_floor(score: Callable[[Tensor], Tensor], x: Tensor) -> tuple[float, float]:
    """(−½ mean ‖∇log p(x)‖², its standard error) over the rows of ``x``, with ``score`` the true ∇log p."""
    with torch.no_grad():
        half_sq = 0.5 * score(x).flatten(1).double().pow(2).sum(1)
    n = half_sq.shape[0]
    se = float(half_sq.std() / math.sqrt(n)) if n > 1 else math.inf
    return -float(half_sq.mean()), se


class DegenerateLossGuard(Callback):
    """Watches the training loss (the median over the steps since the last evaluation) and the validation loss at
    every evaluation. Either one below ``floor − (3 floor_se + slack |floor|)`` flags the run as degenerate. It
    warns once, in the log, and :meth:`summary` reports it."""

    def __init__(self, floor: float, floor_se: float, slack: float = 0.25) -> None:
        self.floor, self.floor_se, self.slack = floor, floor_se, slack
        self._window: list[float] = []
        self.lowest = math.inf
        self.degenerate_step: int | None = None

    @property
    def threshold(self) -> float:
        return self.floor - (3 * self.floor_se + self.slack * abs(self.floor))

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if math.isfinite(metrics.get("train_loss", math.nan)):
            self._window.append(metrics["train_loss"])

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        checks = []
        if self._window:
            checks.append(("median training", float(torch.tensor(self._window, dtype=torch.float64).median())))
        if math.isfinite(metrics.get("val_loss", math.nan)):
            checks.append(("validation", metrics["val_loss"]))
        self._window = []
        for what, value in checks:
            self.lowest = min(self.lowest, value)
            if self.degenerate_step is None and value < self.threshold:
                self.degenerate_step = step
                print(f"warning: degenerate score matching at step {step}: the {what} loss {value:.4g} is below the "
                      f"data's floor {self.floor:.4g} (−½E‖∇log p‖², ± {self.floor_se:.2g}): the model's loss has no "
                      "lower bound there, not a better fit; regularise it (weight decay, a larger deq.lam, a "
                      "smaller learning rate)", flush=True)

    def summary(self) -> dict[str, float]:
        out = {"loss_floor": self.floor, "loss_floor_se": self.floor_se,
               "loss_degenerate": float(self.degenerate_step is not None)}
        if math.isfinite(self.lowest):
            out["loss_lowest"] = self.lowest
        if self.degenerate_step is not None:
            out["loss_degenerate_step"] = float(self.degenerate_step)
        return out
