"""Noise-conditional score networks (NCSN, Song & Ermon 2019) with a DEQ core, and their annealed losses.

The network (for small images, e.g. 8×8 digits), ``s(x, σ) = head(z) / σ``:

    h  = stem(x) + e(σ)                      a 3×3 convolution, plus a learned embedding of log σ per channel
    u  = h + conv(softplus(conv(softplus(h))))   the injection g(y): one residual block (the paper's NCSN choice)
    z  = the core, fed u at every step:
         ``deq``      z* = softplus(Ŵ ⋆ z* + u), one weight-tied convolution at its fixed point (the paper's
                      eq. 5 with a convolution for W), solved by a registered solver, differentiated by a
                      registered backward mode (phantom: the paper's Algorithm 1);
         ``explicit`` z_l = softplus(W_l ⋆ z_{l−1} + u), l = 1…L, from z_0 = softplus(u) (the block applied
                      to z = 0, as the DEQ's first iterate): the same block, L untied copies (unnormalised
                      weights, as the paper's baselines).

Output division by σ (the NCSNv2 parameterisation) makes ‖s‖ ∝ 1/σ, as the true score's is.

The blocks and the DEQ's well-posedness (normalising the convolution by λ times its norm) are in
:mod:`deqsm.models.conv`; the core's variant comes from :data:`deqsm.models.blocks.VARIANTS`.

Losses (:func:`annealed_score_loss`): each sample draws σ from the ladder and x̃ = x + σε.

- ``dsm``: ½‖σ s(x̃, σ) + ε‖² (σ²-weighted DSM; :func:`deqsm.losses.denoising_score_matching`).
- ``ssm`` / ``ssm_vr`` / ``sm``: the σ²-weighted score-matching loss of p_σ at x̃ (annealed SSM of the
  NCSN paper). It is computed by the plain loss of :mod:`deqsm.losses` in the rescaled variable
  u = x̃ / σ, whose score is s_u(u) = σ s(σu, σ): then vᵀ(∂s_u/∂u)v = σ² vᵀ(∂s/∂x̃)v and ½‖s_u‖² = σ² ½‖s‖²,
  so every term picks up exactly the weight σ².
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import Field
from torch import nn

from deqsm.config import DEQSettings
from deqsm.losses import LOSSES, LossOutput, get_score_loss
from deqsm.models.blocks import make_conv_core
from deqsm.models.conv import ResidualBlock
from deqsm.models.family import EvalOptions, Headline, ModelFamily
from deqsm.sampling import annealed_langevin, geometric_sigmas, largest_pairwise_distance
from deqsm.train import mean_loss

Tensor = torch.Tensor


class NCSN(nn.Module):
    """s(x, σ) for image batches (B, C, H, W) and noise levels σ of shape (B,) (see the module docstring).

    Args:
        in_channels: image channels.
        channels: feature channels of the core.
        variant: ``deq`` or ``explicit`` (:data:`deqsm.models.blocks.VARIANTS`).
        depth: blocks of the explicit core (ignored by ``deq``).
        deq: solver / backward settings of the DEQ core (default :class:`deqsm.config.DEQSettings`).
    """

    def __init__(self, in_channels: int = 1, channels: int = 32, *, variant: str = "deq", depth: int = 4,
                 deq: DEQSettings | None = None) -> None:
        super().__init__()
        if in_channels < 1 or channels < 1:
            raise ValueError(f"in_channels and channels must be >= 1, got {in_channels}, {channels}")
        self.variant = variant
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.embed = nn.Linear(1, channels)
        self.inject = ResidualBlock(channels)
        self.core = make_conv_core(variant, channels, depth=depth, deq=deq or DEQSettings())
        self.head = nn.Conv2d(channels, in_channels, 3, padding=1)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"NCSN expects images (B, C, H, W), got shape {tuple(x.shape)}")
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
        h = self.stem(x) + self.embed(sigma.log().unsqueeze(1))[:, :, None, None]
        z = self.core(self.inject(h))
        return self.head(z) / sigma.view(-1, 1, 1, 1)


def annealed_score_loss(name: str, sigmas: Sequence[float], *, generator: torch.Generator | None = None,
                        **options) -> Callable[[nn.Module, Tensor], LossOutput]:
    """``loss_fn(model, x)`` for a noise-conditional score model ``model(x, σ)``: the σ²-weighted loss
    ``name`` (``dsm``, ``ssm``, ``ssm_vr``, ``sm``) averaged over σ drawn uniformly from ``sigmas`` per sample.

    ``options`` go to the underlying loss (e.g. ``noise``, ``n_particles`` for the sliced losses).
    """
    ladder = [float(s) for s in sigmas]
    if not ladder or any(not s > 0 for s in ladder):
        raise ValueError(f"sigmas must be a non-empty list of positive numbers, got {list(sigmas)}")
    if name == "dsm":
        if "sigma" in options or "sigmas" in options or "noise_conditional" in options:
            raise TypeError("annealed dsm sets sigma / sigmas / noise_conditional itself; do not pass them")
        inner = get_score_loss("dsm", sigmas=ladder, noise_conditional=True, generator=generator, **options)

        def dsm_loss(model: nn.Module, x: Tensor) -> LossOutput:
            return inner(model, x)

        return dsm_loss

    spec = LOSSES.get(name)
    if not spec.on_score:
        raise ValueError(f"loss {name!r} needs an energy model; annealed score losses: dsm, sm, ssm, ssm_vr")
    if generator is not None and name in ("ssm", "ssm_vr"):
        options = {**options, "generator": generator}
    inner = get_score_loss(name, **options)
    table = torch.tensor(ladder)

    def loss_fn(model: nn.Module, x: Tensor) -> LossOutput:
        if x.dim() < 2:
            raise ValueError(f"x must be batched, shape (B, ...), got shape {tuple(x.shape)}")
        x = x.detach()
        batch = x.shape[0]
        draw_on = generator.device if generator is not None else x.device
        idx = torch.randint(0, len(ladder), (batch,), generator=generator, device=draw_on)
        sig = table.to(device=draw_on, dtype=x.dtype)[idx].to(x.device)
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=draw_on).to(x.device)
        shape = (-1, *([1] * (x.dim() - 1)))
        u = (x + sig.view(shape) * eps) / sig.view(shape)

        def rescaled_score(u_: Tensor) -> Tensor:
            # u_ may hold n_particles tiled copies of the batch (deqsm.losses repeats along dim 0).
            s_r = sig.repeat(u_.shape[0] // batch)
            return s_r.view(shape) * model(s_r.view(shape) * u_, s_r)

        return inner(rescaled_score, u)

    loss_fn.__name__ = f"annealed_{name}_loss"
    return loss_fn


# ---------------------------------------------------------------------------------------------------
# NCSN as a model family of the pipeline (model: ncsn)
# ---------------------------------------------------------------------------------------------------
class NCSNEvalOptions(EvalOptions):
    """Evaluation knobs of NCSN: annealed Langevin samples (by default NCSN's T = 100 steps per level and
    ε = 2e-5), their Fréchet distance with an interval for a replicate, and their KID (same features)."""

    fd_extractor: Literal["auto", "inception", "digits_cnn"] = Field(
        "auto", description="FD features (auto: Inception when its weights are on disk, else the digits CNN)")
    inception_weights: str | None = Field(None, description="Inception-v3 weights file (never downloaded)")
    fd_samples: int | None = Field(None, ge=2, description="samples for the FD (null: the test-set size)")
    langevin_steps: int = Field(100, ge=1, description="annealed Langevin steps per noise level (NCSN: 100)")
    langevin_lr: float = Field(2e-5, gt=0, description="Langevin step size ε at the smallest σ (NCSN: 2e-5)")
    fd_bootstrap: int = Field(200, ge=0, description="bootstrap resamples behind the FD intervals (0: none)")
    fd_ci_level: float = Field(0.9, gt=0, lt=1, description="coverage the FD intervals aim at for the FD of an "
                               "independent replicate sample of the same size")
    kid_subsets: int = Field(100, ge=1, description="random subsets the KID is averaged over")
    kid_subset_size: int = Field(100, ge=2, description="rows per KID subset (clamped to the number of samples)")
    classifier_epochs: int = Field(15, ge=1, description="epochs of the digits CNN behind fd_digits_cnn")
    pixel_range: Literal["unit", "symmetric"] = Field("unit", description="data range [0, 1] or [−1, 1]")


def build_ncsn(dim: int, *, variant: str, width: int, depth: int, deq: DEQSettings, train: Tensor,
               sigma_max: float | Literal["auto"] = 1.0, sigma_min: float = 0.01, sigma_levels: int = 10,
               core_norm: str | None = None) -> NCSN:
    """An :class:`NCSN` for images (N, C, H, W) with ``width`` channels and the geometric σ ladder
    (registered as the buffer ``sigmas``, so the weights file carries it). ``sigma_max="auto"``: NCSNv2's
    rule, the largest pairwise distance between training images
    (:func:`deqsm.sampling.largest_pairwise_distance`; exact up to 5000 images, over 5000 of them beyond).
    ``core_norm`` overrides ``deq.norm`` for the DEQ core's convolution (``operator``: its exact operator
    norm, see :mod:`deqsm.models.ncsn`)."""
    if train.dim() != 4:
        raise ValueError(f"NCSN needs image data (N, C, H, W), got shape {tuple(train.shape)}: prepare an image "
                         "dataset (digits, mnist, cifar10, celeba64)")
    if sigma_max == "auto":
        sigma_max = largest_pairwise_distance(train)
    elif isinstance(sigma_max, str):
        raise ValueError(f"sigma_max must be a positive number or 'auto', got {sigma_max!r}")
    if core_norm is not None:
        deq = DEQSettings(**{**deq.model_dump(), "norm": core_norm})
    model = NCSN(train.shape[1], width, variant=variant, depth=depth, deq=deq)
    model.register_buffer("sigmas", torch.tensor(geometric_sigmas(sigma_max, sigma_min, sigma_levels)))
    return model


def ncsn_objective(loss: str, options: dict[str, Any], train: Tensor):
    """The annealed loss on the model's own σ ladder."""
    cache: dict[tuple[float, ...], Any] = {}

    def objective(model: NCSN, batch: Tensor) -> LossOutput:
        key = tuple(float(s) for s in model.sigmas)
        if key not in cache:
            cache[key] = annealed_score_loss(loss, key, **options)
        return cache[key](model, batch)

    annealed_score_loss(loss, [1.0], **options)  # a bad loss name or option fails here, not in training
    return objective


