"""Fréchet distances between image sets, through torchmetrics' ``FrechetInceptionDistance``.

    FD = ‖μ_r − μ_f‖² + tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^{1/2})

on features of a named extractor (``FEATURE_EXTRACTORS``), with the standard unbiased covariances — never
rescaled (the authors' FID multiplies the covariance by 0.642; this one does not). The metric name says
which features were used, so numbers from different extractors are never mixed up:

- ``fid_inception``: Inception-v3 pool features (2048), the real FID. Needs torch-fidelity and the weights
  file on disk (``inception_weights``, e.g. ``pt_inception-2015-12-05-6726825d.pth``); never downloaded.
- ``fd_digits_cnn``: the penultimate features of :class:`DigitsCNN`, a small classifier trained on the
  training split of the digits (:func:`train_digits_cnn`) — an offline stand-in for Inception on 8×8 digits.
  Its values are not comparable with published FIDs, only with each other (same classifier, same sample size).

``extractor="auto"`` takes Inception when it is available and falls back to the digits CNN, and says why.
:func:`image_features` gives the feature rows themselves, for the FD's interval and the KID in the same
features (:mod:`deqsm.metrics.sample_distances`).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from deqsm.registry import Registry

Tensor = torch.Tensor


class DigitsCNN(nn.Module):
    """A small classifier of (B, 1, 8, 8) images in [0, 1]; its penultimate layer is the FD feature space."""

    def __init__(self, num_classes: int = 10, num_features: int = 64, channels: int = 32) -> None:
        super().__init__()
        self.num_features = num_features
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1, stride=2)  # 8×8 → 4×4
        self.fc = nn.Linear(2 * channels * 16, num_features)
        self.out = nn.Linear(num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"DigitsCNN expects images of shape (B, 1, 8, 8), got {tuple(x.shape)}")
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x))


class PenultimateFeatures(nn.Module):
    """Wraps a classifier with a ``features`` method as a torchmetrics feature extractor (frozen, eval mode)."""

    def __init__(self, classifier: DigitsCNN) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features
        for p in self.classifier.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "PenultimateFeatures":
        return super().train(False)  # torchmetrics may call train(); the extractor stays frozen

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x.float())


class GivenFeatures(nn.Module):
    """The identity: for rows that already are feature vectors (B, num_features)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected feature rows (B, {self.num_features}), got {tuple(x.shape)}")
        return x


