"""Parquet + manifest: a round trip equals the source arrays bit for bit, an altered or truncated file is
refused with an error naming it, streaming matches whole reads, and writes are atomic."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import deqsm.data.store as store
from deqsm.data import (ChecksumError, Prepared, PreparedWriter, iter_batches, load_split, load_splits,
                        read_manifest, write_prepared)


def make(kind, n=(37, 11, 13), seed=0):
    rng = np.random.default_rng(seed)
    sizes = dict(zip(("train", "val", "test"), n))
    if kind == "uint8_images":
        x = {s: rng.integers(0, 256, (k, 3, 5, 4), dtype=np.uint8) for s, k in sizes.items()}
    elif kind == "float_images":
        x = {s: rng.standard_normal((k, 1, 8, 8)).astype(np.float32) for s, k in sizes.items()}
    else:
        # float64 over many orders of magnitude, down to subnormals
        x = {s: rng.standard_normal((k, 3)) * 1e-3 ** rng.integers(0, 104, (k, 3)) for s, k in sizes.items()}
    y = {s: rng.integers(-5, 1 << 40, k) for s, k in sizes.items()}
    columns = ["fixed acidity", "MDVP:Fo(Hz)", "x2"] if kind == "table" else None
    return Prepared(x=x, y=y, columns=columns, sources={"raw/file": "0" * 64}, info={"note": kind})


@pytest.mark.parametrize("kind", ["uint8_images", "float_images", "table"])
def test_round_trip_is_bit_for_bit(tmp_path, kind):
    p = make(kind)
    write_prepared(tmp_path, "ds", p, preprocessing={"seed": 3})
    for s in ("train", "val", "test"):
        got = load_split(tmp_path, "ds", s)
        assert got.x.numpy().dtype == p.x[s].dtype and got.x.numpy().tobytes() == p.x[s].tobytes()
        assert got.y.numpy().tobytes() == p.y[s].tobytes()
        streamed = list(iter_batches(tmp_path, "ds", s, batch_size=5))
        assert len(streamed) == -(-len(p.x[s]) // 5)
        assert torch.cat([b.x for b in streamed]).numpy().tobytes() == p.x[s].tobytes()
        assert torch.cat([b.y for b in streamed]).numpy().tobytes() == p.y[s].tobytes()


def test_manifest_and_schema_record_shape_rows_sources_and_versions(tmp_path):
    write_prepared(tmp_path, "imgs", make("float_images"), dataset="digits", preprocessing={"seed": 3, "scale": "unit"})
    m = read_manifest(tmp_path, "imgs")
    assert m["shape"] == [1, 8, 8] and m["dtype"] == "float32" and m["kind"] == "image" and m["dataset"] == "digits"
    assert {s: v["rows"] for s, v in m["splits"].items()} == {"train": 37, "val": 11, "test": 13}
    assert m["source"]["files"] == {"raw/file": "0" * 64} and m["preprocessing"] == {"seed": 3, "scale": "unit"}
    assert {"pyarrow", "torch", "numpy", "python"} <= set(m["versions"]) and m["info"] == {"note": "float_images"}
    schema = pq.read_schema(tmp_path / "imgs" / "train.parquet")
    assert json.loads(schema.metadata[b"deqsm.shape"]) == [1, 8, 8]
    assert schema.field("image").type.shape == [1, 8, 8] and str(schema.field("label").type) == "int64"
    write_prepared(tmp_path, "tab", make("table"))
    tab = pq.read_schema(tmp_path / "tab" / "val.parquet")
    assert tab.names == ["fixed acidity", "MDVP:Fo(Hz)", "x2", "label"] and str(tab.field("x2").type) == "double"


def test_load_splits_gives_float_features(tmp_path):
    write_prepared(tmp_path, "u8", make("uint8_images"))
    splits = load_splits(tmp_path, "u8")
    assert set(splits) == {"train", "val", "test"} and splits["train"].dtype == torch.float32
    assert torch.equal(splits["val"], load_split(tmp_path, "u8", "val").x.float())


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_altered_or_truncated_file_is_refused_by_name(tmp_path, damage):
    write_prepared(tmp_path, "ds", make("float_images"))
    path = tmp_path / "ds" / "train.parquet"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[:-100]
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=f"checksum mismatch for {path}"):
        load_split(tmp_path, "ds", "train")
    with pytest.raises(ChecksumError, match=str(path)):
        next(iter_batches(tmp_path, "ds", "train"))
    load_split(tmp_path, "ds", "val")  # the other files are fine


def test_missing_prepared_data_says_to_run_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="no prepared dataset 'nope'.*prepare stage"):
        load_split(tmp_path, "nope", "train")
    write_prepared(tmp_path, "ds", make("table"))
    with pytest.raises(ValueError, match="unknown split 'dev'.*train, val, test"):
        load_split(tmp_path, "ds", "dev")
    (tmp_path / "ds" / "test.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="test.parquet is missing"):
        load_split(tmp_path, "ds", "test")


def test_failed_write_leaves_no_partial_output_and_keeps_the_earlier_one(tmp_path, monkeypatch):
    good = make("table", seed=1)
    write_prepared(tmp_path, "ds", good)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}
    real = store._write_parquet
    calls = []

    def failing(table, path, row_bytes):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(table, path, row_bytes)

    monkeypatch.setattr(store, "_write_parquet", failing)
    with pytest.raises(OSError, match="disk full"):
        with PreparedWriter(tmp_path) as w:
            w.write("new", make("table"), dataset="x", preprocessing={})
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        write_prepared(tmp_path, "ds", make("table", seed=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]         # no "new", no hidden staging folders
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()} == before
    assert load_split(tmp_path, "ds", "train").x.numpy().tobytes() == good.x["train"].tobytes()


def test_rewrite_replaces_the_folder_whole(tmp_path):
    write_prepared(tmp_path, "ds", make("uint8_images", seed=1))
    (tmp_path / "ds" / "stray.txt").write_text("left by hand")
    write_prepared(tmp_path, "ds", make("table", seed=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["manifest.json", "test.parquet", "train.parquet",
                                                                 "val.parquet"]
    assert read_manifest(tmp_path, "ds")["kind"] == "table"


def test_bad_prepared_inputs_are_refused(tmp_path):
    p = make("table")
    with pytest.raises(ValueError, match="split 'val' is empty"):
        Prepared(x={**p.x, "val": p.x["val"][:0]}, y=None, columns=p.columns)
    with pytest.raises(ValueError, match="may not be called 'label'"):
        write_prepared(tmp_path, "ds", Prepared(x=p.x, y=p.y, columns=["a", "label", "b"]))
    with pytest.raises(ValueError, match="must match"):
        write_prepared(tmp_path, "../escape", p)
    assert list(tmp_path.iterdir()) == []