_CLASSIFIERS: dict[str, nn.Module] = {}


def fd_feature_classifier(images: Tensor, labels: Tensor, seed: int, epochs: int) -> nn.Module:
    """The digits CNN behind ``fd_digits_cnn``, trained once per (training images, labels, seed, epochs) in
    this process: every variant of an experiment is measured in the same feature space, and it is not
    retrained for each one."""
    import hashlib

    from deqsm.metrics.fid import train_digits_cnn

    digest = hashlib.sha256()
    for t in (images.float().contiguous(), labels.long().contiguous()):
        digest.update(t.cpu().numpy().tobytes())
    key = f"{digest.hexdigest()}-{seed}-{epochs}"
    if key not in _CLASSIFIERS:
        _CLASSIFIERS[key] = train_digits_cnn(images, labels, seed=seed, epochs=epochs)
    return _CLASSIFIERS[key]


def ncsn_headline(metric_keys: Any):
    """NCSN is judged by the Fréchet distance of its samples, named by its feature extractor
    (``fd_digits_cnn``, ``fid_inception``); lower is better."""
    from deqsm.metrics.fid import FEATURE_EXTRACTORS

    names = [FEATURE_EXTRACTORS.get(name).metric_name for name in FEATURE_EXTRACTORS]
    key = next((n for n in sorted(names) if n in set(metric_keys)), "fd")
    return Headline(key, f"{key} (lower is better)", False, "")


