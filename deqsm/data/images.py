"""Image datasets and their preprocessing: scikit-learn's digits (packaged), and MNIST, CIFAR-10 and
CelebA 64×64 through their torchvision classes, from files on disk or downloaded when allowed.

Pixels u ∈ [0, 1] come from the integer levels x ∈ {0, …, L−1} as u = x / (L−1), or, dequantised,
u = (x + U[0, 1)) / L (uniform noise of one level's width, what bits/dim accounts for). Then, as parameters:
logit transform y = logit(α + (1 − 2α) u) (NICE), binarisation (VAE), or scaling to [−1, 1] (NCSN);
``scale: raw`` keeps the uint8 pixels. Images are stored (N, C, H, W).
"""
from __future__ import annotations

import gzip
import pickle
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from deqsm.data.base import (DATASETS, SPLITS, Context, DatasetSpec, Prepared, RawFiles, fetch, sha256_file,
                             sha256_tree, shuffled_splits, split_sizes)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CHUNK = 4096  # rows preprocessed at a time (bounds float64 temporaries)


class ImageSpec(DatasetSpec):
    """Preprocessing shared by the image datasets."""

    scale: Literal["raw", "unit", "symmetric"] = Field(
        "unit", description="raw: uint8 pixels untouched; unit: [0, 1]; symmetric: [-1, 1] (NCSN)")
    dequantize: bool = Field(False, description="add U[0, 1) to the integer levels before scaling")
    logit_alpha: float | None = Field(None, ge=0, lt=0.5, description="logit(α + (1 − 2α) u) (NICE); null: off")
    binarize: Literal["none", "threshold", "bernoulli"] = Field(
        "none", description="VAE: u > 0.5, or a Bernoulli(u) draw")

    @model_validator(mode="after")
    def _compatible(self) -> "ImageSpec":
        on = [k for k, v in (("dequantize", self.dequantize), ("logit_alpha", self.logit_alpha is not None),
                             ("binarize", self.binarize != "none")) if v]
        if self.scale == "raw" and on:
            raise ValueError(f"scale: raw keeps the integer pixels; it excludes {', '.join(on)}")
        if self.binarize != "none" and (self.dequantize or self.logit_alpha is not None or self.scale != "unit"):
            raise ValueError("binarize needs scale: unit, dequantize: false and logit_alpha: null")
        if self.logit_alpha is not None and self.scale != "unit":
            raise ValueError("logit_alpha applies to [0, 1] pixels: use it with scale: unit")
        if self.logit_alpha == 0 and not self.dequantize:
            raise ValueError("logit_alpha: 0 without dequantize maps pixels 0 and 1 to ±inf")
        return self

    def preprocess(self, pixels: np.ndarray, levels: int, rng: np.random.Generator) -> np.ndarray:
        """uint8 levels (N, C, H, W) → the stored array (uint8 for ``scale: raw``, else float32)."""
        if self.scale == "raw":
            return pixels
        out = np.empty(pixels.shape, np.float32)
        for start in range(0, len(pixels), CHUNK):
            x = pixels[start:start + CHUNK].astype(np.float64)
            if self.binarize != "none":
                u = x / (levels - 1)
                v = (u > 0.5) if self.binarize == "threshold" else (rng.random(u.shape) < u)
            else:
                u = (x + rng.random(x.shape)) / levels if self.dequantize else x / (levels - 1)
                if self.logit_alpha is not None:
                    p = self.logit_alpha + (1 - 2 * self.logit_alpha) * u
                    v = np.log(p) - np.log1p(-p)
                else:
                    v = 2 * u - 1 if self.scale == "symmetric" else u
            out[start:start + CHUNK] = v
        return out

    def finish(self, ctx: Context, pixels: dict[str, np.ndarray], labels: dict[str, np.ndarray] | None,
               levels: int, sources: dict[str, str], **info: Any) -> Prepared:
        x = {s: self.preprocess(np.ascontiguousarray(pixels[s]), levels, ctx.rng(1 + i)) for i, s in enumerate(SPLITS)}
        info = {"pixel_levels": levels, "logit_alpha": self.logit_alpha, "scale": self.scale, **info}
        return Prepared(x=x, y=labels, sources=sources, info=info)


