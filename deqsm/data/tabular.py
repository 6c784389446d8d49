"""UCI tabular datasets (red / white wine quality, Parkinsons) with the preprocessing of the DKEF base
code (Wenliang et al. 2019) that the paper's density-estimation experiments follow, every step a
parameter:

1. drop one of every pair of columns correlated above ``drop_correlated`` (Parkinsons: 0.98);
2. shuffle the rows with the seed; test = min(test_max, ⌊n·test_fraction⌋) rows, validation =
   ⌊(n − test)·val_fraction⌋ rows;
3. dequantise (wine): add U(−g, g) per column, g = its median gap between distinct values;
4. PCA-whiten with the training rows' mean and SVD (fitted on train only: no test statistics leak);
5. add N(0, noise_std²) noise (0.05).

Files are read from ``<raw_root>/uci`` in their UCI layouts (``;``-separated with a header for the
wines, ``,``-separated with ``name`` and ``status`` columns for parkinsons.data); labels (wine
``quality``, Parkinsons ``status``) are kept as labels, never as features.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from deqsm.data.base import (DATASETS, SPLITS, Context, DatasetSpec, Prepared, RawFiles, fetch, sha256_file,
                             shuffled_splits, split_sizes)

UCI = "https://archive.ics.uci.edu/ml/machine-learning-databases/"


@dataclass(frozen=True)
class CsvLayout:
    file: str
    url: str
    delimiter: str
    drop: tuple[str, ...]      # identifier columns, never features
    label: str | None          # kept as the label column


def read_csv(path: Path, layout: CsvLayout) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """(feature names, features (N, D) float64, labels or None), checking the file has the UCI layout."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f, delimiter=layout.delimiter) if r]
    if not rows:
        raise ValueError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]
    expected = [c for c in (*layout.drop, layout.label) if c]
    if absent := [c for c in expected if c not in header]:
        raise ValueError(f"{path}: columns {absent} not in its header {header[:6]}...: is it the UCI "
                         f"{layout.file} ({layout.delimiter!r}-separated, with a header)?")
    features = [h for h in header if h not in expected]
    try:
        table = {h: np.array([float(r[i]) for r in rows[1:]]) for i, h in enumerate(header) if h not in layout.drop}
    except (ValueError, IndexError) as err:
        raise ValueError(f"{path}: not a numeric {layout.delimiter!r}-separated table ({err})") from None
    x = np.stack([table[h] for h in features], 1)
    y = table[layout.label].astype(np.int64) if layout.label else None
    return features, x, y


def correlated_columns(x: np.ndarray, threshold: float) -> list[int]:
    """Columns to drop so that no two kept ones have |correlation| > threshold (the earlier one goes)."""
    keep = list(range(x.shape[1]))
    while True:
        c = np.abs(np.corrcoef(x[:, keep], rowvar=False))
        hits = [j for j in range(len(keep)) if np.sum(c[j] > threshold) > 1]
        if not hits:
            return sorted(set(range(x.shape[1])) - set(keep))
        del keep[hits[0]]


def dequantise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gaps = np.array([np.median(np.diff(np.unique(col))) if len(np.unique(col)) > 1 else 0.0 for col in x.T])
    return x + rng.uniform(-1, 1, x.shape) * gaps


def pca_whitening(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, W) with (train − mean) W having identity covariance (W = V S⁻¹ √n from the SVD)."""
    mean = train.mean(0)
    _, s, vt = np.linalg.svd(train - mean, full_matrices=False)
    if s.min() <= 1e-10 * s.max() or len(s) < train.shape[1]:
        raise ValueError("the training columns are (nearly) linearly dependent: whitening is undefined; "
                         "lower drop_correlated or add rows")
    return mean, vt.T / s * np.sqrt(len(train))


class TabularSpec(DatasetSpec):
    """The DKEF preprocessing (module docstring); subclasses fix the file layout and the defaults."""

    drop_correlated: float | None = Field(None, gt=0, le=1, description="|corr| threshold; null: keep all")
    dequantize: bool = False
    whiten: bool = True
    noise_std: float = Field(0.05, ge=0)
    test_fraction: float = Field(0.1, gt=0, lt=1)
    test_max: int | None = Field(1000, ge=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    dtype: Literal["float32", "float64"] = "float32"

    def layout(self) -> CsvLayout:
        raise NotImplementedError

    def raw_files(self, raw_root: Path) -> RawFiles:
        return RawFiles(raw_root / "uci", ((self.layout().file,),))

    def load(self, ctx: Context) -> Prepared:
        from torchvision.datasets.utils import download_url

        layout, files = self.layout(), self.raw_files(ctx.raw_root)
        fetch(ctx, files, lambda: download_url(layout.url, str(files.folder), layout.file))
        path = files.folder / layout.file
        names, x, y = read_csv(path, layout)
        dropped = correlated_columns(x, self.drop_correlated) if self.drop_correlated is not None else []
        columns = [c for j, c in enumerate(names) if j not in dropped]
        x = np.delete(x, dropped, axis=1)
        idx = shuffled_splits(len(x), split_sizes(len(x), self.val_fraction, self.test_fraction, self.test_max), ctx.rng(0))
        if self.dequantize:
            x = dequantise(x, ctx.rng(1))
        parts = {s: x[idx[s]] for s in SPLITS}
        info: dict = {"dropped_columns": [names[j] for j in dropped]}
        if self.whiten:
            mean, w = pca_whitening(parts["train"])
            parts = {s: (v - mean) @ w for s, v in parts.items()}
            info["whitening"] = {"mean": mean.tolist(), "matrix": w.tolist(), "note": "x_white = (x - mean) @ matrix"}
        noise = ctx.rng(2)
        parts = {s: (v + self.noise_std * noise.standard_normal(v.shape)).astype(self.dtype) for s, v in parts.items()}
        labels = None if y is None else {s: y[idx[s]] for s in SPLITS}
        return Prepared(x=parts, y=labels, columns=columns, sources={f"uci/{layout.file}": sha256_file(path)}, info=info)


@DATASETS.register("redwine")
class RedWine(TabularSpec):
    """winequality-red.csv (1,599 × 11 features + quality)."""

    dequantize: bool = True

    def layout(self) -> CsvLayout:
        return CsvLayout("winequality-red.csv", UCI + "wine-quality/winequality-red.csv", ";", (), "quality")


@DATASETS.register("whitewine")
class WhiteWine(TabularSpec):
    """winequality-white.csv (4,898 × 11 features + quality)."""

    dequantize: bool = True

    def layout(self) -> CsvLayout:
        return CsvLayout("winequality-white.csv", UCI + "wine-quality/winequality-white.csv", ";", (), "quality")


@DATASETS.register("parkinsons")
class Parkinsons(TabularSpec):
    """parkinsons.data (195 voice recordings × 22 features + status); ``file: parkinsons_updrs.data``
    reads the telemonitoring set (5,875 rows) the DKEF code used, dropping subject#, age and sex."""

    file: Literal["parkinsons.data", "parkinsons_updrs.data"] = "parkinsons.data"
    drop_correlated: float | None = Field(0.98, gt=0, le=1)

    def layout(self) -> CsvLayout:
        if self.file == "parkinsons.data":
            return CsvLayout(self.file, UCI + "parkinsons/parkinsons.data", ",", ("name",), "status")
        return CsvLayout(self.file, UCI + "parkinsons/telemonitoring/parkinsons_updrs.data", ",",
                         ("subject#", "age", "sex"), None)
