"""Deep kernel exponential family (DKEF; the paper's section 4.2, after Wenliang et al. 2019):

    log p̃(x) = log q0(x) + Σ_m α_m k(x, z_m),   k(x, z) = Σ_r π_r exp(−‖φ(x) − φ(z)‖² / (2 s_r)),

q0 = N(0, σ0² I) with learned σ0, π = softmax of learned logits, learned bandwidths s_r, learned inducing
points z_m, and a feature net φ that is ``explicit`` (depth L) or ``deq`` (one Softplus DEQ layer). The
energy is E = −log p̃; with α = 0 the model is q0 itself, so log Z stays near 0.

α is not a parameter: the score s = ∇log q0 + Σ_m α_m ∇ₓk(·, z_m) is affine in α, so every
score-matching loss restricted to α is a quadratic L(α) = c + bᵀα + ½ αᵀGα. Per training batch the first
half gives (G, b), α = −(G + λI)⁻¹ b (λ = 10^log10_lambda, learned), and the loss is evaluated on the
second half with that α; gradients flow through the solve into φ, z, s, π, σ0 and λ (the base code's
scheme; the split keeps λ from collapsing to 0). :meth:`DKEF.fit_alpha` solves the same system on a whole
data set (the finalise step); the fitted α is a buffer, so it is saved with the weights.

(G, b) per loss, with D_m = ∇ₓk(x, z_m), s0 = ∇log q0 (batch means):
  sm      G = E[D Dᵀ],           b = E[Δₓk + D s0]
  ssm     G = E[(Dv)(Dv)ᵀ],      b = E[vᵀ∇²ₓk v + (Dv)(s0·v)]
  ssm_vr  G = E[D Dᵀ],           b = E[vᵀ∇²ₓk v + D s0]
  dsm     G = E[c² D Dᵀ],        b = E[c D t]  at x̃ = x + σε; one σ: c = 1, t = s0 + ε/σ; a ladder: c = σ, t = σ s0 + ε
  cp      curvature propagation takes square roots of layer curvatures, so its estimate is not quadratic
          in α draw by draw: α is solved from the ssm_vr system (an unbiased estimate of the same
          score-matching objective, Rademacher v), and the loss is CP's estimate at that α.
The derivatives of k for all (x_b, z_m) pairs come from one backward pass over B·M copies of the rows
(each copy paired with one inducing point), the sm Laplacian from d more (batched when possible).

For curvature propagation the energy is a stack of affine maps and elementwise activations: a square for
q0, Softplus in φ, a square of φ (‖φ(x) − φ(z)‖² = Σφ² − 2φ·φ(z) + ‖φ(z)‖²) and exp for the kernels.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import nn

from deqsm.config import DEQSettings
from deqsm.losses import LossOutput, get_loss, hessian_trace, sample_projections
from deqsm.models.blocks import LayerTape, make_net, no_layers_recorded
from deqsm.models.density import DensityEvalOptions, evaluate_density
from deqsm.models.family import ModelFamily
from deqsm.registry import Registry

Tensor = torch.Tensor
AlphaSystem = Callable[..., tuple[Tensor, Tensor]]

ALPHA_SYSTEMS: Registry[AlphaSystem] = Registry("DKEF alpha system (loss)")


class DKEF(nn.Module):
    """See the module docstring. ``features`` maps (N, dim) → (N, F); ``inducing`` is (M, dim)."""

    def __init__(self, dim: int, features: nn.Module, inducing: Tensor, *, n_kernels: int = 3,
                 q0_scale: float = 2.0, learn_q0_scale: bool = True, log10_lambda: float = -2.0,
                 alpha_eval_rows: int = 1000, alpha_batch_size: int = 256) -> None:
        super().__init__()
        if n_kernels < 1:
            raise ValueError(f"n_kernels must be >= 1, got {n_kernels}")
        if inducing.dim() != 2 or inducing.shape[1] != dim or inducing.shape[0] < 1:
            raise ValueError(f"inducing points must have shape (M >= 1, {dim}), got {tuple(inducing.shape)}")
        if not q0_scale > 0:
            raise ValueError(f"q0_scale must be positive, got {q0_scale}")
        self.dim = dim
        self.features = features
        self.z = nn.Parameter(inducing.detach().clone())
        # Bandwidths spread over a decade (the base code's log10 inits 0, 0.52, 1); set_bandwidths rescales.
        self.log_bandwidth = nn.Parameter(torch.linspace(0.0, 1.0, n_kernels) * math.log(10.0))
        self.kernel_logits = nn.Parameter(torch.zeros(n_kernels))
        self.log_q0_scale = nn.Parameter(torch.tensor(math.log(q0_scale)), requires_grad=learn_q0_scale)
        self.log10_lambda = nn.Parameter(torch.tensor(float(log10_lambda)))
        self.register_buffer("alpha", torch.zeros(inducing.shape[0]))
        self.alpha_eval_rows = alpha_eval_rows
        self.alpha_batch_size = alpha_batch_size

    @property
    def n_inducing(self) -> int:
        return self.z.shape[0]

    # -- the density ------------------------------------------------------------------------------
    def kernel(self, sqdist: Tensor) -> Tensor:
        """The mixture Σ_r π_r exp(−d² / (2 s_r)) of squared feature distances, elementwise."""
        weights = torch.softmax(self.kernel_logits, 0)
        return (weights * torch.exp(-sqdist.unsqueeze(-1) / (2 * self.log_bandwidth.exp()))).sum(-1)

    def gram(self, x: Tensor) -> Tensor:
        """k(x_b, z_m), shape (B, M); one feature pass over the rows and the inducing points together."""
        xf = x.flatten(1)
        phi = self.features(torch.cat([xf, self.z]))
        phi_x, phi_z = phi[:xf.shape[0]], phi[xf.shape[0]:]
        return self.kernel((phi_x[:, None, :] - phi_z[None]).pow(2).sum(-1))

    def log_q0(self, x: Tensor) -> Tensor:
        xf = x.flatten(1)
        scale = self.log_q0_scale.exp()
        return (-0.5 * (xf / scale).pow(2).sum(1) - xf.shape[1] * self.log_q0_scale
                - 0.5 * xf.shape[1] * math.log(2 * math.pi))

    def q0_score(self, x: Tensor) -> Tensor:
        return -x / self.log_q0_scale.exp().pow(2)

    def log_unnormalised(self, x: Tensor, alpha: Tensor | None = None) -> Tensor:
        alpha = self.alpha if alpha is None else alpha
        return self.log_q0(x) + self.gram(x) @ alpha

    def energy(self, x: Tensor, alpha: Tensor | None = None) -> Tensor:
        return -self.log_unnormalised(x, alpha)

    def forward(self, x: Tensor) -> Tensor:
        """The energy with the fitted α (the buffer)."""
        return self.energy(x)

    # -- layer structure for curvature propagation (deqsm.losses.LayeredEnergy) ----------------------
    def energy_layers(self, x: Tensor, alpha: Tensor | None = None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        alpha = self.alpha if alpha is None else alpha
        tape = LayerTape()
        self._second_derivative = tape.second_derivative
        xf = x.flatten(1)
        h0 = tape(xf / self.log_q0_scale.exp(), "square")
        phi_x = self.features(xf, tape)
        phi_z = self.features(self.z)  # constant in x: no layers to record
        sq = tape(phi_x, "square")
        sqdist = sq.sum(1, keepdim=True) - 2 * phi_x @ phi_z.t() + phi_z.pow(2).sum(1)[None]
        h_k = tape(-sqdist.unsqueeze(-1) / (2 * self.log_bandwidth.exp()), "exp")  # (B, M, R)
        gram = (h_k * torch.softmax(self.kernel_logits, 0)).sum(-1)
        log_p = (-0.5 * h0.sum(1) - xf.shape[1] * self.log_q0_scale - 0.5 * xf.shape[1] * math.log(2 * math.pi)
                 + gram @ alpha)
        return -log_p, tape.pre, tape.post

    def activation_second_derivative(self, u: Tensor) -> Tensor:
        return getattr(self, "_second_derivative", no_layers_recorded)(u)

    def with_alpha(self, alpha: Tensor) -> "DKEFWithAlpha":
        return DKEFWithAlpha(self, alpha)

    # -- α in closed form --------------------------------------------------------------------------
    def kernel_derivatives(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """For each row x_b and inducing point z_m: a copy xe of x_b (row b·M + m, a leaf) and
        D = ∇ₓ k(x_b, z_m) at it, shape (B·M, d), with its graph (for second derivatives and θ)."""
        m = self.n_inducing
        xe = x.detach().repeat_interleave(m, 0).requires_grad_(True)
        phi = self.features(torch.cat([xe, self.z]))
        phi_x, phi_z = phi[:xe.shape[0]], phi[xe.shape[0]:]
        k = self.kernel((phi_x - phi_z.repeat(x.shape[0], 1)).pow(2).sum(1))
        return xe, torch.autograd.grad(k.sum(), xe, create_graph=True)[0]

    def alpha_system(self, x: Tensor, loss: str, options: dict | None = None) -> tuple[Tensor, Tensor]:
        """(G, b) of ``loss`` (with its options) restricted to α, batch means over the rows of ``x``."""
        with torch.enable_grad():
            return ALPHA_SYSTEMS.get(loss)(self, x.flatten(1), **(options or {}))

    def solve_alpha(self, G: Tensor, b: Tensor) -> Tensor:
        """argmin ½αᵀGα + bᵀα + λ/2‖α‖² = −(G + λI)⁻¹ b (in float64: G can be badly conditioned)."""
        lam = torch.pow(10.0, self.log10_lambda.double())
        eye = torch.eye(G.shape[0], dtype=torch.float64, device=G.device)
        return torch.linalg.solve(G.double() + lam * eye, -b.double()).to(G.dtype)

    def alpha_moments(self, data: Tensor, loss: str, options: dict | None = None,
                      batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """(G, b) of ``loss`` on all of ``data`` (float64, accumulated over batches, no graph)."""
        if data.shape[0] == 0:
            raise ValueError("cannot fit DKEF alpha on an empty data set")
        bs = batch_size or self.alpha_batch_size
        G_sum = torch.zeros(self.n_inducing, self.n_inducing, dtype=torch.float64, device=self.z.device)
        b_sum = torch.zeros(self.n_inducing, dtype=torch.float64, device=self.z.device)
        for chunk in data.to(self.z.device).split(bs):
            G, b = self.alpha_system(chunk, loss, options)
            G_sum += G.detach().double() * chunk.shape[0]
            b_sum += b.detach().double() * chunk.shape[0]
        return G_sum / data.shape[0], b_sum / data.shape[0]

    def fit_alpha(self, data: Tensor, loss: str, options: dict | None = None, batch_size: int | None = None) -> Tensor:
        """Solve α on all of ``data`` (G and b accumulated over batches) and store it: the finalise step."""
        G, b = self.alpha_moments(data, loss, options, batch_size)
        with torch.no_grad():
            self.alpha.copy_(self.solve_alpha(G, b).to(self.alpha.dtype))
        return self.alpha

    @torch.no_grad()
    def select_lambda(self, train: Tensor, val: Tensor, loss: str, options: dict | None = None,
                      grid: Tensor | None = None) -> dict[str, float]:
        """The ridge λ fitted on validation rows (the reference DKEF's finalise step): of the trained λ and ``grid``
        (log10 λ; default −8…2 by 0.25), the one whose α(λ) = −(G + λI)⁻¹ b (training rows) minimises the loss on
        the validation rows, b_valᵀα + ½ αᵀ G_val α up to a constant. Sets it; returns both λ and objectives."""
        (G, b), (G_val, b_val) = self.alpha_moments(train, loss, options), self.alpha_moments(val, loss, options)
        evals, vecs = torch.linalg.eigh(0.5 * (G + G.T))
        trained = float(self.log10_lambda.detach())
        candidates = [trained, *(torch.arange(-8.0, 2.001, 0.25) if grid is None else grid).tolist()]
        alphas = [-vecs @ ((vecs.T @ b) / (evals + 10.0 ** c)) for c in candidates]
        scores = [float(b_val @ a + 0.5 * a @ G_val @ a) for a in alphas]
        best = min(range(len(candidates)), key=scores.__getitem__)
        self.log10_lambda.fill_(candidates[best])
        return {"log10_lambda_trained": trained, "log10_lambda": candidates[best],
                "lambda_val_objective_trained": scores[0], "lambda_val_objective": scores[best]}

    @torch.no_grad()
    def set_bandwidths(self, x: Tensor, spread: float = 10.0) -> None:
        """Centre the bandwidths on the median squared feature distance between ``x`` and z (a data-driven
        start; the values are learned afterwards), spread over a factor ``spread``."""
        xf = x.flatten(1)[:256].to(self.z.device)
        phi = self.features(torch.cat([xf, self.z]))
        sq = (phi[:xf.shape[0], None] - phi[None, xf.shape[0]:]).pow(2).sum(-1)
        med = float(sq.median().clamp_min(1e-6))
        r = self.log_bandwidth.numel()
        offsets = torch.linspace(-0.5, 0.5, r) if r > 1 else torch.zeros(1)
        self.log_bandwidth.copy_(math.log(med) + offsets * math.log(spread))


class DKEFWithAlpha:
    """A DKEF with a given α (e.g. a batch's solve, with its graph), as an energy and a LayeredEnergy."""

    def __init__(self, model: DKEF, alpha: Tensor) -> None:
        self.model, self.alpha = model, alpha

    def __call__(self, x: Tensor) -> Tensor:
        return self.model.energy(x, self.alpha)

    def energy_layers(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        return self.model.energy_layers(x, self.alpha)

    def activation_second_derivative(self, u: Tensor) -> Tensor:
        return self.model.activation_second_derivative(u)


# ---------------------------------------------------------------------------------------------------
# (G, b) per loss; keyword options mirror the loss's own (deqsm.losses) so one options dict serves both
# ---------------------------------------------------------------------------------------------------
def _gram_mean(a: Tensor, weights: Tensor | None = None) -> Tensor:
    """E_b[A_b A_bᵀ] for A of shape (B, M, k) (optionally weighted per row)."""
    w = a if weights is None else a * weights.view(-1, 1, 1)
    return torch.einsum("bmk,bnk->mn", w, a) / a.shape[0]


def _laplacian(D: Tensor, xe: Tensor, batched: bool | str) -> Tensor:
    if batched == "auto":
        try:
            return hessian_trace(D, xe, batched=True)
        except RuntimeError as err:  # custom autograd Functions (implicit DEQ) may not run under vmap
            warnings.warn(f"dkef sm: batched Laplacian unavailable ({str(err).splitlines()[0]}); using a loop",
                          stacklevel=3)
            return hessian_trace(D, xe, batched=False)
    return hessian_trace(D, xe, batched=bool(batched))


@ALPHA_SYSTEMS.register("sm")
def sm_system(model: DKEF, x: Tensor, *, batched: bool | str = "auto") -> tuple[Tensor, Tensor]:
    B, d, M = x.shape[0], x.shape[1], model.n_inducing
    xe, D = model.kernel_derivatives(x)
    lap = _laplacian(D, xe, batched).view(B, M)
    A = D.view(B, M, d)
    b = (lap + torch.einsum("bmd,bd->bm", A, model.q0_score(x))).mean(0)
    return _gram_mean(A), b


def _sliced_system(model: DKEF, x: Tensor, noise: str, n_particles: int, variance_reduced: bool,
                   generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    if n_particles < 1:
        raise ValueError(f"n_particles must be >= 1, got {n_particles}")
    M = model.n_inducing
    xr = x.detach().repeat(n_particles, 1)
    v = sample_projections(xr, noise, generator)  # drawn as deqsm.losses draws them
    B, d = xr.shape
    xe, D = model.kernel_derivatives(xr)
    ve = v.repeat_interleave(M, 0)
    Dv = (D * ve).sum(1)
    vHv = (torch.autograd.grad(Dv.sum(), xe, create_graph=True)[0] * ve).sum(1).view(B, M)
    s0 = model.q0_score(xr)
    if variance_reduced:
        A = D.view(B, M, d)
        return _gram_mean(A), (vHv + torch.einsum("bmd,bd->bm", A, s0)).mean(0)
    Dv = Dv.view(B, M, 1)
    return _gram_mean(Dv), (vHv + Dv[..., 0] * (s0 * v).sum(1, keepdim=True)).mean(0)


@ALPHA_SYSTEMS.register("ssm")
def ssm_system(model: DKEF, x: Tensor, *, noise: str = "rademacher", n_particles: int = 1,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    return _sliced_system(model, x, noise, n_particles, False, generator)


@ALPHA_SYSTEMS.register("ssm_vr")
def ssm_vr_system(model: DKEF, x: Tensor, *, noise: str = "rademacher", n_particles: int = 1,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    return _sliced_system(model, x, noise, n_particles, True, generator)


@ALPHA_SYSTEMS.register("cp")
def cp_system(model: DKEF, x: Tensor, *, n_particles: int = 1,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    return _sliced_system(model, x, "rademacher", n_particles, True, generator)


@ALPHA_SYSTEMS.register("dsm")
def dsm_system(model: DKEF, x: Tensor, *, sigma: float | None = 0.1, sigmas: list[float] | None = None,
               noise_conditional: bool = False, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    if noise_conditional:
        raise ValueError("dsm noise_conditional needs a noise-conditional score network; a DKEF is not one")
    x = x.detach()
    B, d, M = x.shape[0], x.shape[1], model.n_inducing
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # same order as the loss
    if sigmas is not None:
        ladder = torch.as_tensor(list(sigmas), dtype=x.dtype, device=x.device)
        if ladder.numel() == 0 or bool((ladder <= 0).any()):
            raise ValueError("dsm sigmas must be a non-empty list of positive numbers")
        sig = ladder[torch.randint(0, ladder.numel(), (B,), generator=generator, device=x.device)]
    else:
        if sigma is None or not sigma > 0:
            raise ValueError(f"dsm sigma must be positive, got {sigma}")
        sig = torch.full((B,), float(sigma), dtype=x.dtype, device=x.device)
    x_noisy = x + sig[:, None] * eps
    _, D = model.kernel_derivatives(x_noisy)
    A = D.view(B, M, d)
    s0 = model.q0_score(x_noisy)
    if sigmas is not None:  # ½‖σ s + ε‖²
        c, target = sig, sig[:, None] * s0 + eps
    else:  # ½‖s + ε/σ‖²
        c, target = torch.ones_like(sig), s0 + eps / sig[:, None]
    return _gram_mean(A, c**2), (c[:, None] * torch.einsum("bmd,bd->bm", A, target)).mean(0)


# ---------------------------------------------------------------------------------------------------
# training objective and builder
# ---------------------------------------------------------------------------------------------------
class DKEFObjective:
    """``objective(model, batch)`` for :func:`deqsm.train.fit`.

    Training: α from the batch's first half (with its graph), the loss on the second half. Evaluation
    (``model.eval()``): α refitted on up to ``model.alpha_eval_rows`` training rows whenever the weights
    changed since the last refit (stored in the buffer), then the loss with it — a validation loss of
    the model as it would be finalised.
    """

    def __init__(self, loss: str, options: dict, train: Tensor) -> None:
        if loss not in ALPHA_SYSTEMS:
            raise ValueError(f"DKEF cannot be trained by {loss!r}: it needs a score-matching loss "
                             f"({', '.join(ALPHA_SYSTEMS.names())}); maximum likelihood needs log Z")
        self.loss, self.options = loss, dict(options)
        self.loss_fn = get_loss(loss, **options)
        # A fixed random order, so the validation-time α sees a representative subset of the rows.
        self.train = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))]
        self._fitted_for: tuple | None = None

    def refresh_alpha(self, model: DKEF) -> None:
        key = (id(model), tuple((id(p), p._version) for p in model.parameters()))
        if key != self._fitted_for:
            rows = self.train[:model.alpha_eval_rows]
            model.fit_alpha(rows, self.loss, self.options)
            self._fitted_for = key

    def __call__(self, model: DKEF, batch: Tensor) -> LossOutput:
        if not model.training:
            self.refresh_alpha(model)
            return self.loss_fn(model, batch)
        if batch.shape[0] < 2:
            raise ValueError("DKEF training batches need >= 2 rows: half fits alpha, half evaluates the loss")
        half = batch.shape[0] // 2
        alpha = model.solve_alpha(*model.alpha_system(batch[:half], self.loss, self.options))
        out = self.loss_fn(model.with_alpha(alpha), batch[half:])
        out.terms["log10_lambda"] = model.log10_lambda.detach()
        return out


def build_dkef(dim: int, *, variant: str, width: int, depth: int, deq: DEQSettings, train: Tensor,
               n_kernels: int = 3, n_inducing: int = 50, feature_dim: int | None = None, q0_scale: float = 2.0,
               learn_q0_scale: bool = True, log10_lambda: float = -2.0, alpha_eval_rows: int = 1000,
               alpha_batch_size: int = 256, lambda_on_validation: bool = False) -> DKEF:
    """A DKEF: inducing points at random training rows (global RNG: seed first), bandwidths at the median feature
    distance; ``lambda_on_validation``: finalise fits λ on the validation rows (:meth:`DKEF.select_lambda`)."""
    rows = train.flatten(1)
    if n_inducing < 1 or rows.shape[0] == 0:
        raise ValueError(f"n_inducing must be >= 1 (got {n_inducing}) and DKEF needs training rows to place them")
    idx = (torch.randperm(rows.shape[0])[:n_inducing] if rows.shape[0] >= n_inducing
           else torch.randint(0, rows.shape[0], (n_inducing,)))
    features = make_net(variant, dim, width, feature_dim or width, depth=depth, deq=deq)
    model = DKEF(dim, features, rows[idx].to(torch.get_default_dtype()), n_kernels=n_kernels, q0_scale=q0_scale,
                 learn_q0_scale=learn_q0_scale, log10_lambda=log10_lambda, alpha_eval_rows=alpha_eval_rows,
                 alpha_batch_size=alpha_batch_size)
    model.set_bandwidths(rows)
    model.lambda_on_validation = lambda_on_validation
    return model


def dkef_objective(loss: str, options: dict, train: Tensor) -> DKEFObjective:
    return DKEFObjective(loss, options, train)


def finalize_dkef(model: DKEF, loss: str, options: dict, train: Tensor, val: Tensor | None = None) -> dict[str, float]:
    """λ fitted on ``val`` if the model says so (:meth:`DKEF.select_lambda`: its findings returned), α on ``train``."""
    was_training, fit_lambda = model.training, getattr(model, "lambda_on_validation", False)
    model.eval()
    info = model.select_lambda(train, val, loss, options) if fit_lambda and val is not None and len(val) else {}
    model.fit_alpha(train, loss, options)
    model.train(was_training)
    return info


FAMILY = ModelFamily("dkef", build=build_dkef, objective=dkef_objective, evaluate=evaluate_density,
                     eval_options=DensityEvalOptions, finalize=finalize_dkef, loss_on_data=True)
