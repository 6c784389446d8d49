"""Weight normalisation for DEQ cells: a contractive linear part, so the fixed point exists and is unique.

``NORMALIZATIONS`` maps a name to W ↦ Ŵ with ‖Ŵ‖ ≤ 1/λ: ``frobenius`` (the paper's, through ‖W‖_F ≥ ‖W‖₂),
``spectral`` (exact σ_max) and ``operator`` (a layer's exact operator norm, convolutions included).
:class:`CachedNormalization` is the base of layers that use their weight normalised: it computes Ŵ once per
parameter version in graph-free solves, once per DEQ call under gradients (:func:`held_normalization`), and
takes Ŵ from outside when the implicit backward passes it in as an input (:func:`normalization_overrides`).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from deqsm.registry import Registry

Tensor = torch.Tensor


def frobenius_normalize(weight: Tensor, lam: float, eps: float = 1e-6) -> Tensor:
    """W / (λ (‖W‖_F + ε)), the paper's normalisation; ‖·‖₂ ≤ ‖·‖_F so λ > 1 makes it a contraction."""
    return weight / (lam * (torch.linalg.matrix_norm(weight.flatten(1), ord="fro") + eps))


def spectral_normalize(weight: Tensor, lam: float, eps: float = 1e-6) -> Tensor:
    """W / (λ (σ_max(W) + ε)), the tightest normalisation (exact σ_max via SVD: costly for large W)."""
    return weight / (lam * (torch.linalg.matrix_norm(weight.flatten(1), ord=2) + eps))


NORMALIZATIONS: Registry[Callable[..., Tensor]] = Registry("weight normalisation")
NORMALIZATIONS.register("frobenius")(frobenius_normalize)
NORMALIZATIONS.register("spectral")(spectral_normalize)
# The layer's exact operator norm: for a matrix its σ_max (as "spectral"); a convolution computes its own
# (deqsm.models.conv.conv_operator_norm) instead of bounding it by the flattened kernel's norm.
NORMALIZATIONS.register("operator")(spectral_normalize)


GAIN_INIT = 0.95  # a learned gain starts at this fraction of its bound 1/λ


class CachedNormalization(nn.Module):
    """A layer whose ``weight`` is used normalised (:meth:`normalized_weight`). Ŵ is computed
    - in a graph-free solve (which calls the cell tens of times with the same weight): once per version of the
      layer's parameters (and ``size``, when the normalisation depends on the input's shape). The DEQ drops
      this cache at each forward: weights written through ``.data`` keep their version counter;
    - under gradients, inside :func:`held_normalization` (one DEQ call): once, the same graph-carrying Ŵ for
      every application of the cell (phantom steps, unrolled iterations), instead of once per application —
      for ``spectral`` an SVD each;
    - not at all where :func:`normalization_overrides` hands it in (the implicit backward, whose inputs are Ŵ).

    Gain: Ŵ = γ · W / ‖W‖ with γ = 1/λ fixed, or (``learn_gain``) γ = sigmoid(g) / λ with g learned, so that
    training chooses how contractive the layer is while γ stays in (0, 1/λ): a contraction at every step.
    γ starts at ``GAIN_INIT`` / λ."""

    weight: nn.Parameter
    lam: float
    _cached: tuple[tuple, Tensor] | None = None
    _held: dict | None = None  # size key → graph-carrying Ŵ, within :func:`held_normalization`
    _override: dict | None = None  # size key → Ŵ given from outside (:func:`normalization_overrides`)

    def _init_gain(self, learn_gain: bool) -> None:
        init = torch.tensor(math.log(GAIN_INIT / (1.0 - GAIN_INIT)))
        self.register_parameter("gain_logit", nn.Parameter(init) if learn_gain else None)

    def gain(self) -> Tensor:
        """γ: 1/λ, or sigmoid(g) / λ when learned (a tensor in the graph)."""
        if self.gain_logit is None:
            return torch.tensor(1.0 / self.lam)
        return torch.sigmoid(self.gain_logit) / self.lam

    def _compute(self, size: tuple[int, ...] | None) -> Tensor:
        raise NotImplementedError

    def _size_key(self, size: tuple[int, ...] | None) -> tuple[int, ...] | None:
        return None  # the normalisation does not depend on the input's shape

    def operator_norm(self, size: tuple[int, ...] | None = None) -> Tensor:
        """‖Ŵ‖₂ of the map the layer applies (here the normalised weight as a matrix, rows = outputs); a layer
        whose map is not a plain matrix product (a convolution) computes its own."""
        return torch.linalg.matrix_norm(self.normalized_weight(size).flatten(1), ord=2)

    def normalized_weight(self, size: tuple[int, ...] | None = None) -> Tensor:
        skey = self._size_key(size)
        if self._override is not None and skey in self._override:
            return self._override[skey]
        w = self.weight
        params = list(self.parameters(recurse=False))  # the weight, and the gain when learned
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            if self._held is None:
                return self._compute(size)
            if skey not in self._held:
                self._held[skey] = self._compute(size)
            return self._held[skey]
        key = (*((p.data_ptr(), p._version) for p in params), w.dtype, w.device, skey)
        if self._cached is None or self._cached[0] != key:
            with torch.no_grad():
                self._cached = (key, self._compute(size))
        return self._cached[1]


def normalization_layers(module: nn.Module) -> list[tuple[str, CachedNormalization]]:
    """The (prefix, layer) pairs of ``module``'s normalised layers."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, CachedNormalization)]


@contextmanager
def held_normalization(module: nn.Module) -> Iterator[None]:
    """Within the block, each normalised layer of ``module`` computes its graph-carrying Ŵ once (per size) and
    reuses it (the layer's ``_held``: size key → Ŵ). Cleared on exit, so no graph outlives the call that built it."""
    layers = [m for _, m in normalization_layers(module)]
    for m in layers:
        m._held = {}
    try:
        yield
    finally:
        for m in layers:
            m._held = None


@contextmanager
def normalization_overrides(values: list[tuple[CachedNormalization, dict]]) -> Iterator[None]:
    """Within the block, each given layer uses the given Ŵ (by size key) instead of computing it."""
    saved = [(m, m._override) for m, _ in values]
    for m, d in values:
        m._override = d
    try:
        yield
    finally:
        for m, prev in saved:
            m._override = prev


class NormalizedLinear(CachedNormalization):
    """A bias-free linear map z ↦ Ŵ z with Ŵ = W normalised so that ‖Ŵ‖₂ ≤ 1/λ (times a learned gain in (0, 1]
    with ``learn_gain``)."""

    def __init__(self, features: int, *, lam: float = 2.0, norm: str = "frobenius", learn_gain: bool = False) -> None:
        super().__init__()
        if not lam > 1.0:
            raise ValueError(f"normalisation lambda must be > 1 for a contraction, got {lam}")
        self.lam = lam
        self.norm = norm
        self._normalize = NORMALIZATIONS.get(norm)
        self.weight = nn.Parameter(torch.empty(features, features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self._init_gain(learn_gain)

    def _compute(self, size: tuple[int, ...] | None) -> Tensor:
        if self.gain_logit is None:
            return self._normalize(self.weight, self.lam)
        return self._normalize(self.weight, 1.0) * self.gain()

    def forward(self, z: Tensor) -> Tensor:
        return z @ self.normalized_weight().t()
