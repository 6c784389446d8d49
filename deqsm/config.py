"""Typed, validated settings shared by the models and the pipeline (pydantic v2, unknown keys forbidden).

params.yaml is parsed once into these objects; models and solvers then receive explicit arguments
(``DEQSettings.layer_options()``), never the whole config.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from deqsm.deq import BACKWARDS
from deqsm.normalization import NORMALIZATIONS
from deqsm.losses import LOSSES
from deqsm.schema import Strict, known_name
from deqsm.solvers import SOLVERS, solver_knobs


class DEQSettings(Strict):
    """The ``deq`` section: how every DEQ layer solves and differentiates."""

    solver: str = "anderson"
    solver_options: dict[str, float] = Field(default_factory=dict)
    backward: str = "phantom"
    k: int = Field(2, ge=1, description="phantom steps")
    tau: float = Field(1.0, gt=0, le=1, description="phantom damping")
    tol: float = Field(1e-5, gt=0)
    max_iter: int = Field(50, ge=1)
    stop_mode: Literal["abs", "rel"] = "abs"
    lam: float = Field(2.0, gt=1, description="weight normalisation λ (> 1 for a contraction)")
    norm: str = "frobenius"
    gain: Literal["fixed", "learned"] = Field("fixed", description=(
        "the normalised weight's scale: 1/λ (fixed), or sigmoid(g)/λ with g learned, in (0, 1/λ)"))
    adjoint_tol: float | None = Field(None, gt=0)
    adjoint_max_iter: int | None = Field(None, ge=1)
    adjoint_stop_mode: Literal["abs", "rel"] = Field("rel", description=(
        "the implicit mode's adjoint solves stop on the residual relative to the solution's norm (rel)"))

    @field_validator("solver")
    @classmethod
    def _solver(cls, v: str) -> str:
        return known_name(v, SOLVERS)

    @field_validator("backward")
    @classmethod
    def _backward(cls, v: str) -> str:
        return known_name(v, BACKWARDS)

    @field_validator("norm")
    @classmethod
    def _norm(cls, v: str) -> str:
        return known_name(v, NORMALIZATIONS)

    def model_post_init(self, __context: Any) -> None:
        unknown = set(self.solver_options) - set(solver_knobs(self.solver))
        if unknown:
            raise ValueError(f"unknown solver_options {sorted(unknown)} for solver {self.solver!r}; "
                             f"its options: {solver_knobs(self.solver)}")

    def layer_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`deqsm.deq.DEQ`."""
        return dict(solver=self.solver, solver_options=dict(self.solver_options), backward=self.backward,
                    k=self.k, tau=self.tau, tol=self.tol, max_iter=self.max_iter, stop_mode=self.stop_mode,
                    adjoint_tol=self.adjoint_tol, adjoint_max_iter=self.adjoint_max_iter,
                    adjoint_stop_mode=self.adjoint_stop_mode)


class LossSettings(Strict):
    """A loss by name with its options (see :mod:`deqsm.losses`)."""

    name: str = "ssm"
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return v if v == "mle" else known_name(v, LOSSES)  # "mle": maximum likelihood, for flows
