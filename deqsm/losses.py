"""Score-matching losses, model-agnostic.

For an energy model p_θ(x) ∝ exp(−E_θ(x)) the score is s_θ(x) = −∇ₓ E_θ(x). Every loss is written once
for a *score function* x ↦ s(x) (with its graph), so the same code serves energy models
(``get_loss``: the score is taken by autograd with ``create_graph``) and networks that output the score
directly (``get_score_loss``: VAE entropy nets, NCSN).

- ``sm``     exact score matching (Hyvärinen 2005): E[tr ∇ₓ s + ½‖s‖²]; the trace takes d backward passes,
             batched with ``is_grads_batched`` (a vmap) when the model allows it.
- ``ssm``    sliced score matching: E[vᵀ(∇ₓ s)v + ½(vᵀs)²], v Rademacher / Gaussian / sphere (√d-scaled).
- ``ssm_vr`` its variance-reduced form: E[vᵀ(∇ₓ s)v + ½‖s‖²].
- ``dsm``    denoising score matching: E[½‖s(x̃) + (x̃ − x)/σ²‖²], x̃ = x + σε; with a σ ladder each sample
             draws σ and the term is weighted by σ² (NCSN), i.e. ½‖σ s(x̃) + ε‖².
- ``cp``     curvature propagation (Martens et al. 2012): an unbiased estimate of tr ∇²E for energies made
             of affine maps and elementwise activations (see :class:`LayeredEnergy`).

``loss_fn(model, x)`` returns :class:`LossOutput`: the scalar batch-mean ``loss`` and its named terms.

Conventions (scales differ between codebases; compare losses and ``train.grad_clip`` with them in mind):

- ``dsm`` at one σ is ½‖s(x̃) + ε/σ‖², which estimates the Fisher divergence at noise level σ (up to a
  constant). The sliced-score-matching reference code's ``dsm`` computes ½‖σ²s(x̃) + σε‖² = σ⁴ · ours, so at
  small σ its values, and its gradients, are far smaller; here a σ of 0.1 makes raw gradients 10⁴ times the
  reference's, and ``train.grad_clip`` then cuts many steps (the training logs ``grad_clipped`` per step and
  ``clipped_fraction`` in the fit summary). NCSN's annealed form weights by σ², i.e. ½‖σ s(x̃) + ε‖².
- ``sphere`` projections are uniform on the sphere of radius √d, as in that reference's sliced score
  matching (so E[vvᵀ] = I, like the Rademacher and Gaussian ones); a unit-vector convention would divide the
  ``ssm`` terms by d.
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from deqsm.registry import Registry

Tensor = torch.Tensor
ScoreFn = Callable[[Tensor], Tensor]
EnergyFn = Callable[[Tensor], Tensor]

NOISE_TYPES = ("rademacher", "gaussian", "sphere")


@dataclass
class LossOutput:
    """A loss value (scalar, batch mean) and its named terms (each a batch-mean scalar)."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        return {"loss": float(self.loss.detach()), **{k: float(v.detach()) for k, v in self.terms.items()}}


