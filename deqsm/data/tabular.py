"""UCI tabular datasets, every preprocessing step a parameter.

Red / white wine quality and Parkinsons follow the DKEF base code (Wenliang et al. 2019) that the paper's
density-estimation experiments follow:

1. drop one of every pair of columns correlated above ``drop_correlated`` (Parkinsons: 0.98);
2. shuffle the rows with the seed; test = min(test_max, ⌊n·test_fraction⌋) rows, validation =
   ⌊(n − test)·val_fraction⌋ rows;
3. dequantise (wine): add U(−g, g) per column, g = its median gap between distinct values;
4. PCA-whiten with the training rows' mean and SVD (fitted on train only: no test statistics leak);
5. add N(0, noise_std²) noise (0.05).

HEPMASS and MiniBooNE take the row and column selection of MAF (Papamakarios et al. 2017), which the
density-estimation literature uses, then steps 2 (MiniBooNE; HEPMASS keeps its test file), 4 and 5:

- ``events: signal`` keeps the signal events only (HEPMASS: label 1; MiniBooNE: the first of the two
  counts on the file's first line), MAF's choice; ``all`` keeps both, the class as the label;
- MiniBooNE drops the rows holding ``outlier_value`` (−999, its marker of a failed event);
- ``max_repeats``: drop every column whose smallest value occurs in more than 5 rows (MAF's rule, which
  removes the discrete and clipped columns: the constant ``mass`` of HEPMASS's 1000 files among them;
  MAF keeps 21 of HEPMASS's 28 columns and 43 of MiniBooNE's 50); ``repeated_value: most_common`` counts
  each column's most common value instead. The counts are taken over every row read (HEPMASS: of its
  train file), as the correlations of step 1 are.

Files are read from ``<raw_root>/uci`` in their UCI layouts (``;``-separated with a header for the
wines, ``,``-separated with ``name`` and ``status`` columns for parkinsons.data; HEPMASS's
``1000_train.csv`` and ``1000_test.csv``, plain or as served, .gz, with a ``# label,f0,…,f26,mass``
header; ``MiniBooNE_PID.txt``, two counts then whitespace-separated rows of 50 numbers); labels (wine
``quality``, Parkinsons ``status``, HEPMASS / MiniBooNE class with ``events: all``) are kept as labels,
never as features.
"""
from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from deqsm.data.base import (DATASETS, SPLITS, Context, DatasetSpec, Prepared, RawFiles, fetch, sha256_file,
                             shuffled_splits, split_sizes)

UCI = "https://archive.ics.uci.edu/ml/machine-learning-databases/"
MINIBOONE_FEATURES = 50


@dataclass(frozen=True)
class UciFile:
    """One file a UCI dataset reads: the names accepted for it in ``<raw_root>/uci``, and where the UCI
    serves it (downloaded under the URL's own file name, one of ``names``)."""

    names: tuple[str, ...]
    url: str

    def __post_init__(self) -> None:
        if self.url.rsplit("/", 1)[-1] not in self.names:
            raise ValueError(f"{self.url} is saved under a name not among {self.names}")


@dataclass(frozen=True)
class CsvLayout:
    file: str
    url: str
    delimiter: str
    drop: tuple[str, ...]      # identifier columns, never features
    label: str | None          # kept as the label column


@dataclass
class Table:
    """Rows read from a dataset's files: features (N, D) float64, their names, optional labels."""

    columns: list[str]
    x: np.ndarray
    y: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


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
    if not np.isfinite(x).all():  # float() reads "nan" and "inf" without complaint
        row = int(np.flatnonzero(~np.isfinite(x).all(1))[0])
        raise ValueError(f"{path}: row {row + 2} holds a non-finite value (NaN or Inf): is the file complete?")
    y = table[layout.label].astype(np.int64) if layout.label else None
    return features, x, y