def train_digits_cnn(images: Tensor, labels: Tensor, *, epochs: int = 30, batch_size: int = 64, lr: float = 2e-3,
                     seed: int = 0, num_features: int = 64) -> DigitsCNN:
    """Train :class:`DigitsCNN` on (N, 1, 8, 8) images in [0, 1] with integer labels (the training split only)."""
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"images must have shape (N, 1, 8, 8), got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsCNN(num_classes=int(labels.max()) + 1, num_features=num_features)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    images, labels = images.float(), labels.long()
    for _ in range(epochs):
        perm = torch.randperm(images.shape[0], generator=gen)
        for start in range(0, images.shape[0], batch_size):
            idx = perm[start:start + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(images[idx]), labels[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model: DigitsCNN, images: Tensor, labels: Tensor) -> float:
    return float((model(images.float()).argmax(1) == labels).float().mean())


# ---------------------------------------------------------------------------------------------------
# extractors and the distance
# ---------------------------------------------------------------------------------------------------
def torch_fidelity_available() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


@dataclass(frozen=True)
class ExtractorSpec:
    """A feature extractor: the metric name it logs under and how to build the torchmetrics metric."""

    metric_name: str
    needs: str  # what must be present, for error messages


FEATURE_EXTRACTORS: Registry[ExtractorSpec] = Registry("FD feature extractor")
FEATURE_EXTRACTORS.register("inception")(ExtractorSpec("fid_inception", "torch-fidelity and an Inception weights file"))
FEATURE_EXTRACTORS.register("digits_cnn")(ExtractorSpec("fd_digits_cnn", "a trained DigitsCNN (train_digits_cnn)"))


def inception_unavailable_reason(weights: str | Path | None) -> str | None:
    """Why Inception features cannot be used offline, or None when they can."""
    if weights is None:
        return "no Inception weights path given"
    if not Path(weights).is_file():
        return f"Inception weights file {str(weights)!r} not found"
    if not torch_fidelity_available():
        return "torch-fidelity is not installed (torchmetrics' Inception needs it)"
    return None


@dataclass
class FrechetMetric:
    """A configured torchmetrics FrechetInceptionDistance and the name its value is logged under."""

    name: str  # "fid_inception" or "fd_digits_cnn"
    metric: nn.Module
    grayscale_to_rgb: bool  # Inception wants 3 channels
    note: str = ""  # why this extractor was chosen (e.g. why Inception was not)

    @property
    def kid_name(self) -> str:
        """The name of the KID in the same features: ``kid_`` + the extractor part of :attr:`name`
        (``fd_digits_cnn`` → ``kid_digits_cnn``, ``fid_inception`` → ``kid_inception``)."""
        return "kid_" + self.name.split("_", 1)[1]


def build_frechet_metric(extractor: str = "auto", *, inception_weights: str | Path | None = None,
                         classifier: DigitsCNN | None = None) -> FrechetMetric:
    """The FD metric for ``extractor`` (``auto``, ``inception``, ``digits_cnn``); never downloads anything."""
    from torchmetrics.image.fid import FrechetInceptionDistance  # slow import (~6 s): only when needed

    if extractor not in ("auto", *FEATURE_EXTRACTORS):
        raise ValueError(f"unknown FD feature extractor {extractor!r}; known: auto, {', '.join(FEATURE_EXTRACTORS)}")
    reason = inception_unavailable_reason(inception_weights)
    if extractor == "inception" or (extractor == "auto" and reason is None):
        if reason is not None:
            raise FileNotFoundError(f"extractor 'inception' needs {FEATURE_EXTRACTORS.get('inception').needs}: {reason}")
        metric = FrechetInceptionDistance(feature=2048, normalize=True,
                                          feature_extractor_weights_path=str(inception_weights))
        return FrechetMetric("fid_inception", metric, True, "Inception-v3 pool3 features")
    if classifier is None:
        raise ValueError(f"extractor 'digits_cnn' needs {FEATURE_EXTRACTORS.get('digits_cnn').needs}"
                         + (f" (Inception unavailable: {reason})" if extractor == "auto" else ""))
    metric = FrechetInceptionDistance(feature=PenultimateFeatures(classifier))
    note = "digits CNN penultimate features" + (f"; Inception unavailable: {reason}" if extractor == "auto" else "")
    return FrechetMetric("fd_digits_cnn", metric, False, note)


@torch.no_grad()
def image_features(fd: FrechetMetric, images: Tensor, *, batch_size: int = 256) -> Tensor:
    """The feature rows (N, d), float64, of images (N, C, H, W) in [0, 1] under ``fd``'s extractor: the rows
    its torchmetrics metric would accumulate (grayscale → RGB and clamped to [0, 1] for Inception, then
    bytes ×255 where the metric normalises for its own Inception), so that the FD, its interval and the KID
    of :mod:`deqsm.metrics.sample_distances` are all computed in one feature space from one pass."""
    if images.shape[0] < 1 or not bool(torch.isfinite(images).all()):
        raise ValueError(f"images must be a non-empty finite batch, got shape {tuple(images.shape)} "
                         f"with {int((~torch.isfinite(images)).sum())} NaN/Inf values")
    metric = fd.metric
    rows = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size].float()
        if fd.grayscale_to_rgb:
            chunk = (chunk.expand(-1, 3, -1, -1) if chunk.shape[1] == 1 else chunk).clamp(0, 1)
        if metric.normalize and not metric.used_custom_model:
            chunk = (chunk * 255).byte()
        rows.append(metric.inception(chunk).double().reshape(chunk.shape[0], -1))
    return torch.cat(rows)


def frechet_distance(fd: FrechetMetric, real: Tensor, fake: Tensor, *, batch_size: int = 256) -> float:
    """FD between two image sets (B, C, H, W) in [0, 1] with the features of ``fd`` (clamped at 0: equal
    sets give ≈ −1e-10 from round-off)."""
    for name, imgs in (("real", real), ("fake", fake)):
        if imgs.shape[0] < 2:
            raise ValueError(f"the {name} set needs at least 2 images, got {imgs.shape[0]}")
        if not bool(torch.isfinite(imgs).all()):
            raise ValueError(f"the {name} set contains NaN or Inf values")
    return frechet_distance_of_features(image_features(fd, real, batch_size=batch_size),
                                        image_features(fd, fake, batch_size=batch_size))


@torch.no_grad()
def frechet_distance_of_features(real: Tensor, fake: Tensor) -> float:
    """FD between two sets of feature rows (N, d), computed by torchmetrics (clamped at 0)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets must be (N, d) with equal d, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError(f"each feature set needs at least 2 rows, got {real.shape[0]} and {fake.shape[0]}")
    metric = FrechetInceptionDistance(feature=GivenFeatures(real.shape[1])).to(real.device)
    metric.update(real.double(), real=True)
    metric.update(fake.double().to(real.device), real=False)
    return max(float(metric.compute()), 0.0)


def gaussian_frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """The closed form for N(μ1, Σ1) and N(μ2, Σ2), in float64, via the symmetric form
    tr((Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}) of tr((Σ1 Σ2)^{1/2})."""
    mu1, cov1, mu2, cov2 = (t.double() for t in (mu1, cov1, mu2, cov2))

    def sqrtm_psd(a: Tensor) -> Tensor:
        vals, vecs = torch.linalg.eigh(0.5 * (a + a.T))
        return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T

    r1 = sqrtm_psd(cov1)
    cross = torch.linalg.eigvalsh(r1 @ cov2 @ r1).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * cross)
