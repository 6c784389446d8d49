"""The generative experiments as pipeline models: the implicit-encoder VAE (the paper's §4.1) and NCSN (§4.4).

Each is a ``MODELS`` entry (:mod:`deqsm.models`) like DKEF and NICE: built from the experiment's spec
(``variant`` deq / explicit with ``depth``, ``width``, ``deq`` settings, ``model_options``), trained by
:func:`deqsm.train.fit` with the objective below, and evaluated by its own hook, which returns test
metrics and a batch of samples (the evaluate stage saves them as a grid).

VAE (``model: vae``): the experiment's variant is the score network s(x, z) (deq, or explicit with
``depth``: 2 is the paper's ``explicit``, 8 / 16 its ``aug8`` / ``aug16``); ``width`` is its width;
``model_options`` size the encoder and decoder. One training step minimises score_loss + vae_loss with
one optimiser. Their stop-gradients keep them apart: the score network's loss sees the encoder's samples
without gradient, and the VAE's surrogate sees s(x, z) without gradient. So each parameter gets only its
own loss's gradient, and Adam (per parameter) updates both networks at once. In
``benchmarks/generative_compare.py`` the updates alternate instead. In evaluation mode the objective's loss
is −ELBO (a small kernel-density estimate on the batch, :func:`deqsm.metrics.elbo.estimate_elbo`), so
validation, early stopping and tuning watch the ELBO, not the surrogate's value (which is not one).

NCSN (``model: ncsn``): ``width`` is the channel count; ``depth`` the blocks of an explicit core; the σ
ladder (``sigma_max``, ``sigma_min``, ``sigma_levels``) is a model option kept in the weights file; the
loss is the annealed, σ²-weighted ``dsm`` / ``ssm`` / ``ssm_vr`` / ``sm`` (:func:`annealed_score_loss`).
Evaluation: samples by annealed Langevin dynamics and their Fréchet distance to the test split
(``fd_digits_cnn``, or ``fid_inception`` when its weights are on disk: :mod:`deqsm.metrics.fid`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deqsm.config import DEQSettings
from deqsm.losses import LossOutput, get_score_loss
from deqsm.metrics.elbo import estimate_elbo
from deqsm.metrics.memory import measure_step
from deqsm.models.blocks import count_parameters
from deqsm.models.ncsn import NCSN, annealed_score_loss
from deqsm.models.vae import VAE_SCORE_LOSSES, ImplicitVAE
from deqsm.sampling import annealed_langevin, geometric_sigmas

Tensor = torch.Tensor


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------
def build_vae(dim: int, *, variant: str, width: int, depth: int, deq: DEQSettings, train: Tensor,
              z_dim: int = 8, hidden_width: int = 256, hidden_depth: int = 2, eps_dim: int | None = None,
              val_elbo_samples: int = 32) -> ImplicitVAE:
    """An :class:`ImplicitVAE` for binarised data of ``dim`` pixels; the score net is the variant.

    ``val_elbo_samples``: encoder samples per x of the validation ELBO estimate (KDE centres; its bandwidth
    choice and estimate take half as many each)."""
    if variant not in ("deq", "explicit"):
        raise ValueError(f"unknown network variant {variant!r}; known: deq, explicit")
    if val_elbo_samples < 4:
        raise ValueError(f"val_elbo_samples must be >= 4, got {val_elbo_samples}")
    values = torch.unique(train)
    if not bool(((values == 0) | (values == 1)).all()):
        raise ValueError("the VAE's Bernoulli decoder needs binarised data (0/1 pixels): prepare the dataset "
                         "with binarize: threshold or bernoulli")
    model = ImplicitVAE(dim, z_dim, width=hidden_width, depth=hidden_depth, score_variant=variant,
                        score_width=width, deq=deq, eps_dim=eps_dim,
                        score_depth=depth if variant == "explicit" else None)
    model.val_elbo_samples = val_elbo_samples
    return model


def vae_objective(loss: str, options: dict[str, Any], train: Tensor):
    """Training: score-net loss + VAE surrogate (see the module docstring); evaluation mode: −ELBO."""
    if loss not in VAE_SCORE_LOSSES:
        raise ValueError(f"the VAE's score network trains by {', '.join(VAE_SCORE_LOSSES)}; got loss {loss!r}")
    loss_fn = get_score_loss(loss, **options)

    def objective(model: ImplicitVAE, batch: Tensor) -> LossOutput:
        x = batch.flatten(1)
        if not model.training:
            n = model.val_elbo_samples
            est = estimate_elbo(model.encoder.sample, model.log_likelihood, model.log_prior, x,
                                n_centres=n, n_select=max(2, n // 2), n_eval=max(2, n // 2), batch_size=x.shape[0])
            elbo = est.elbo.mean()
            return LossOutput(-elbo, {"elbo": elbo, "recon": est.recon.mean(), "kl": est.kl.mean()})
        score = model.score_objective(x, loss_fn)
        vae = model.vae_objective(x)
        return LossOutput(score.loss + vae.loss, {"score_loss": score.loss.detach(), "vae_surrogate": vae.loss.detach(),
                                                  **vae.terms})

    return objective


def evaluate_vae(model: ImplicitVAE, splits: dict[str, Tensor], opts: Any, spec: Any,
                 labels: dict[str, Tensor] | None = None) -> tuple[dict[str, float], Tensor]:
    """Test ELBO (KDE entropy per x; also the importance-weighted bound when ``opts.iw_samples``), the score
    network's test loss, the memory of one score-network step (the paper's Table 1 compares these), and 64
    samples (Bernoulli means of x ~ p(x|z), z ~ N(0, I)) shaped like the data."""
    device = _device(model)
    test = splits["test"].to(device)
    x = test.flatten(1)
    torch.manual_seed(opts.seed)
    est = estimate_elbo(model.encoder.sample, model.log_likelihood, model.log_prior, x, n_centres=opts.elbo_centres,
                        n_select=opts.elbo_eval, n_eval=opts.elbo_eval, iw_samples=opts.iw_samples)
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


# ---------------------------------------------------------------------------------------------------
# NCSN
# ---------------------------------------------------------------------------------------------------
def build_ncsn(dim: int, *, variant: str, width: int, depth: int, deq: DEQSettings, train: Tensor,
               sigma_max: float = 1.0, sigma_min: float = 0.01, sigma_levels: int = 10,
               core_norm: str | None = None) -> NCSN:
    """An :class:`NCSN` for images (N, C, H, W) with ``width`` channels and the geometric σ ladder
    (registered as the buffer ``sigmas``, so the weights file carries it). ``core_norm`` overrides
    ``deq.norm`` for the DEQ core's convolution (``operator``: its exact operator norm, see
    :mod:`deqsm.models.ncsn`)."""
    if train.dim() != 4:
        raise ValueError(f"NCSN needs image data (N, C, H, W), got shape {tuple(train.shape)}: prepare an image "
                         "dataset (digits, mnist, cifar10, celeba64)")
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


def _feature_classifier(images: Tensor, labels: Tensor, seed: int, epochs: int) -> nn.Module:
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
    from deqsm.models import Headline

    names = [FEATURE_EXTRACTORS.get(name).metric_name for name in FEATURE_EXTRACTORS]
    key = next((n for n in sorted(names) if n in set(metric_keys)), "fd")
    return Headline(key, f"{key} (lower is better)", False, "")


def evaluate_ncsn(model: NCSN, splits: dict[str, Tensor], opts: Any, spec: Any,
                  labels: dict[str, Tensor] | None = None) -> tuple[dict[str, float], Tensor]:
    """The test loss, and ``opts.fd_samples`` samples by annealed Langevin dynamics (uniform start on the
    data range, ``opts.langevin_steps`` per level, step ``opts.langevin_lr`` at the smallest σ) with their
    Fréchet distance to the test split; for scale, the same distance between training and test images."""
    from deqsm.metrics.fid import build_frechet_metric, classifier_accuracy, frechet_distance, \
        inception_unavailable_reason
    from deqsm.train import evaluate as evaluate_objective

    device = _device(model)
    train, test = splits["train"], splits["test"]
    lo, hi = (-1.0, 1.0) if opts.pixel_range == "symmetric" else (0.0, 1.0)
    unit = lambda t: ((t - lo) / (hi - lo)).cpu()  # noqa: E731 — FD features take [0, 1] images
    out: dict[str, float] = {}
    torch.manual_seed(opts.seed)
    out["test_loss"] = evaluate_objective(model, ncsn_objective(spec.loss.name, spec.loss.options, train),
                                          test.to(device), opts.batch_size)["loss"]
    classifier = None
    if opts.fd_extractor == "digits_cnn" or (opts.fd_extractor == "auto"
                                             and inception_unavailable_reason(opts.inception_weights) is not None):
        if labels is None or labels.get("train") is None:
            raise ValueError("FD with the digits CNN needs the training split's labels; this dataset has none "
                             "(give eval_options.inception_weights, or use a labelled image dataset)")
        classifier = _feature_classifier(unit(train), labels["train"], opts.seed, opts.classifier_epochs)
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
    out[fd.name] = frechet_distance(fd, unit(test), unit(samples))
    ref = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(opts.seed))[:n]]
    out[f"{fd.name}_train_vs_test"] = frechet_distance(fd, unit(test), unit(ref))
    out["fd_samples"] = float(n)
    return out, unit(samples[:64])