def read_numbers(path: Path, what: str, delimiter: str | None = None) -> np.ndarray:
    """The rows after the first line of ``path`` (.gz read as such) as a (N, D) float64 array, every row
    of one width and every value finite, else a ValueError naming the file and ``what`` it should be."""
    try:
        x = np.loadtxt(path, delimiter=delimiter, skiprows=1, comments=None, ndmin=2, dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path}: not {what} ({err})") from None
    if len(x) == 0:
        raise ValueError(f"{path}: no rows after its first line; expected {what}")
    if not np.isfinite(x).all():
        row = int(np.flatnonzero(~np.isfinite(x).all(1))[0])
        raise ValueError(f"{path}: row {row + 2} holds a non-finite value; expected {what}")
    return x


def first_line(path: Path) -> str:
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
        return f.readline().strip()


def read_hepmass(path: Path) -> Table:
    """A HEPMASS CSV: header ``# label,f0,…,f26,mass``, then the label (1 signal, 0 background) and the
    features of one event per row."""
    header = [h.strip() for h in first_line(path).split(",")]
    if header[0].lstrip("#").strip() != "label" or len(header) < 2:
        raise ValueError(f"{path}: header {','.join(header[:3])!r}... does not start with '# label': is it the "
                         f"UCI HEPMASS {path.name} (','-separated, header '# label,f0,...,f26,mass')?")
    table = read_numbers(path, f"a ','-separated table of the {len(header)} columns its header names", ",")
    if table.shape[1] != len(header):
        raise ValueError(f"{path}: rows of {table.shape[1]} values, its header names {len(header)} columns")
    if not np.isin(table[:, 0], (0, 1)).all():
        raise ValueError(f"{path}: labels other than 0 and 1 in its first column")
    return Table(header[1:], table[:, 1:], table[:, 0].astype(np.int64))


def read_miniboone(path: Path) -> Table:
    """MiniBooNE_PID.txt: a line with the signal and background counts, then one event per row (signal
    first), 50 whitespace-separated numbers each; the label is 1 for signal."""
    counts = first_line(path).split()
    if len(counts) != 2 or not all(c.isdigit() for c in counts):
        raise ValueError(f"{path}: its first line {first_line(path)[:40]!r} is not two counts (signal events, "
                         "background events): is it the UCI MiniBooNE_PID.txt?")
    n_signal, n_background = map(int, counts)
    x = read_numbers(path, f"rows of {MINIBOONE_FEATURES} whitespace-separated numbers")
    if x.shape != (n_signal + n_background, MINIBOONE_FEATURES):
        raise ValueError(f"{path}: {x.shape[0]} rows of {x.shape[1]} numbers; its first line announces "
                         f"{n_signal} + {n_background} rows of {MINIBOONE_FEATURES}")
    y = np.repeat(np.array([1, 0], np.int64), [n_signal, n_background])
    return Table([f"f{j}" for j in range(MINIBOONE_FEATURES)], x, y)


def correlated_columns(x: np.ndarray, threshold: float) -> list[int]:
    """Columns to drop so that no two kept ones have |correlation| > threshold (the earlier one goes)."""
    keep = list(range(x.shape[1]))
    while True:
        c = np.abs(np.corrcoef(x[:, keep], rowvar=False))
        hits = [j for j in range(len(keep)) if np.sum(c[j] > threshold) > 1]
        if not hits:
            return sorted(set(range(x.shape[1])) - set(keep))
        del keep[hits[0]]


def repeated_columns(x: np.ndarray, max_repeats: int, value: Literal["smallest", "most_common"]) -> list[int]:
    """Columns whose smallest (MAF's rule) or most common value occurs in more than ``max_repeats`` rows."""
    def count(col: np.ndarray) -> int:
        if value == "smallest":
            return int(np.count_nonzero(col == col.min()))
        return int(np.unique(col, return_counts=True)[1].max())
    return [j for j, col in enumerate(x.T) if count(col) > max_repeats]


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


