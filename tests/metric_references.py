"""Independent references for the metric tests: each figure computed here from its definition, by a route that
shares no code with deqsm.metrics (closed forms, grid quadrature in one or two dimensions, plain Monte Carlo)."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

LOG_2PI = math.log(2 * math.pi)


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, L Lᵀ) per row, written out: −½ |L⁻¹(x − μ)|² − Σ log L_ii − (d/2) log 2π (float64)."""
    x, mean, scale_tril = x.double(), mean.double(), scale_tril.double()
    white = torch.linalg.solve_triangular(scale_tril, (x - mean).T, upper=False)
    return (-0.5 * white.pow(2).sum(0) - scale_tril.diagonal().log().sum() - 0.5 * x.shape[1] * LOG_2PI)


def gaussian_score(x: torch.Tensor, mean: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    """∇ₓ log N(x; mean, L Lᵀ) = −(L Lᵀ)⁻¹ (x − μ), per row (float64)."""
    cov = scale_tril.double() @ scale_tril.double().T
    return -torch.linalg.solve(cov, (x.double() - mean.double()).T).T


def square_grid(lim: float, step: float, dim: int = 2) -> torch.Tensor:
    """The nodes of a grid on [−lim, lim]^dim with spacing ``step``, as rows (G, dim), float64."""
    g = torch.arange(-lim, lim + step / 2, step, dtype=torch.float64)
    return torch.stack(torch.meshgrid(*([g] * dim), indexing="ij"), -1).reshape(-1, dim)


def grid_log_integral(log_f, lim: float, step: float, dim: int = 2, batch: int = 20_000) -> float:
    """log ∫ exp(log_f(x)) dx over [−lim, lim]^dim by the rectangle rule (spectrally accurate for a smooth,
    decaying integrand), in log space; ``log_f`` maps rows (B, dim) of the default dtype to (B,)."""
    nodes = square_grid(lim, step, dim).to(torch.get_default_dtype())
    with torch.no_grad():
        values = torch.cat([log_f(b).double() for b in nodes.split(batch)])
    return float(torch.logsumexp(values, 0)) + dim * math.log(step)


# ---------------------------------------------------------------------------------------------------
# the VAE with a two-dimensional latent: exact log p(x) and posterior moments by quadrature over z
# ---------------------------------------------------------------------------------------------------
def bernoulli_log_likelihood(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Σ_j x_j log σ(l_j) + (1 − x_j) log(1 − σ(l_j)) over the last dimension, in float64."""
    logits = logits.double()
    x = x.double()
    return (x * -F.softplus(-logits) + (1 - x) * -F.softplus(logits)).sum(-1)


def latent_quadrature(decoder_logits, x: torch.Tensor, lim: float = 8.0, step: float = 0.1):
    """For a decoder with a 2-D latent and prior N(0, I): per row of x (N, D) the exact log p(x) =
    log ∫ p(x|z) p(z) dz and the posterior's mean (N, 2) and covariance (N, 2, 2), by the rectangle rule."""
    z = square_grid(lim, step)
    with torch.no_grad():
        logits = decoder_logits(z.float()).double()  # (G, D)
    log_joint = (x.double() @ -F.softplus(-logits).T + (1 - x.double()) @ -F.softplus(logits).T
                 - 0.5 * (z.pow(2).sum(1) + 2 * LOG_2PI))  # (N, G)
    log_px = torch.logsumexp(log_joint, 1) + 2 * math.log(step)
    post = torch.softmax(log_joint, 1)
    mean = post @ z
    centred = z.unsqueeze(0) - mean.unsqueeze(1)  # (N, G, 2)
    cov = torch.einsum("ng,ngi,ngj->nij", post, centred, centred)
    return log_px, mean, cov


class LinearEncoderNet(nn.Module):
    """z = A x + b + L ε on the encoder's input [x, ε]: a Gaussian q(z|x) = N(Ax + b, L Lᵀ) whose moments are known,
    to stand in for the implicit encoder's network."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale_tril: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a.float())
        self.register_buffer("b", b.float())
        self.register_buffer("scale_tril", scale_tril.float())

    def forward(self, x_eps: torch.Tensor) -> torch.Tensor:
        x, eps = x_eps[:, :self.a.shape[1]], x_eps[:, self.a.shape[1]:]
        return x @ self.a.T + self.b + eps @ self.scale_tril.T


def posterior_matched_encoder(x: torch.Tensor, post_mean: torch.Tensor, post_cov: torch.Tensor) -> LinearEncoderNet:
    """A :class:`LinearEncoderNet` whose mean is the posterior mean at every row of x (a minimum-norm exact fit:
    fewer rows than pixels) and whose covariance is the rows' mean posterior covariance."""
    xd = x.double().flatten(1)
    a = torch.linalg.lstsq(torch.cat([xd, torch.ones(xd.shape[0], 1, dtype=xd.dtype)], 1), post_mean.double(),
                           driver="gelsd").solution  # (D + 1, 2)
    return LinearEncoderNet(a[:-1].T, a[-1], torch.linalg.cholesky(post_cov.double().mean(0)))


def gaussian_entropy(scale_tril: torch.Tensor) -> float:
    """H[N(μ, L Lᵀ)] = (d/2) log(2πe) + Σ log L_ii."""
    d = scale_tril.shape[0]
    return 0.5 * d * (LOG_2PI + 1) + float(scale_tril.double().diagonal().log().sum())
