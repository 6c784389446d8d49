"""A VAE with an implicit encoder whose entropy gradient comes from a learned score (the paper's §4.1,
after Song et al. 2020, "Sliced score matching", §5.2), and its model family (``model: vae``).

- Encoder q_φ(z|x), implicit: z = g_φ([x, ε]), ε ~ N(0, I); samples are cheap, the density is unknown.
- Decoder p_θ(x|z): independent Bernoulli pixels (binarised images), logits from an MLP; prior N(0, I).
- Score network s_ψ(x, z) ≈ ∇_z log q_φ(z|x), trained by a score-matching loss (``sm`` / ``ssm`` /
  ``ssm_vr``) in z on the encoder's samples.

The VAE maximises ELBO(x) = E_q[log p_θ(x|z) + log p(z)] + H[q_φ(·|x)]. With the reparameterisation
z = g_φ(x, ε), ∇_φ H = −E_ε[(∇_z log q_φ(z|x))ᵀ ∂z/∂φ] (the term E_q[∇_φ log q_φ] is zero), so the
entropy's gradient is that of the surrogate −sg[s_ψ(x, z)]ᵀ z (sg: stop-gradient).

Training (:func:`vae_objective`, run by :func:`deqsm.train.fit` like every model): one step minimises
score_loss + vae_loss with one optimiser. Their stop-gradients keep them apart: the score network's loss
sees the encoder's samples without gradient, and the VAE's surrogate sees s(x, z) without gradient, so each
parameter gets only its own loss's gradient. In evaluation mode the objective's loss is −(importance-weighted
bound on log p(x)) with a proposal fitted to a few encoder samples per x (``val_elbo_samples``), so validation,
early stopping and tuning watch a valid lower bound; the KDE ELBO, which is not one, is logged beside it.

The experiment's variant is the score network (:class:`LatentScoreNet`): ``explicit`` with ``depth`` hidden
layers (2: the paper's score net; 8 / 16: its Aug-8 / Aug-16) or ``deq``; ``width`` is its width and
``model_options`` size the encoder and decoder. Evaluation (:func:`evaluate_vae`): the headline
``test_iw_loglik``, an importance-weighted lower bound on the test log-likelihood with a proposal fitted per x
to the implicit encoder's samples (:func:`deqsm.metrics.elbo.estimate_elbo`), with its Monte-Carlo and
over-rows standard errors; the KDE ELBO ``test_elbo`` (biased upwards, not a bound) as a diagnostic; the
memory of one score-network step (the paper's Table 1); and samples.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from deqsm.config import DEQSettings
from deqsm.losses import LossOutput, get_score_loss
from deqsm.metrics.elbo import DEFENSIVE_SCALE, DEFENSIVE_WEIGHT, estimate_elbo
from deqsm.metrics.memory import measure_step
from deqsm.models.blocks import count_parameters, make_net
from deqsm.models.family import EvalOptions, Headline, ModelFamily

Tensor = torch.Tensor
LOG_2PI = math.log(2 * math.pi)


def mlp(in_dim: int, width: int, out_dim: int, depth: int) -> nn.Sequential:
    """``depth`` hidden Softplus layers of ``width``, then a linear read-out; He (fan-in) initialisation.

    PyTorch's default Linear initialisation shrinks the signal about threefold per layer: the implicit
    encoder then starts with z nearly independent of x and ε (std ~0.01), and in short runs the VAE sat in
    posterior collapse. With He initialisation z carries both from the first step."""
    if depth < 1 or width < 1:
        raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
    dims = [in_dim] + [width] * depth + [out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        lin = nn.Linear(a, b)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu" if i < depth else "linear")
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.Softplus()] if i < depth else [lin]
    return nn.Sequential(*layers)


class ImplicitEncoder(nn.Module):
    """z = g_φ([x, ε]) with ε ~ N(0, I_eps_dim): a sampler of q_φ(z|x) without a density.

    ``eps_dim`` must be at least ``z_dim`` for q to have a density on the latent space (the KDE
    evaluation assumes one)."""

    def __init__(self, x_dim: int, z_dim: int, *, eps_dim: int | None = None, width: int = 256, depth: int = 2) -> None:
        super().__init__()
        self.x_dim, self.z_dim = x_dim, z_dim
        self.eps_dim = z_dim if eps_dim is None else eps_dim
        if self.eps_dim < z_dim:
            raise ValueError(f"eps_dim ({self.eps_dim}) must be >= z_dim ({z_dim}) for q(z|x) to have a density")
        self.net = mlp(x_dim + self.eps_dim, width, z_dim, depth)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One sample z per row of x: (B, x_dim) → (B, z_dim)."""
        x = x.flatten(1)
        if x.shape[1] != self.x_dim:
            raise ValueError(f"encoder expects {self.x_dim} input features, got {x.shape[1]}")
        eps = torch.randn(x.shape[0], self.eps_dim, generator=generator, dtype=x.dtype,
                          device=generator.device if generator is not None else x.device).to(x.device)
        return self.net(torch.cat([x, eps], dim=1))

    def sample(self, x: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples per row: (B, x_dim) → (B, n, z_dim)."""
        if n < 1:
            raise ValueError(f"number of samples must be >= 1, got {n}")
        x = x.flatten(1)
        rep = x.unsqueeze(1).expand(x.shape[0], n, x.shape[1]).reshape(-1, x.shape[1])
        return self(rep, generator).view(x.shape[0], n, self.z_dim)


class BernoulliDecoder(nn.Module):
    """p_θ(x|z) = Π_j Bernoulli(x_j; sigmoid(logits_j(z)))."""

    def __init__(self, z_dim: int, x_dim: int, *, width: int = 256, depth: int = 2) -> None:
        super().__init__()
        self.z_dim, self.x_dim = z_dim, x_dim
        self.net = mlp(z_dim, width, x_dim, depth)

    def logits(self, z: Tensor) -> Tensor:
        return self.net(z)

    def log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x|z) for x (B, x_dim) and z (B, z_dim) → (B,), or z (B, n, z_dim) → (B, n)."""
        x = x.flatten(1)
        logits = self.logits(z)
        if z.dim() == 3:
            x = x.unsqueeze(1).expand_as(logits)
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I), summed over the last dimension."""
    return -0.5 * (z.pow(2).sum(-1) + z.shape[-1] * LOG_2PI)


# ---------------------------------------------------------------------------------------------------
# Score networks s(x, z) ≈ ∇_z log q(z|x)
# ---------------------------------------------------------------------------------------------------
class LatentScoreNet(nn.Module):
    """s_ψ(x, z): an MLP on [x, z] with a ``z_dim`` output, of the network ``variant``
    (:data:`deqsm.models.blocks.VARIANTS`): ``explicit`` with ``depth`` hidden layers (the paper's score net
    has 2, its Aug-8 / Aug-16 baselines 8 / 16) or ``deq`` (one weight-tied layer; ``depth`` ignored)."""

    def __init__(self, x_dim: int, z_dim: int, *, variant: str = "deq", width: int = 256,
                 deq: DEQSettings | None = None, depth: int = 2) -> None:
        super().__init__()
        self.variant = variant
        self.x_dim, self.z_dim = x_dim, z_dim
        self.net = make_net(variant, x_dim + z_dim, width, z_dim, depth=depth, deq=deq or DEQSettings())
        # He (fan-in) initialisation of every Linear, as in the encoder / decoder: with PyTorch's default,
        # a 16-layer Softplus stack starts with a constant output and zero input-Jacobian, where the SSM
        # gradient vanishes and aug16 never learns. (The DEQ's weight-tied matrix is normalised, so its
        # scale does not matter.)
        for module in self.net.modules():
            if isinstance(module, nn.Linear):
                gain = "linear" if module is getattr(self.net, "readout", None) else "relu"
                nn.init.kaiming_normal_(module.weight, nonlinearity=gain)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        x = x.flatten(1)
        if x.shape[0] != z.shape[0]:
            raise ValueError(f"x and z batch sizes differ: {x.shape[0]} vs {z.shape[0]}")
        return self.net(torch.cat([x, z], dim=1))


class ImplicitVAE(nn.Module):
    """Encoder, decoder and latent score network; prior N(0, I).

    Args:
        x_dim: flattened input size (64 for 8×8 digits, 784 for MNIST).
        z_dim: latent size (the paper: 8 and 32 on MNIST).
        width, depth: hidden width and layers of encoder and decoder.
        score_variant, score_width, score_depth, deq: the score network (:class:`LatentScoreNet`).
        eps_dim: noise fed to the encoder (default z_dim).
        val_elbo_samples: encoder samples per x of the evaluation-mode objective (KDE centres, and as many
            importance-weighted draws; the bandwidth choice and KDE ELBO take half as many each).
    """

    def __init__(self, x_dim: int, z_dim: int = 8, *, width: int = 256, depth: int = 2, score_variant: str = "deq",
                 score_width: int = 256, deq: DEQSettings | None = None, eps_dim: int | None = None,
                 score_depth: int = 2, val_elbo_samples: int = 32) -> None:
        super().__init__()
        if val_elbo_samples < 4:
            raise ValueError(f"val_elbo_samples must be >= 4, got {val_elbo_samples}")
        self.val_elbo_samples = val_elbo_samples
        self.x_dim, self.z_dim = x_dim, z_dim
        self.encoder = ImplicitEncoder(x_dim, z_dim, eps_dim=eps_dim, width=width, depth=depth)
        self.decoder = BernoulliDecoder(z_dim, x_dim, width=width, depth=depth)
        self.score = LatentScoreNet(x_dim, z_dim, variant=score_variant, width=score_width, deq=deq,
                                    depth=score_depth)

    def vae_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.decoder.parameters()]

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        return self.decoder.log_prob(x, z)

    @staticmethod
    def log_prior(z: Tensor) -> Tensor:
        return standard_normal_log_prob(z)

    def score_objective(self, x: Tensor, loss_fn: Callable[..., LossOutput],
                        generator: torch.Generator | None = None) -> LossOutput:
        """The score network's loss on encoder samples z ~ q(·|x) (no gradient reaches the encoder)."""
        x = x.flatten(1)
        with torch.no_grad():
            z = self.encoder(x, generator)
        batch = x.shape[0]

        def score_fn(z_: Tensor) -> Tensor:
            # the loss may tile z n_particles times along dim 0; tile x alike
            return self.score(x.repeat(z_.shape[0] // batch, 1), z_)

        return loss_fn(score_fn, z)

    def vae_objective(self, x: Tensor, generator: torch.Generator | None = None) -> LossOutput:
        """−(log p(x|z) + log p(z) − sg[s(x, z)]ᵀ z), z = g_φ(x, ε): its φ- and θ-gradients are those of
        −ELBO with the entropy gradient from the score network (the value itself is not the ELBO)."""
        x = x.flatten(1)
        z = self.encoder(x, generator)
        recon = self.log_likelihood(x, z)
        prior = self.log_prior(z)
        with torch.no_grad():
            s = self.score(x, z.detach())
        entropy_surrogate = -(s * z).sum(-1)
        loss = -(recon + prior + entropy_surrogate).mean()
        return LossOutput(loss, {"recon": recon.mean().detach(), "log_prior": prior.mean().detach()})

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Bernoulli means (pixel probabilities) of n draws z ~ p(z): (n, x_dim)."""
        dev = next(self.parameters()).device
        z = torch.randn(n, self.z_dim, generator=generator,
                        device=generator.device if generator is not None else dev).to(dev)
        return torch.sigmoid(self.decoder.logits(z))


VAE_SCORE_LOSSES = ("sm", "ssm", "ssm_vr")  # losses of deqsm.losses that train s(x, z) from samples alone


# ---------------------------------------------------------------------------------------------------
# The VAE as a model family of the pipeline (model: vae)
# ---------------------------------------------------------------------------------------------------
class VAEEvalOptions(EvalOptions):
    """Evaluation knobs of the VAE."""

    elbo_centres: int = Field(512, ge=2, description=(
        "encoder samples per test x for the KDE of q(z|x), which the IW proposal is fitted to"))
    elbo_eval: int = Field(128, ge=1, description=(
        "samples per test x for the bandwidth choice and the KDE ELBO"))
    iw_samples: int = Field(256, description="draws K per test x for the importance-weighted bound (the headline)")
    iw_defensive_weight: float = Field(DEFENSIVE_WEIGHT, ge=0, lt=1, description=(
        "weight of the wide Gaussian in the IW proposal (0: the KDE of encoder samples alone)"))
    iw_defensive_scale: float = Field(DEFENSIVE_SCALE, gt=0, description=(
        "that Gaussian's standard deviations over the encoder samples' (moment-matched per x)"))
    memory_batch: int = Field(64, ge=1, description="batch of the measured score-network step")

    @field_validator("iw_samples")
    @classmethod
    def _iw_samples(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"iw_samples must be >= 1 (got {v}): the VAE's headline test_iw_loglik is the "
                             "importance-weighted bound, which needs draws")
        return v


def build_vae(dim: int, *, variant: str, width: int, depth: int, deq: DEQSettings, train: Tensor,
              z_dim: int = 8, hidden_width: int = 256, hidden_depth: int = 2, eps_dim: int | None = None,
              val_elbo_samples: int = 32) -> ImplicitVAE:
    """An :class:`ImplicitVAE` for binarised data of ``dim`` pixels; the score net is the variant.

    ``val_elbo_samples``: encoder samples per x of the validation bound (KDE centres, and as many
    importance-weighted draws; the bandwidth choice and KDE ELBO take half as many each)."""
    values = torch.unique(train)
    if not bool(((values == 0) | (values == 1)).all()):
        raise ValueError("the VAE's Bernoulli decoder needs binarised data (0/1 pixels): prepare the dataset "
                         "with binarize: threshold or bernoulli")
    model = ImplicitVAE(dim, z_dim, width=hidden_width, depth=hidden_depth, score_variant=variant,
                        score_width=width, deq=deq, eps_dim=eps_dim,
                        score_depth=depth, val_elbo_samples=val_elbo_samples)
    return model


def vae_objective(loss: str, options: dict[str, Any], train: Tensor):
    """Training: score-net loss + VAE surrogate (see the module docstring). Evaluation mode: −(importance-weighted
    bound), with ``val_elbo_samples`` KDE centres and draws per x and the default defensive proposal; terms
    ``iw_loglik`` (the bound), ``elbo`` (the KDE ELBO: a diagnostic, biased upwards), ``recon`` and ``kl``."""
    if loss not in VAE_SCORE_LOSSES:
        raise ValueError(f"the VAE's score network trains by {', '.join(VAE_SCORE_LOSSES)}; got loss {loss!r}")
    loss_fn = get_score_loss(loss, **options)

    def objective(model: ImplicitVAE, batch: Tensor) -> LossOutput:
        x = batch.flatten(1)
        if not model.training:
            n = model.val_elbo_samples
            est = estimate_elbo(model.encoder.sample, model.log_likelihood, model.log_prior, x, n_centres=n,
                                n_select=max(2, n // 2), n_eval=max(2, n // 2), iw_samples=n, batch_size=x.shape[0])
            bound = est.iw_loglik.mean()
            return LossOutput(-bound, {"iw_loglik": bound, "elbo": est.elbo.mean(), "recon": est.recon.mean(),
                                       "kl": est.kl.mean()})
        score = model.score_objective(x, loss_fn)
        vae = model.vae_objective(x)
        return LossOutput(score.loss + vae.loss, {"score_loss": score.loss.detach(), "vae_surrogate": vae.loss.detach(),
                                                  **vae.terms})

    return objective


def evaluate_vae(model: ImplicitVAE, splits: dict[str, Tensor], opts: "VAEEvalOptions", spec: Any, *,
                 true_density: Any = None, labels: dict[str, Tensor] | None = None) -> tuple[dict[str, float], Tensor]:
    """The importance-weighted bound ``test_iw_loglik`` (mean over test x) with its standard errors
    ``test_iw_loglik_mc_se`` (Monte-Carlo) and ``test_iw_loglik_se`` (over rows); the diagnostics
    ``test_elbo`` (KDE ELBO, biased upwards: not a bound), ``test_elbo_smoothed`` (the ELBO of the KDE-smoothed
    encoder: a bound, looser than the IW one) and their parts; the score network's test loss, the memory of one
    score-network step (the paper's Table 1 compares these), and 64 samples (Bernoulli means of x ~ p(x|z),
    z ~ N(0, I)) shaped like the data."""
    device = next(model.parameters()).device
    test = splits["test"].to(device)
    x = test.flatten(1)
    torch.manual_seed(opts.seed)
    est = estimate_elbo(model.encoder.sample, model.log_likelihood, model.log_prior, x, n_centres=opts.elbo_centres,
                        n_select=opts.elbo_eval, n_eval=opts.elbo_eval, iw_samples=opts.iw_samples,
                        defensive_weight=opts.iw_defensive_weight, defensive_scale=opts.iw_defensive_scale)
    out = est.summary("test_")
    loss_fn = get_score_loss(spec.loss.name, **spec.loss.options)
    batches = [x[i:i + opts.batch_size] for i in range(0, x.shape[0], opts.batch_size)]
    out["test_score_loss"] = sum(float(model.score_objective(b, loss_fn).loss.detach()) * b.shape[0] for b in batches) / x.shape[0]
    was_training = model.training
    model.train()  # the step as training takes it (DEQ backward hooks)
    batch = x[:opts.memory_batch]
    _, mem = measure_step(lambda: model.score_objective(batch, loss_fn).loss, list(model.score.parameters()), device)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    out["score_step_peak_bytes"] = float(mem.peak_bytes)
    out["score_net_params"] = float(count_parameters(model.score))
    images = model.sample(64, torch.Generator(device=device).manual_seed(opts.seed)).view(-1, *test.shape[1:])
    return out, images.cpu()


FAMILY = ModelFamily("vae", build=build_vae, objective=vae_objective, evaluate=evaluate_vae,
                     eval_options=VAEEvalOptions, headline=Headline("test_iw_loglik", "test log-likelihood bound (IW, nats)", True, "nats"))