class UciSpec(DatasetSpec):
    """What every UCI dataset shares: its files in ``<raw_root>/uci``, the column filters, whitening,
    noise and the stored dtype (module docstring); subclasses read the files and split the rows."""

    max_repeats: int | None = Field(None, ge=1, description="drop columns whose repeated_value occurs in more "
                                                            "than this many rows (MAF: 5); null: keep all")
    repeated_value: Literal["smallest", "most_common"] = Field(
        "smallest", description="the value max_repeats counts: each column's smallest (MAF) or most common")
    drop_correlated: float | None = Field(None, gt=0, le=1, description="|corr| threshold; null: keep all")
    whiten: bool = True
    noise_std: float = Field(0.05, ge=0)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    dtype: Literal["float32", "float64"] = "float32"

    def files(self) -> tuple[UciFile, ...]:
        raise NotImplementedError

    def raw_files(self, raw_root: Path) -> RawFiles:
        return RawFiles(raw_root / "uci", tuple(f.names for f in self.files()))

    def fetch_files(self, ctx: Context) -> tuple[list[Path], dict[str, str]]:
        """The path of each file (downloaded first when missing and allowed), and their sha256 by name."""
        from torchvision.datasets.utils import download_url

        files = self.raw_files(ctx.raw_root)

        def download() -> None:
            for f in self.files():
                if not any((files.folder / n).exists() for n in f.names):
                    download_url(f.url, str(files.folder), f.url.rsplit("/", 1)[-1])

        fetch(ctx, files, download)
        paths = [files.found(names) for names in files.needed]
        return paths, {f"uci/{p.name}": sha256_file(p) for p in paths}

    def select_columns(self, ctx: Context, table: Table) -> tuple[list[int], list[str]]:
        """(kept column indices, dropped column names): repeated values first, then correlations."""
        x = table.x
        dropped = repeated_columns(x, self.max_repeats, self.repeated_value) if self.max_repeats is not None else []
        keep = [j for j in range(x.shape[1]) if j not in dropped]
        if self.drop_correlated is not None and keep:
            dropped += [keep[j] for j in correlated_columns(x[:, keep], self.drop_correlated)]
            keep = [j for j in keep if j not in dropped]
        if not keep:
            raise ValueError(f"dataset {ctx.name!r}: every one of its {x.shape[1]} columns is dropped; "
                             "raise max_repeats or drop_correlated, or set them to null")
        return keep, [table.columns[j] for j in sorted(dropped)]

    def finish(self, ctx: Context, parts: dict[str, np.ndarray], labels: dict[str, np.ndarray] | None,
               columns: list[str], sources: dict[str, str], info: dict[str, Any]) -> Prepared:
        """Whiten with the train rows' statistics, add the noise, cast."""
        if self.whiten:
            mean, w = pca_whitening(parts["train"])
            parts = {s: (v - mean) @ w for s, v in parts.items()}
            info["whitening"] = {"mean": mean.tolist(), "matrix": w.tolist(), "note": "x_white = (x - mean) @ matrix"}
        noise = ctx.rng(2)
        parts = {s: (v + self.noise_std * noise.standard_normal(v.shape)).astype(self.dtype) for s, v in parts.items()}
        return Prepared(x=parts, y=labels, columns=columns, sources=sources, info=info)


class TabularSpec(UciSpec):
    """One file whose rows are shuffled into the three splits (module docstring, steps 1–5); subclasses
    fix the file layout and the defaults."""

    dequantize: bool = False
    test_fraction: float = Field(0.1, gt=0, lt=1)
    test_max: int | None = Field(1000, ge=1)

    def layout(self) -> CsvLayout:
        raise NotImplementedError

    def files(self) -> tuple[UciFile, ...]:
        layout = self.layout()
        return (UciFile((layout.file,), layout.url),)

    def read(self, paths: list[Path]) -> Table:
        return Table(*read_csv(paths[0], self.layout()))

    def load(self, ctx: Context) -> Prepared:
        paths, sources = self.fetch_files(ctx)
        table = self.read(paths)
        keep, dropped = self.select_columns(ctx, table)
        x = table.x[:, keep]
        idx = shuffled_splits(len(x), split_sizes(len(x), self.val_fraction, self.test_fraction, self.test_max), ctx.rng(0))
        if self.dequantize:
            x = dequantise(x, ctx.rng(1))
        labels = None if table.y is None else {s: table.y[idx[s]] for s in SPLITS}
        return self.finish(ctx, {s: x[idx[s]] for s in SPLITS}, labels, [table.columns[j] for j in keep], sources,
                           {"dropped_columns": dropped, **table.info})


