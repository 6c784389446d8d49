"""The dataset registry and what every dataset shares: its validated options, the raw files it needs,
the arrays it produces, and seeded splits.

A dataset is a pydantic model registered by name (``@DATASETS.register("digits")``): its fields are the
preprocessing parameters written under ``data.datasets.<name>`` in params.yaml, and its :meth:`load`
returns a :class:`Prepared` (numpy arrays per split). Nothing here writes files; :mod:`deqsm.data.store`
does, atomically.
"""
from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import ConfigDict, Field

from deqsm.schema import Strict
from deqsm.registry import Registry

SPLITS = ("train", "val", "test")


class MissingDataError(FileNotFoundError):
    """A real dataset's files are absent (and could not be downloaded)."""


@dataclass(frozen=True)
class RawFiles:
    """The files a real dataset reads: ``folder`` and, per needed file, the names accepted for it."""

    folder: Path
    needed: tuple[tuple[str, ...], ...]  # e.g. ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz")

    def missing(self) -> list[str]:
        return [" or ".join(names) for names in self.needed if not any((self.folder / n).exists() for n in names)]

    def found(self, names: tuple[str, ...]) -> Path:
        """The first accepted name present for one needed file."""
        for n in names:
            if (self.folder / n).exists():
                return self.folder / n
        raise MissingDataError(f"{self.folder}: none of {', '.join(names)}")


@dataclass(frozen=True)
class Context:
    """What a loader may use besides its options."""

    name: str            # the entry's name in params.yaml (and its output folder)
    dataset: str         # its registry name (seeds the split: two entries of one dataset share it)
    raw_root: Path       # where real datasets' files are looked for
    seed: int
    download: bool = False
    log: Callable[[str], None] = lambda message: None

    def rng(self, stream: int) -> np.random.Generator:
        """A generator per (seed, registry name, purpose): 0 splits, 1.. noise and sampling."""
        return np.random.default_rng([self.seed, zlib.crc32(self.dataset.encode()), stream])


@dataclass
class Prepared:
    """A prepared dataset: features per split (images (N, C, H, W) or vectors (N, D)), optional labels."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray] | None = None
    columns: list[str] | None = None   # vector data: one name per feature; None: image tensors
    sources: dict[str, str] = field(default_factory=dict)  # source file (relative name) -> sha256
    info: dict[str, Any] = field(default_factory=dict)      # dataset facts (true density, pixel levels, ...)

    def __post_init__(self) -> None:
        if set(self.x) != set(SPLITS):
            raise ValueError(f"a prepared dataset needs splits {SPLITS}, got {sorted(self.x)}")
        for split, arr in self.x.items():
            if arr.shape[0] == 0:
                raise ValueError(f"split {split!r} is empty: adjust the split sizes")
            if arr.shape[1:] != self.x["train"].shape[1:]:
                raise ValueError(f"split {split!r} has sample shape {arr.shape[1:]}, train has {self.x['train'].shape[1:]}")
            if self.y is not None and self.y[split].shape[0] != arr.shape[0]:
                raise ValueError(f"split {split!r}: {arr.shape[0]} rows but {self.y[split].shape[0]} labels")
        if self.columns is not None and (self.x["train"].ndim != 2 or len(self.columns) != self.x["train"].shape[1]):
            raise ValueError(f"{len(self.columns)} column names for features of shape {self.x['train'].shape[1:]}")


class DatasetSpec(Strict):
    """Base of every dataset: its fields are its parameters, :meth:`load` produces the splits."""

    model_config = ConfigDict(frozen=True)
    dataset: str | None = Field(None, description="registry name when the entry's name differs "
                                                  "(e.g. digits_ncsn: {dataset: digits, scale: symmetric})")

    def raw_files(self, raw_root: Path) -> RawFiles | None:
        """The files this dataset reads from disk; None for generated or packaged data."""
        return None

    def load(self, ctx: Context) -> Prepared:
        raise NotImplementedError


DATASETS: Registry[type[DatasetSpec]] = Registry("dataset")


def split_sizes(n: int, val_fraction: float, test_fraction: float, test_max: int | None = None) -> tuple[int, int, int]:
    """(train, val, test) row counts: test = min(test_max, ⌊n·test_fraction⌋), val = ⌊(n − test)·val_fraction⌋."""
    n_test = int(n * test_fraction)
    if test_max is not None:
        n_test = min(test_max, n_test)
    n_val = int((n - n_test) * val_fraction)
    return n - n_val - n_test, n_val, n_test


def shuffled_splits(n: int, sizes: tuple[int, int, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Row indices per split after a seeded shuffle."""
    perm = rng.permutation(n)
    a, b = sizes[0], sizes[0] + sizes[1]
    return {"train": perm[:a], "val": perm[a:b], "test": perm[b:b + sizes[2]]}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(folder: Path, names: list[str]) -> str:
    """One digest for many files (an image folder): sha256 over sorted (name, file digest) lines."""
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(f"{name}\t{sha256_file(folder / name)}\n".encode())
    return h.hexdigest()


def fetch(ctx: Context, files: RawFiles, download: Callable[[], object]) -> None:
    """Make sure ``files`` are present: download them when allowed, else a :class:`MissingDataError`."""
    missing = files.missing()
    if not missing:
        return
    if not ctx.download:
        raise missing_error(ctx.name, files, missing)
    ctx.log(f"{ctx.name}: downloading into {files.folder}")
    try:
        download()
    except (OSError, RuntimeError) as err:  # torchvision raises RuntimeError after its mirrors fail
        raise missing_error(ctx.name, files, missing, str(err).strip().splitlines()[-1]) from None
    if missing := files.missing():
        raise missing_error(ctx.name, files, missing, "the download did not produce them")


def missing_error(name: str, files: RawFiles, missing: list[str], reason: str | None = None) -> MissingDataError:
    how = f"could not download ({reason}); " if reason else ""
    return MissingDataError(
        f"dataset {name!r}: {how}files missing in {files.folder}: {'; '.join(missing)}. Put them there"
        + ("" if reason else ", or set data.download: true where the network allows"))
