"""Prepared datasets on disk: ``<root>/<name>/{train,val,test}.parquet`` and ``manifest.json``.

Images are one fixed-shape tensor column ``image`` (uint8 or float32, shape (C, H, W) in the Arrow type
and in the schema metadata); vectors are one float column per feature; labels, when present, are an
int64 column ``label``. The manifest records rows per split, the schema, the sample shape, the source
files with their sha256, the preprocessing parameters, package versions and each Parquet file's
sha256, which the readers check before returning anything: an altered or truncated file is refused
with a :class:`ChecksumError` naming it.

Writes are atomic: datasets are staged in hidden folders under ``root`` and renamed into place only
when all of them are complete, so a failure leaves no partial output and keeps the earlier one.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from deqsm.data.base import SPLITS, Prepared, sha256_file

FORMAT = "deqsm.prepared/1"
IMAGE, LABEL = "image", "label"
ROW_GROUP_BYTES = 64 << 20  # row groups of about this size: the unit of streaming reads
PACKAGES = ("numpy", "pyarrow", "torch", "torchvision", "scikit-learn", "pillow", "pydantic", "deqsm")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ChecksumError(ValueError):
    """A prepared file does not match its manifest (altered, truncated or replaced)."""


@dataclass
class Split:
    """Features (N, ...) and labels (N,) or None, as tensors."""

    x: torch.Tensor
    y: torch.Tensor | None


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise ValueError(f"dataset name {name!r} must match {NAME.pattern} (it names a folder)")
    return name


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _table(prepared: Prepared, split: str) -> pa.Table:
    x = prepared.x[split]
    if prepared.columns is None:
        shape = list(x.shape[1:])
        storage = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), math.prod(shape))
        cols = {IMAGE: pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.from_numpy_dtype(x.dtype), shape), storage)}
    else:
        if LABEL in prepared.columns:
            raise ValueError(f"a feature column may not be called {LABEL!r}")
        cols = {c: pa.array(x[:, j]) for j, c in enumerate(prepared.columns)}
    if prepared.y is not None:
        cols[LABEL] = pa.array(prepared.y[split].astype(np.int64))
    meta = {"deqsm.kind": "image" if prepared.columns is None else "table", "deqsm.shape": json.dumps(list(x.shape[1:]))}
    return pa.table(cols).replace_schema_metadata(meta)


def _write_parquet(table: pa.Table, path: Path, row_bytes: int) -> None:
    pq.write_table(table, path, compression="zstd", row_group_size=max(1, ROW_GROUP_BYTES // max(1, row_bytes)))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class PreparedWriter:
    """Stage prepared datasets, then move them all into place (``with`` commits on success, else aborts)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.staged: dict[str, Path] = {}
        self.created_root = False

    def write(self, name: str, prepared: Prepared, *, dataset: str, preprocessing: dict[str, Any]) -> dict[str, Any]:
        """Write one dataset into a hidden staging folder; returns its manifest."""
        check_name(name)
        if name in self.staged:
            raise ValueError(f"dataset {name!r} is already staged in this writer")
        if not self.root.exists():
            self.root.mkdir(parents=True)
            self.created_root = True
        for stale in self.root.glob(f".{name}.tmp-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".{name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()  # (not mkdtemp: its 0700 mode would stick to the published folder)
        self.staged[name] = tmp
        x0 = prepared.x["train"]
        row_bytes = x0[0].nbytes
        splits, schema = {}, None
        for split in SPLITS:
            table = _table(prepared, split)
            schema = {f.name: str(f.type) for f in table.schema}
            _write_parquet(table, tmp / f"{split}.parquet", row_bytes)
            splits[split] = {"file": f"{split}.parquet", "rows": table.num_rows,
                             "bytes": (tmp / f"{split}.parquet").stat().st_size,
                             "sha256": sha256_file(tmp / f"{split}.parquet")}
        manifest = {
            "format": FORMAT, "name": name, "dataset": dataset,
            "kind": "image" if prepared.columns is None else "table",
            "shape": list(x0.shape[1:]), "dtype": str(x0.dtype), "columns": prepared.columns,
            "labels": prepared.y is not None, "schema": schema, "splits": splits,
            "source": {"files": prepared.sources}, "preprocessing": preprocessing, "info": prepared.info,
            "versions": package_versions(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return manifest

    def commit(self) -> dict[str, Path]:
        done = {}
        for name, tmp in self.staged.items():
            dest = self.root / name
            old = None
            if dest.exists():
                old = self.root / f".{name}.old-{uuid.uuid4().hex[:12]}"
                dest.rename(old)
            try:
                tmp.rename(dest)
            except OSError:
                if old is not None:
                    old.rename(dest)
                raise
            if old is not None:
                shutil.rmtree(old)
            done[name] = dest
        self.staged.clear()
        return done

    def abort(self) -> None:
        for tmp in self.staged.values():
            shutil.rmtree(tmp, ignore_errors=True)
        self.staged.clear()
        if self.created_root and not any(self.root.iterdir()):
            self.root.rmdir()

    def __enter__(self) -> "PreparedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_prepared(root: str | Path, name: str, prepared: Prepared, *, dataset: str | None = None,
                   preprocessing: dict[str, Any] | None = None) -> Path:
    """Write one dataset atomically; returns its folder."""
    with PreparedWriter(root) as writer:
        writer.write(name, prepared, dataset=dataset or name, preprocessing=preprocessing or {})
    return Path(root) / name


def read_manifest(root: str | Path, name: str) -> dict[str, Any]:
    path = Path(root) / check_name(name) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no prepared dataset {name!r}: {path} is missing; run the prepare stage "
                                f"(dvc repro prepare, or python -m pipelines.prepare)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ChecksumError(f"{path} is not valid JSON ({err}): re-run the prepare stage") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def verified_file(root: str | Path, name: str, split: str, manifest: dict[str, Any] | None = None,
                  verify: bool = True) -> Path:
    """The split's Parquet file, after checking it against the manifest's sha256."""
    manifest = manifest or read_manifest(root, name)
    if split not in manifest["splits"]:
        known = ", ".join(s for s in SPLITS if s in manifest["splits"])
        raise ValueError(f"unknown split {split!r} of {name!r}; known: {known}")
    entry = manifest["splits"][split]
    path = Path(root) / name / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (listed in the manifest): re-run the prepare stage")
    if verify and (digest := sha256_file(path)) != entry["sha256"]:
        raise ChecksumError(f"checksum mismatch for {path}: sha256 {digest}, manifest {entry['sha256']} "
                            f"({path.stat().st_size} of {entry['bytes']} bytes); the file was altered or "
                            f"truncated: re-run the prepare stage")
    return path


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _to_split(data: pa.Table | pa.RecordBatch, manifest: dict[str, Any]) -> Split:
    if manifest["kind"] == "image":
        col = data.column(IMAGE)
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        x = col.storage.flatten().to_numpy(zero_copy_only=False).reshape(-1, *manifest["shape"])
    else:
        x = np.stack([data.column(c).to_numpy() for c in manifest["columns"]], 1).reshape(-1, *manifest["shape"])
    y = data.column(LABEL).to_numpy() if manifest["labels"] else None
    return Split(_tensor(x), None if y is None else _tensor(y))


def load_split(root: str | Path, name: str, split: str, *, verify: bool = True) -> Split:
    """One split as tensors in their stored dtype (uint8 or float), checksum-verified first."""
    manifest = read_manifest(root, name)
    path = verified_file(root, name, split, manifest, verify)
    table = pq.read_table(path)
    if table.num_rows != manifest["splits"][split]["rows"]:
        raise ChecksumError(f"{path}: {table.num_rows} rows, manifest says {manifest['splits'][split]['rows']}")
    return _to_split(table, manifest)


def iter_batches(root: str | Path, name: str, split: str, batch_size: int = 1024, *,
                 verify: bool = True) -> Iterator[Split]:
    """Stream a split in batches of ``batch_size`` rows (for data larger than memory); the whole file's
    checksum is verified (read in chunks) before the first batch."""
    manifest = read_manifest(root, name)
    path = verified_file(root, name, split, manifest, verify)
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        yield _to_split(batch, manifest)


def load_splits(root: str | Path, name: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """{train, val, test} → features as ``dtype`` (what training code consumes; uint8 pixels keep their values)."""
    return {s: load_split(root, name, s).x.to(dtype) for s in SPLITS}


def true_density(root: str | Path, name: str, dtype: torch.dtype = torch.float64) -> torch.distributions.Distribution | None:
    """The data's true distribution (generated datasets; None otherwise), for exact scores and log p."""
    spec = read_manifest(root, name)["info"].get("true_density")
    if spec is None:
        return None
    t = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
    D = torch.distributions
    if spec["family"] == "gaussian":
        return D.MultivariateNormal(t(spec["mean"]), covariance_matrix=t(spec["covariance"]))
    if spec["family"] == "gaussian_mixture":
        means, stds = t(spec["means"]), t(spec["stds"])
        return D.MixtureSameFamily(D.Categorical(probs=t(spec["weights"])),
                                   D.Independent(D.Normal(means, stds[:, None].expand_as(means)), 1))
    raise ValueError(f"{name}: unknown true_density family {spec['family']!r}")