@runtime_checkable
class LayeredEnergy(Protocol):
    """An energy built from affine maps and elementwise activations h = σ(u), read out linearly.

    For such a graph the Hessian is ∇²ₓE = Σ_l J_lᵀ diag(∂E/∂h_l ⊙ σ''(u_l)) J_l, with J_l = ∂u_l/∂x
    (all curvature sits in the activations); curvature propagation needs each pre-activation u_l, its
    activation output h_l (as used downstream) and σ''.
    """

    def energy_layers(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Returns (energy of shape (B,), pre-activations [u_l], activation outputs [h_l])."""
        ...

    def activation_second_derivative(self, u: Tensor) -> Tensor: ...


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def _check_input(x: Tensor) -> Tensor:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"score-matching losses need a floating-point tensor batch, got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if torch.is_tensor(x) else ""))
    if x.dim() < 2:
        raise ValueError(f"x must be batched, shape (B, ...), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf values")
    return x.detach().requires_grad_(True)


def _check_score(s: Tensor, x: Tensor) -> Tensor:
    if s.shape != x.shape:
        raise ValueError(f"the score must have the shape of x {tuple(x.shape)}, got {tuple(s.shape)}")
    return s


def energy_score(energy_fn: EnergyFn) -> ScoreFn:
    """s(x) = −∇ₓE(x), with its graph kept so the loss can differentiate it again."""

    def score(x: Tensor) -> Tensor:
        e = energy_fn(x)
        if e.dim() != 1 or e.shape[0] != x.shape[0]:
            raise ValueError(f"energy_fn must return per-sample energies of shape ({x.shape[0]},), got {tuple(e.shape)}")
        return -torch.autograd.grad(e.sum(), x, create_graph=True)[0]

    return score


def sample_projections(like: Tensor, noise: str, generator: torch.Generator | None = None) -> Tensor:
    """Random projection vectors v with E[v vᵀ] = I, shaped like ``like``."""
    if noise == "rademacher":
        return torch.randint(0, 2, like.shape, generator=generator, device=like.device).to(like.dtype) * 2 - 1
    v = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    if noise == "gaussian":
        return v
    if noise == "sphere":
        flat = v.flatten(1)
        return (flat / flat.norm(dim=1, keepdim=True) * math.sqrt(flat.shape[1])).view_as(v)
    raise ValueError(f"unknown projection noise {noise!r}; known: {', '.join(NOISE_TYPES)}")


def _per_sample_sum(t: Tensor) -> Tensor:
    return t.flatten(1).sum(dim=1)


# ---------------------------------------------------------------------------------------------------
# losses on score functions: (score_fn, x) -> LossOutput
# ---------------------------------------------------------------------------------------------------
def hessian_trace(s: Tensor, x: Tensor, batched: bool = True) -> Tensor:
    """tr(∂s/∂x) per sample, by d backward passes (one vmapped call when ``batched``)."""
    d = x[0].numel()
    eye = torch.eye(d, dtype=x.dtype, device=x.device).view(d, 1, *x.shape[1:]).expand(d, *x.shape)
    if batched:
        jac = torch.autograd.grad(s, x, grad_outputs=eye, create_graph=True, is_grads_batched=True)[0]
        # jac[i] = ∂(s · e_i)/∂x, (d, B, ...): the trace picks entry i of row i.
        return (jac.flatten(2) * eye.flatten(2)).sum(dim=(0, 2))
    tr = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(d):
        row = torch.autograd.grad(s, x, grad_outputs=eye[i], create_graph=True)[0]
        tr = tr + row.flatten(1)[:, i]
    return tr


def score_matching(score_fn: ScoreFn, x: Tensor, *, batched: bool | str = "auto") -> LossOutput:
    x = _check_input(x)
    s = _check_score(score_fn(x), x)
    if batched == "auto":
        try:
            tr = hessian_trace(s, x, batched=True)
        except RuntimeError as err:  # some ops / custom Functions cannot run under vmap
            warnings.warn(f"sm: batched Hessian trace unavailable ({str(err).splitlines()[0]}); using a loop", stacklevel=2)
            tr = hessian_trace(s, x, batched=False)
    else:
        tr = hessian_trace(s, x, batched=bool(batched))
    norm = 0.5 * _per_sample_sum(s**2)
    return LossOutput((tr + norm).mean(), {"trace": tr.mean(), "norm": norm.mean()})


def _sliced(score_fn: ScoreFn, x: Tensor, noise: str, n_particles: int, variance_reduced: bool,
            generator: torch.Generator | None) -> LossOutput:
    if n_particles < 1:
        raise ValueError(f"n_particles must be >= 1, got {n_particles}")
    x = _check_input(x)
    xr = x.detach().repeat(n_particles, *([1] * (x.dim() - 1))).requires_grad_(True)
    v = sample_projections(xr, noise, generator)
    s = _check_score(score_fn(xr), xr)
    sv = _per_sample_sum(s * v)
    grad_sv = torch.autograd.grad(sv.sum(), xr, create_graph=True)[0]
    curvature = _per_sample_sum(grad_sv * v)  # vᵀ (∂s/∂x) v
    norm = 0.5 * (_per_sample_sum(s**2) if variance_reduced else sv**2)
    return LossOutput((curvature + norm).mean(), {"curvature": curvature.mean(), "norm": norm.mean()})


def sliced_score_matching(score_fn: ScoreFn, x: Tensor, *, noise: str = "rademacher", n_particles: int = 1,
                          generator: torch.Generator | None = None) -> LossOutput:
    return _sliced(score_fn, x, noise, n_particles, False, generator)


def sliced_score_matching_vr(score_fn: ScoreFn, x: Tensor, *, noise: str = "rademacher", n_particles: int = 1,
                             generator: torch.Generator | None = None) -> LossOutput:
    return _sliced(score_fn, x, noise, n_particles, True, generator)


def denoising_score_matching(score_fn: Callable[..., Tensor], x: Tensor, *, sigma: float | None = 0.1,
                             sigmas: Sequence[float] | None = None, noise_conditional: bool = False,
                             generator: torch.Generator | None = None) -> LossOutput:
    """One σ: E ½‖s(x̃) + ε/σ‖². A ladder ``sigmas``: σ drawn per sample, weighted by σ²: E ½‖σ s(x̃) + ε‖².
    ``noise_conditional`` calls ``score_fn(x̃, σ)`` with σ of shape (B,) (NCSN)."""
    if x.dim() < 2:
        raise ValueError(f"x must be batched, shape (B, ...), got shape {tuple(x.shape)}")
    x = x.detach()
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if sigmas is not None:
        ladder = torch.as_tensor(list(sigmas), dtype=x.dtype, device=x.device)
        if ladder.numel() == 0 or bool((ladder <= 0).any()):
            raise ValueError("dsm sigmas must be a non-empty list of positive numbers")
        idx = torch.randint(0, ladder.numel(), (x.shape[0],), generator=generator, device=x.device)
        sig = ladder[idx]
    else:
        if sigma is None or not sigma > 0:
            raise ValueError(f"dsm sigma must be positive, got {sigma}")
        sig = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
    sig_b = sig.view(-1, *([1] * (x.dim() - 1)))
    x_noisy = _check_input(x + sig_b * eps)
    s = score_fn(x_noisy, sig) if noise_conditional else score_fn(x_noisy)
    s = _check_score(s, x_noisy)
    if sigmas is not None:
        per = 0.5 * _per_sample_sum((sig_b * s + eps) ** 2)  # σ² · ½‖s + ε/σ‖²
    else:
        per = 0.5 * _per_sample_sum((s + eps / sig_b) ** 2)
    return LossOutput(per.mean(), {"dsm": per.mean()})


def curvature_propagation(model: LayeredEnergy, x: Tensor, *, n_particles: int = 1,
                          generator: torch.Generator | None = None) -> LossOutput:
    """SM with tr ∇ₓs = −tr ∇²E estimated by curvature propagation.

    With c_l = ∂E/∂h_l ⊙ σ''(u_l), write ∇²E = Σ_l S_l S_lᵀ, S_l = J_lᵀ diag(√c_l) (complex where c_l < 0).
    For independent z_l with E[z zᵀ] = I, one backward pass gives V = Σ_l S_l z_l and
    E[Re(V ⊙ V)] = diag ∇²E (cross terms vanish). Splitting √c_l z_l into real and imaginary parts,
    V = P + iQ with P, Q two vector-Jacobian products, and Re(V ⊙ V) = P² − Q².
    """
    if not isinstance(model, LayeredEnergy):
        raise TypeError(
            f"cp needs an energy made of affine maps and elementwise activations exposing "
            f"energy_layers(x) and activation_second_derivative(u); {type(model).__name__} does not"
        )
    if n_particles < 1:
        raise ValueError(f"n_particles must be >= 1, got {n_particles}")
    x = _check_input(x)
    energy, pre, post = model.energy_layers(x)
    if energy.dim() != 1 or energy.shape[0] != x.shape[0]:
        raise ValueError(f"energy must have shape ({x.shape[0]},), got {tuple(energy.shape)}")
    grads = torch.autograd.grad(energy.sum(), [x, *post], create_graph=True)
    grad_x, grad_h = grads[0], grads[1:]
    coeffs = [g * model.activation_second_derivative(u) for g, u in zip(grad_h, pre)]
    diag = torch.zeros_like(x)
    for _ in range(n_particles):
        real_parts, imag_parts = [], []
        for c in coeffs:
            z = sample_projections(c, "rademacher", generator)
            root = c.abs().clamp_min(1e-30).sqrt() * z
            real_parts.append(torch.where(c >= 0, root, torch.zeros_like(root)))
            imag_parts.append(torch.where(c < 0, root, torch.zeros_like(root)))
        p = torch.autograd.grad(pre, x, grad_outputs=real_parts, create_graph=True)[0]
        q = torch.autograd.grad(pre, x, grad_outputs=imag_parts, create_graph=True)[0]
        diag = diag + (p**2 - q**2) / n_particles
    trace_est = -_per_sample_sum(diag)  # tr ∇ₓs = −tr ∇²E
    norm = 0.5 * _per_sample_sum(grad_x**2)
    return LossOutput((trace_est + norm).mean(), {"trace": trace_est.mean(), "norm": norm.mean()})


# ---------------------------------------------------------------------------------------------------
# registry and factories
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossSpec:
    fn: Callable[..., LossOutput]
    on_score: bool  # False: the loss needs the energy model itself (cp)


LOSSES: Registry[LossSpec] = Registry("loss")
LOSSES.register("sm")(LossSpec(score_matching, True))
LOSSES.register("ssm")(LossSpec(sliced_score_matching, True))
LOSSES.register("ssm_vr")(LossSpec(sliced_score_matching_vr, True))
LOSSES.register("dsm")(LossSpec(denoising_score_matching, True))
LOSSES.register("cp")(LossSpec(curvature_propagation, False))


def _bind(name: str, options: dict) -> tuple[LossSpec, dict]:
    spec = LOSSES.get(name)
    allowed = [p.name for p in inspect.signature(spec.fn).parameters.values() if p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for loss {name!r}; its options: {allowed}")
    if "noise" in options and options["noise"] not in NOISE_TYPES:
        raise ValueError(f"unknown projection noise {options['noise']!r}; known: {', '.join(NOISE_TYPES)}")
    return spec, options


def get_loss(name: str, **options) -> Callable[[EnergyFn, Tensor], LossOutput]:
    """``loss_fn(energy_fn, x)`` for an energy model; ``energy_fn(x)`` returns energies of shape (B,)."""
    spec, options = _bind(name, options)

    def loss_fn(energy_fn: EnergyFn, x: Tensor) -> LossOutput:
        if not spec.on_score:
            return spec.fn(energy_fn, x, **options)
        return spec.fn(energy_score(energy_fn), x, **options)

    loss_fn.__name__ = f"{name}_loss"
    return loss_fn


def get_score_loss(name: str, **options) -> Callable[[ScoreFn, Tensor], LossOutput]:
    """``loss_fn(score_fn, x)`` for a network that outputs the score s(x) directly."""
    spec, options = _bind(name, options)
    if not spec.on_score:
        raise ValueError(f"loss {name!r} needs an energy model; score-network losses: "
                         f"{', '.join(n for n in LOSSES if LOSSES.get(n).on_score)}")

    def loss_fn(score_fn: ScoreFn, x: Tensor) -> LossOutput:
        return spec.fn(score_fn, x, **options)

    loss_fn.__name__ = f"{name}_score_loss"
    return loss_fn