def select_events(path: Path, table: Table, events: str, **info: Any) -> Table:
    """``events: signal``: the rows labelled 1, without labels; ``all``: every row, the class as label."""
    if events == "all":
        return Table(table.columns, table.x, table.y, info)
    signal = table.y == 1
    if not signal.any():
        raise ValueError(f"{path}: no signal events (label 1) left to keep")
    return Table(table.columns, table.x[signal], None, info)


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


@DATASETS.register("hepmass")
class HepMass(UciSpec):
    """HEPMASS's 1000 files (1000_train.csv, 1000_test.csv, or their .gz): 27 features and the mass per
    event, labelled signal or background. MAF's selection: the signal events and (on MAF's files) 21 of
    the 28 columns. The test split is the test file; ⌊n·val_fraction⌋ validation rows come from the
    train file."""

    events: Literal["signal", "all"] = Field("signal", description="signal: the label-1 rows (MAF); all: every "
                                                                   "row, the class (1 signal) as the label")
    max_repeats: int | None = Field(5, ge=1)

    def files(self) -> tuple[UciFile, ...]:
        return tuple(UciFile((f, f + ".gz"), f"{UCI}00347/{f}.gz") for f in ("1000_train.csv", "1000_test.csv"))

    def load(self, ctx: Context) -> Prepared:
        paths, sources = self.fetch_files(ctx)
        train, test = (select_events(p, read_hepmass(p), self.events) for p in paths)
        if test.columns != train.columns:
            raise ValueError(f"{paths[1]}: columns {test.columns} differ from those of {paths[0]} ({train.columns})")
        keep, dropped = self.select_columns(ctx, train)
        rng = ctx.rng(0)
        idx = shuffled_splits(len(train.x), split_sizes(len(train.x), self.val_fraction, 0.0), rng)
        idx["test"] = rng.permutation(len(test.x))
        sets = {"train": train, "val": train, "test": test}
        parts = {s: sets[s].x[idx[s]][:, keep] for s in SPLITS}
        labels = None if self.events == "signal" else {s: sets[s].y[idx[s]] for s in SPLITS}
        return self.finish(ctx, parts, labels, [train.columns[j] for j in keep], sources, {"dropped_columns": dropped})


@DATASETS.register("miniboone")
class MiniBooNE(TabularSpec):
    """MiniBooNE_PID.txt (36,499 signal then 93,565 background events × 50 features). MAF's selection: the
    signal events without the −999 outlier rows and (on MAF's files) 43 of the 50 columns; test =
    ⌊n·test_fraction⌋ rows (no test_max), validation ⌊(n − test)·val_fraction⌋."""

    events: Literal["signal", "all"] = Field("signal", description="signal: the first count's rows (MAF); "
                                                                   "all: both, the class kept as the label")
    outlier_value: float | None = Field(-999.0, description="drop the rows holding this value; null: keep all")
    max_repeats: int | None = Field(5, ge=1)
    test_max: int | None = Field(None, ge=1)

    def files(self) -> tuple[UciFile, ...]:
        return (UciFile(("MiniBooNE_PID.txt",), UCI + "00199/MiniBooNE_PID.txt"),)

    def read(self, paths: list[Path]) -> Table:
        table = read_miniboone(paths[0])
        bad = (table.x == self.outlier_value).any(1) if self.outlier_value is not None else np.zeros(len(table.x), bool)
        if bad.all():
            raise ValueError(f"{paths[0]}: every row holds the outlier_value {self.outlier_value}")
        table = Table(table.columns, table.x[~bad], table.y[~bad])
        return select_events(paths[0], table, self.events, outlier_rows_dropped=int(bad.sum()))