class OfficialSplitImages(ImageSpec):
    """A real image dataset with an official train/test split; validation rows come from train."""

    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of the official train split held out")
    max_rows: int | None = Field(None, ge=1, description="keep at most this many rows per split (after shuffling)")

    def select(self, ctx: Context, n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Shuffled (train, val) indices into the official train split, and test indices."""
        rng = ctx.rng(0)
        idx = shuffled_splits(n_train, split_sizes(n_train, self.val_fraction, 0.0), rng)
        test = rng.permutation(n_test)
        cut = slice(None, self.max_rows)
        return idx["train"][cut], idx["val"][cut], test[cut]


def _decompress_or_link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix == ".gz":
        with gzip.open(src, "rb") as fin, open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    else:
        dst.symlink_to(src.resolve())


@DATASETS.register("digits")
class Digits(ImageSpec):
    """scikit-learn's 8×8 digits (1,797 images, levels 0..16), shipped inside the package."""

    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of the rows left after the test rows")
    test_fraction: float = Field(0.2, gt=0, lt=1)

    def load(self, ctx: Context) -> Prepared:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        pixels = images.reshape(-1, 1, 8, 8).astype(np.uint8)
        sizes = split_sizes(len(pixels), self.val_fraction, self.test_fraction)
        idx = shuffled_splits(len(pixels), sizes, ctx.rng(0))
        source = Path(str(resources.files("sklearn.datasets") / "data" / "digits.csv.gz"))
        return self.finish(ctx, {s: pixels[i] for s, i in idx.items()},
                           {s: labels[i].astype(np.int64) for s, i in idx.items()}, 17,
                           {"sklearn/datasets/data/digits.csv.gz": sha256_file(source)})


@DATASETS.register("mnist")
class MNIST(OfficialSplitImages):
    """MNIST (torchvision): the four IDX files, uncompressed or .gz, in ``<raw_root>/MNIST/raw``."""

    FILES: ClassVar[tuple[str, ...]] = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

    def raw_files(self, raw_root: Path) -> RawFiles:
        return RawFiles(raw_root / "MNIST" / "raw", tuple((f, f + ".gz") for f in self.FILES))

    def load(self, ctx: Context) -> Prepared:
        from torchvision.datasets import MNIST as TorchMNIST

        files = self.raw_files(ctx.raw_root)
        fetch(ctx, files, lambda: TorchMNIST(str(ctx.raw_root), download=True))
        found = [files.found(names) for names in files.needed]
        # torchvision reads only the uncompressed files (it extracts .gz only when their MD5s are the
        # official ones): stage them, decompressed, in a temporary root.
        with tempfile.TemporaryDirectory() as tmp:
            for names, src in zip(files.needed, found):
                _decompress_or_link(src, Path(tmp) / "MNIST" / "raw" / names[0])
            train, test = (TorchMNIST(tmp, train=t, download=False) for t in (True, False))
            tr_x, tr_y = train.data.numpy()[:, None], train.targets.numpy().astype(np.int64)
            te_x, te_y = test.data.numpy()[:, None], test.targets.numpy().astype(np.int64)
        i_tr, i_va, i_te = self.select(ctx, len(tr_x), len(te_x))
        return self.finish(ctx, {"train": tr_x[i_tr], "val": tr_x[i_va], "test": te_x[i_te]},
                           {"train": tr_y[i_tr], "val": tr_y[i_va], "test": te_y[i_te]}, 256,
                           {str(p.relative_to(ctx.raw_root)): sha256_file(p) for p in found})


class Verified(OfficialSplitImages):
    """A dataset whose torchvision class checks the raw files' MD5s (synthetic copies need verify_md5: false)."""

    verify_md5: bool = Field(True, description="check torchvision's published MD5s of the raw files")

    def open(self, ctx: Context, folder: Path, make: Callable[[], Any]) -> Any:
        """A torchvision dataset object; its integrity failure becomes an error that says what to do."""
        try:
            return make()
        except RuntimeError as err:
            raise ValueError(f"dataset {ctx.name!r}: torchvision refused the files in {folder} ({err}): they do "
                             f"not match its published MD5s; set verify_md5: false to accept other copies") from None


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: any other global (a class, a function such as
    os.system) is refused, so a crafted file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise ValueError(f"refusing to unpickle {module}.{name}: a CIFAR batch holds only arrays and lists")
        return super().find_class(module, name)


def read_cifar_batches(folder: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR python batches → (N, 3, 32, 32) uint8 images and int64 labels, without running pickled code."""
    xs, ys = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            try:
                entry = _ArrayUnpickler(f, encoding="latin1").load()
            except (pickle.UnpicklingError, EOFError, ValueError, AttributeError) as err:
                raise ValueError(f"{folder / name} is not a CIFAR batch: {err}") from None
        if not isinstance(entry, dict) or "data" not in entry or not ({"labels", "fine_labels"} & set(entry)):
            raise ValueError(f"{folder / name} is not a CIFAR batch (no data / labels entries)")
        xs.append(np.asarray(entry["data"], np.uint8))
        ys.extend(entry.get("labels", entry.get("fine_labels")))
    return np.vstack(xs).reshape(-1, 3, 32, 32), np.asarray(ys, np.int64)


@DATASETS.register("cifar10")
class CIFAR10(Verified):
    """CIFAR-10 (torchvision): the python pickle batches in ``<raw_root>/cifar-10-batches-py``."""

    FILES: ClassVar[tuple[str, ...]] = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")

    def raw_files(self, raw_root: Path) -> RawFiles:
        return RawFiles(raw_root / "cifar-10-batches-py", tuple((f,) for f in self.FILES))

    def load(self, ctx: Context) -> Prepared:
        from torchvision.datasets import CIFAR10 as TorchCIFAR10

        verify = self.verify_md5

        files = self.raw_files(ctx.raw_root)
        fetch(ctx, files, lambda: TorchCIFAR10(str(ctx.raw_root), download=True))
        if verify:  # torchvision unpickles only files whose MD5s match the published ones
            train, test = (self.open(ctx, files.folder, lambda: TorchCIFAR10(str(ctx.raw_root), train=t))
                           for t in (True, False))
            tr_x, te_x = (np.asarray(d.data).transpose(0, 3, 1, 2) for d in (train, test))  # HWC → CHW
            tr_y, te_y = (np.asarray(d.targets, np.int64) for d in (train, test))
        else:  # unverified copies: a restricted unpickler that can build arrays and nothing else
            (tr_x, tr_y), (te_x, te_y) = (read_cifar_batches(files.folder, names)
                                          for names in (self.FILES[:5], self.FILES[5:6]))
        i_tr, i_va, i_te = self.select(ctx, len(tr_x), len(te_x))
        return self.finish(ctx, {"train": tr_x[i_tr], "val": tr_x[i_va], "test": te_x[i_te]},
                           {"train": tr_y[i_tr], "val": tr_y[i_va], "test": te_y[i_te]}, 256,
                           {f"cifar-10-batches-py/{f}": sha256_file(files.folder / f) for f in self.FILES},
                           classes=CIFAR10_CLASSES)


@DATASETS.register("celeba64")
class CelebA64(Verified):
    """CelebA aligned faces (torchvision) centre-cropped to 140 and resized to 64×64, as in the NCSN base
    code; the official partition (list_eval_partition.txt) gives train / val / test."""

    FILES: ClassVar[tuple[str, ...]] = ("list_eval_partition.txt", "identity_CelebA.txt", "list_attr_celeba.txt",
                                        "list_bbox_celeba.txt", "list_landmarks_align_celeba.txt")
    crop: int = Field(140, ge=1)
    size: int = Field(64, ge=1)

    def raw_files(self, raw_root: Path) -> RawFiles:
        return RawFiles(raw_root / "celeba", (("img_align_celeba/",),) + tuple((f,) for f in self.FILES))

    def load(self, ctx: Context) -> Prepared:
        from torchvision import transforms
        from torchvision.datasets import CelebA as TorchCelebA
        from tqdm import tqdm

        verify = self.verify_md5

        class Files(TorchCelebA):
            def _check_integrity(self) -> bool:
                if verify:
                    return super()._check_integrity()
                folder = Path(self.root) / self.base_folder
                return all((folder / f).is_file() for f in CelebA64.FILES) and (folder / "img_align_celeba").is_dir()

        files = self.raw_files(ctx.raw_root)
        fetch(ctx, files, lambda: TorchCelebA(str(ctx.raw_root), download=True))
        transform = transforms.Compose([transforms.CenterCrop(self.crop), transforms.Resize(self.size)])
        pixels, used, rng = {}, [], ctx.rng(0)
        for ours, theirs in (("train", "train"), ("val", "valid"), ("test", "test")):
            ds = self.open(ctx, files.folder, lambda: Files(str(ctx.raw_root), split=theirs, target_type=[],
                                                            transform=transform))
            rows = rng.permutation(len(ds))[:self.max_rows]
            out = np.empty((len(rows), 3, self.size, self.size), np.uint8)
            for j, i in enumerate(tqdm(rows, desc=f"{ctx.name} {ours}", unit="img", disable=None, leave=False)):
                out[j] = np.asarray(ds[int(i)][0].convert("RGB")).transpose(2, 0, 1)
            pixels[ours] = out
            used += [ds.filename[int(i)] for i in rows]
        sources = {f"celeba/{f}": sha256_file(files.folder / f) for f in self.FILES}
        sources["celeba/img_align_celeba/ (sha256 over name + digest of each image used)"] = sha256_tree(
            files.folder / "img_align_celeba", used)
        return self.finish(ctx, pixels, None, 256, sources)