def evaluate_ncsn(model: NCSN, splits: dict[str, Tensor], opts: "NCSNEvalOptions", spec: Any, *,
                  true_density: Any = None, labels: dict[str, Tensor] | None = None) -> tuple[dict[str, float], Tensor]:
    """The test loss, and ``opts.fd_samples`` samples by annealed Langevin dynamics (uniform start on the
    data range, ``opts.langevin_steps`` per level, step ``opts.langevin_lr`` at the smallest σ) with their
    Fréchet distance and KID to the test split, and for scale the same between as many training images and
    the test split (:func:`deqsm.metrics.sample_distances.sample_distance_metrics` names the keys)."""
    from deqsm.metrics.fid import build_frechet_metric, classifier_accuracy, image_features, \
        inception_unavailable_reason
    from deqsm.metrics.sample_distances import sample_distance_metrics
    device = next(model.parameters()).device
    train, test = splits["train"], splits["test"]
    lo, hi = (-1.0, 1.0) if opts.pixel_range == "symmetric" else (0.0, 1.0)
    unit = lambda t: ((t - lo) / (hi - lo)).cpu()  # noqa: E731 — FD features take [0, 1] images
    out: dict[str, float] = {}
    torch.manual_seed(opts.seed)
    out["test_loss"] = mean_loss(model, ncsn_objective(spec.loss.name, spec.loss.options, train),
                                          test.to(device), opts.batch_size)["loss"]
    classifier = None
    if opts.fd_extractor == "digits_cnn" or (opts.fd_extractor == "auto"
                                             and inception_unavailable_reason(opts.inception_weights) is not None):
        if labels is None or labels.get("train") is None:
            raise ValueError("FD with the digits CNN needs the training split's labels; this dataset has none "
                             "(give eval_options.inception_weights, or use a labelled image dataset)")
        classifier = fd_feature_classifier(unit(train), labels["train"], opts.seed, opts.classifier_epochs)
        if labels.get("test") is not None:
            out["fd_classifier_test_accuracy"] = classifier_accuracy(classifier, unit(test), labels["test"])
    fd = build_frechet_metric(opts.fd_extractor, inception_weights=opts.inception_weights, classifier=classifier)
    n = min(opts.fd_samples, test.shape[0]) if opts.fd_samples else test.shape[0]
    gen = torch.Generator(device=device).manual_seed(opts.seed)
    x0 = lo + (hi - lo) * torch.rand(n, *test.shape[1:], generator=gen, device=device)
    was_training = model.training
    model.eval()
    samples, _ = annealed_langevin(model, x0, [float(s) for s in model.sigmas], step_lr=opts.langevin_lr,
                                   steps_per_level=opts.langevin_steps, clamp=(lo, hi), generator=gen)
    model.train(was_training)
    ref = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(opts.seed))[:n]]
    out.update(sample_distance_metrics(
        fd.name, fd.kid_name, *(image_features(fd, unit(t)) for t in (test, samples, ref)), boots=opts.fd_bootstrap,
        level=opts.fd_ci_level, kid_subsets=opts.kid_subsets, kid_subset_size=opts.kid_subset_size, seed=opts.seed))
    out["fd_samples"] = float(n)
    return out, unit(samples[:64])


FAMILY = ModelFamily("ncsn", build=build_ncsn, objective=ncsn_objective, evaluate=evaluate_ncsn,
                     eval_options=NCSNEvalOptions, headline=ncsn_headline)
