"""The real loaders (MNIST, CIFAR-10, CelebA 64, UCI wine, Parkinsons, HEPMASS and MiniBooNE) on small
files written here in the real formats — IDX (gz and uncompressed), CIFAR pickle batches, a CelebA image
folder with its list files, UCI CSVs, HEPMASS CSVs (plain and .gz), MiniBooNE_PID.txt — through the same
code that reads the real datasets; and missing files fail with an error naming the dataset, the folder
and the files, leaving no output."""
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deqsm.data import (Context, DataSettings, MissingDataError, RawFiles, load_split, prepare_datasets,
                        read_manifest)
from deqsm.data.base import fetch
from deqsm.data.images import CIFAR10_CLASSES
from deqsm.data.tabular import UCI


def prepare(tmp_path, datasets, **data):
    settings = DataSettings(root=str(tmp_path / "prepared"), raw_root=str(tmp_path / "raw"), datasets=datasets, **data)
    prepare_datasets(settings)
    return tmp_path / "prepared"


def split_arrays(root, name):
    return {s: load_split(root, name, s) for s in ("train", "val", "test")}


# --- MNIST: IDX files ------------------------------------------------------------------------------

def write_idx(path, array, gz):
    """An IDX file: magic (0, 0, 0x08 = uint8, ndim), big-endian int32 sizes, then the bytes."""
    data = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def write_mnist(raw, n_train, n_test, compression):
    folder = raw / "MNIST" / "raw"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (prefix, n, offset) in enumerate((("train", n_train, 0), ("t10k", n_test, 100))):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = offset + np.arange(n)       # an id per image, to check image/label pairs
        gz = compression == "gz" or (compression == "mixed" and i == 0)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", (images[:, 0, 0] % 10).astype(np.uint8), not gz)


@pytest.mark.parametrize("compression", ["gz", "raw", "mixed"])
def test_mnist_reads_idx_files_gzipped_or_not(tmp_path, compression):
    write_mnist(tmp_path / "raw", 30, 10, compression)
    root = prepare(tmp_path, {"mnist": {"scale": "raw", "val_fraction": 0.2}})
    s = split_arrays(root, "mnist")
    assert [len(s[k].x) for k in ("train", "val", "test")] == [24, 6, 10]
    assert s["train"].x.dtype.is_floating_point is False and tuple(s["train"].x.shape[1:]) == (1, 28, 28)
    ids = {k: s[k].x[:, 0, 0, 0].numpy().astype(int) for k in s}
    assert sorted(np.concatenate([ids["train"], ids["val"]])) == list(range(30))
    assert sorted(ids["test"]) == list(range(100, 110))
    for k in s:
        assert (s[k].y.numpy() == ids[k] % 10).all()
    files = read_manifest(root, "mnist")["source"]["files"]
    assert len(files) == 4 and all(k.startswith("MNIST/raw/") for k in files)


def test_mnist_dequantised_logit_pixels_invert_to_the_source(tmp_path):
    write_mnist(tmp_path / "raw", 12, 4, "gz")
    prepare(tmp_path, {"mnist": {"scale": "raw"}, "mnist_nice": {"dataset": "mnist", "dequantize": True,
                                                                 "logit_alpha": 1e-6},
                       "mnist_small": {"dataset": "mnist", "scale": "raw", "max_rows": 2}})
    small = split_arrays(tmp_path / "prepared", "mnist_small")
    assert [len(small[k].x) for k in ("train", "val", "test")] == [2, 1, 2]  # val: 10% of 12 rows
    raw, nice = (load_split(tmp_path / "prepared", n, "train") for n in ("mnist", "mnist_nice"))
    alpha = 1e-6
    u = (1 / (1 + np.exp(-nice.x.double().numpy())) - alpha) / (1 - 2 * alpha)
    assert np.array_equal(np.floor(u * 256 + 1e-6).clip(0, 255), raw.x.numpy())  # same rows, same split
    assert nice.x.dtype.is_floating_point and not np.array_equal(u * 256, raw.x.numpy())


# --- CIFAR-10: python pickle batches ---------------------------------------------------------------

def write_cifar(raw, per_batch=4, n_test=5):
    folder = raw / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)  # rows: 1024 red, 1024 green, 1024 blue
        data[:, 0] = 10 * b + np.arange(n)                       # red (0, 0): an id
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": [int(v) % 10 for v in data[:, 0]],
                         "filenames": [f"{name}_{i}.png" for i in range(n)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)


def test_cifar10_reads_pickle_batches(tmp_path):
    write_cifar(tmp_path / "raw")
    root = prepare(tmp_path, {"cifar10": {"scale": "raw", "verify_md5": False, "val_fraction": 0.25}})
    s = split_arrays(root, "cifar10")
    assert [len(s[k].x) for k in ("train", "val", "test")] == [15, 5, 5]
    assert tuple(s["test"].x.shape[1:]) == (3, 32, 32)
    ids = {k: s[k].x[:, 0, 0, 0].numpy().astype(int) for k in s}
    assert sorted(np.concatenate([ids["train"], ids["val"]])) == [10 * b + i for b in range(5) for i in range(4)]
    assert sorted(ids["test"]) == [50 + i for i in range(5)]
    assert all((s[k].y.numpy() == ids[k] % 10).all() for k in s)
    assert read_manifest(root, "cifar10")["info"]["classes"] == CIFAR10_CLASSES


def test_cifar10_with_md5_checks_refuses_unofficial_files(tmp_path):
    write_cifar(tmp_path / "raw")
    with pytest.raises(ValueError, match="cifar10.*published MD5s.*verify_md5: false"):
        prepare(tmp_path, {"gaussian": {}, "cifar10": {}})
    assert not (tmp_path / "prepared").exists()   # the gaussian, prepared first, is not published either


# --- CelebA: image folder and list files -----------------------------------------------------------

def write_celeba(raw, partition=(0, 0, 0, 1, 1, 2, 2)):  # (torchvision fails on a one-image split)
    folder = raw / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(partition))]
    colours = []
    for i, name in enumerate(names):
        img = np.zeros((218, 178, 3), np.uint8)
        img[...] = (0, 0, 255)                                      # outside the centre: cropped away
        colour = (20 * i + 10, 120, 200 - 20 * i)
        img[109 - 80:109 + 80, 89 - 80:89 + 80] = colour            # the centre 160×160 (crop: 140)
        Image.fromarray(img).save(folder / "img_align_celeba" / name, quality=100)
        colours.append(colour)
    lines = lambda rows: "".join(r + "\n" for r in rows)  # noqa: E731
    (folder / "list_eval_partition.txt").write_text(lines(f"{n} {p}" for n, p in zip(names, partition)))
    (folder / "identity_CelebA.txt").write_text(lines(f"{n} {i + 1}" for i, n in enumerate(names)))
    attrs = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Smiling"]
    (folder / "list_attr_celeba.txt").write_text(lines([str(len(names)), " ".join(attrs)]
                                                       + [f"{n}  -1  1 -1" for n in names]))
    (folder / "list_bbox_celeba.txt").write_text(lines([str(len(names)), "image_id x_1 y_1 width height"]
                                                       + [f"{n}    95  71 226 313" for n in names]))
    (folder / "list_landmarks_align_celeba.txt").write_text(lines(
        [str(len(names)), "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
                          "rightmouth_x rightmouth_y"] + [f"{n} 69  109  106  113   77  142   73  152  108  154"
                                                          for n in names]))
    return colours, partition


def test_celeba64_crops_140_and_resizes_to_64_by_partition(tmp_path):
    colours, partition = write_celeba(tmp_path / "raw")
    root = prepare(tmp_path, {"celeba64": {"scale": "raw", "verify_md5": False}})
    s = split_arrays(root, "celeba64")
    assert [len(s[k].x) for k in ("train", "val", "test")] == [partition.count(p) for p in (0, 1, 2)]
    assert s["train"].y is None and tuple(s["train"].x.shape[1:]) == (3, 64, 64)
    by_split = {"train": 0, "val": 1, "test": 2}
    for k, p in by_split.items():
        expected = sorted(c for c, q in zip(colours, partition) if q == p)
        got = [s[k].x[j].double().mean((1, 2)).numpy() for j in range(len(s[k].x))]
        got = sorted(got, key=lambda v: v[0])
        for g, e in zip(got, expected):   # only the centre colour survives the crop (JPEG: a few levels)
            assert np.abs(g - np.array(e)).max() < 3
    files = read_manifest(root, "celeba64")["source"]["files"]
    assert "celeba/list_eval_partition.txt" in files and any("img_align_celeba" in k for k in files)


# --- UCI CSVs --------------------------------------------------------------------------------------

WINE_HEADER = ["fixed acidity", "volatile acidity", "citric acid", "residual sugar", "chlorides",
               "free sulfur dioxide", "total sulfur dioxide", "density", "pH", "sulphates", "alcohol", "quality"]
PARKINSONS_HEADER = ["name", "MDVP:Fo(Hz)", "MDVP:Fhi(Hz)", "MDVP:Flo(Hz)", "MDVP:Jitter(%)", "MDVP:Jitter(Abs)",
                     "MDVP:RAP", "MDVP:PPQ", "Jitter:DDP", "MDVP:Shimmer", "MDVP:Shimmer(dB)", "Shimmer:APQ3",
                     "Shimmer:APQ5", "MDVP:APQ", "Shimmer:DDA", "NHR", "HNR", "status", "RPDE", "DFA",
                     "spread1", "spread2", "D2", "PPE"]


def write_wine(raw, file, n=60):
    rng = np.random.default_rng(2)
    values = np.round(rng.uniform(1, 20, (n, 11)), 1)     # quantised to 0.1, like the real measurements
    quality = rng.integers(3, 9, n)
    (raw / "uci").mkdir(parents=True, exist_ok=True)
    rows = [";".join(f'"{h}"' for h in WINE_HEADER)] + [";".join(f"{v:g}" for v in row) + f";{q}"
                                                         for row, q in zip(values, quality)]
    (raw / "uci" / file).write_text("\n".join(rows) + "\n")
    return values, quality


@pytest.mark.parametrize("name,file", [("redwine", "winequality-red.csv"), ("whitewine", "winequality-white.csv")])
def test_wine_rows_labels_and_splits(tmp_path, name, file):
    values, quality = write_wine(tmp_path / "raw", file)
    root = prepare(tmp_path, {name: {"whiten": False, "noise_std": 0.0, "dequantize": False, "dtype": "float64"}})
    m = read_manifest(root, name)
    assert m["columns"] == WINE_HEADER[:-1] and m["kind"] == "table"
    assert [m["splits"][k]["rows"] for k in ("train", "val", "test")] == [49, 5, 6]   # test = min(1000, 60/10)
    s = split_arrays(root, name)
    rows = {tuple(r): q for r, q in zip(values, quality)}
    for k in s:
        for r, q in zip(s[k].x.numpy(), s[k].y.numpy()):
            assert rows[tuple(r)] == q                                 # each row keeps its own label
    assert sum(len(s[k].x) for k in s) == len(rows)


def test_wine_paper_preprocessing_dequantises_and_whitens(tmp_path):
    values, _ = write_wine(tmp_path / "raw", "winequality-red.csv", n=200)
    root = prepare(tmp_path, {"redwine": {"noise_std": 0.0},
                              "redwine_deq": {"dataset": "redwine", "whiten": False, "noise_std": 0.0}})
    train = load_split(root, "redwine", "train").x.double()
    cov = (train - train.mean(0)).T @ (train - train.mean(0)) / len(train)
    assert train.mean(0).abs().max() < 1e-5 and (cov - torch.eye(11, dtype=cov.dtype)).abs().max() < 1e-4
    deq = load_split(root, "redwine_deq", "train").x.double().numpy()
    nearest = np.abs(deq[:, None, :] - values[None]).sum(2).argmin(1)  # the source row of each
    gap = np.abs(deq - values[nearest])
    assert (gap > 0).mean() > 0.99 and gap.max() <= 0.1 + 1e-6       # within one quantisation step
    default = DataSettings(datasets={"redwine": {}}).datasets["redwine"]
    assert default.dequantize and default.whiten and default.noise_std == 0.05 and default.test_max == 1000


def write_parkinsons(raw, n=40):
    rng = np.random.default_rng(3)
    table = {h: rng.uniform(0.1, 10, n) for h in PARKINSONS_HEADER}
    table["Jitter:DDP"] = 3 * table["MDVP:RAP"]                  # exactly as in the real file
    table["Shimmer:DDA"] = 3 * table["Shimmer:APQ3"]
    table["status"] = rng.integers(0, 2, n)
    table["name"] = [f"phon_R01_S{i // 6:02d}_{i % 6 + 1}" for i in range(n)]
    (raw / "uci").mkdir(parents=True, exist_ok=True)
    fmt = lambda v: v if isinstance(v, str) else f"{v:.6f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [",".join(PARKINSONS_HEADER)] + [",".join(fmt(table[h][i]) for h in PARKINSONS_HEADER) for i in range(n)]
    (raw / "uci" / "parkinsons.data").write_text("\n".join(lines) + "\n")
    return table


def test_parkinsons_drops_correlated_columns_and_keeps_status_as_label(tmp_path):
    table = write_parkinsons(tmp_path / "raw")
    root = prepare(tmp_path, {"parkinsons": {"whiten": False, "noise_std": 0.0, "dtype": "float64"}})
    m = read_manifest(root, "parkinsons")
    assert m["info"]["dropped_columns"] == ["MDVP:RAP", "Shimmer:APQ3"]
    assert "name" not in m["columns"] and "status" not in m["columns"] and len(m["columns"]) == 20
    s = split_arrays(root, "parkinsons")
    col = m["columns"].index("MDVP:Fo(Hz)")
    for k in s:
        for r, y in zip(s[k].x.numpy(), s[k].y.numpy()):
            i = int(np.argmin(np.abs(table["MDVP:Fo(Hz)"] - r[col])))
            assert table["status"][i] == y


def test_parkinsons_telemonitoring_layout(tmp_path):
    header = ["subject#", "age", "sex", "test_time", "motor_UPDRS", "total_UPDRS", "Jitter(%)", "Shimmer", "NHR"]
    rng = np.random.default_rng(4)
    rows = [",".join([str(i // 5 + 1), "72", "0"] + [f"{v:.5f}" for v in rng.uniform(0, 30, 6)]) for i in range(50)]
    (tmp_path / "raw" / "uci").mkdir(parents=True)
    (tmp_path / "raw" / "uci" / "parkinsons_updrs.data").write_text("\n".join([",".join(header)] + rows) + "\n")
    root = prepare(tmp_path, {"parkinsons": {"file": "parkinsons_updrs.data"}})
    m = read_manifest(root, "parkinsons")
    assert m["columns"] == header[3:] and not m["labels"] and m["source"]["files"].keys() == {"uci/parkinsons_updrs.data"}


def test_csv_with_the_wrong_layout_names_the_file(tmp_path):
    (tmp_path / "raw" / "uci").mkdir(parents=True)
    (tmp_path / "raw" / "uci" / "winequality-red.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match=r"winequality-red.csv.*\['quality'\]"):
        prepare(tmp_path, {"redwine": {}})


def test_csv_with_a_nan_cell_names_the_file_and_row(tmp_path):
    write_wine(tmp_path / "raw", "winequality-red.csv")
    path = tmp_path / "raw" / "uci" / "winequality-red.csv"
    lines = path.read_text().splitlines()
    lines[5] = "nan;" + lines[5].split(";", 1)[1]  # the 5th data row
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"winequality-red.csv: row 6 holds a non-finite value"):
        prepare(tmp_path, {"redwine": {}})
    assert not (tmp_path / "prepared" / "redwine").exists(), "no partial output"


# --- HEPMASS and MiniBooNE: MAF's row and column selection ------------------------------------------

HEPMASS_HEADER = ["# label"] + [f"f{j}" for j in range(27)] + ["mass"]


def hepmass_rows(rng, n, signal):
    """Features of the HEPMASS 1000 files' kind: continuous columns, f3 clipped at its minimum, f7 with
    three levels, f11 piled up at 0.5 inside its range (not at its minimum), mass 1000 everywhere."""
    x = rng.normal(0, 1, (n, 28)) + 10 * (~signal)[:, None]       # background rows sit far away
    x[:, 3] = np.maximum(x[:, 3], 0.0)
    x[:, 7] = rng.integers(0, 3, n)
    x[:, 11] = np.where(rng.random(n) < 0.3, 0.5, x[:, 11])
    x[:, 27] = 1000.0
    return x


def write_hepmass(raw, n_train=300, n_test=100, gz=False):
    rng = np.random.default_rng(5)
    (raw / "uci").mkdir(parents=True, exist_ok=True)
    tables = {}
    for file, n in (("1000_train.csv", n_train), ("1000_test.csv", n_test)):
        signal = np.arange(n) % 3 != 0                              # 2 of every 3 rows
        x = hepmass_rows(rng, n, signal)
        text = ",".join(HEPMASS_HEADER) + "\n" + "".join(
            f"{int(s)}.0," + ",".join(f"{v:.6g}" for v in row) + "\n" for s, row in zip(signal, x))
        path = raw / "uci" / (file + ".gz" if gz else file)
        if gz:
            path.write_bytes(gzip.compress(text.encode()))
        else:
            path.write_text(text)
        tables[file] = (np.array([[float(f"{v:.6g}") for v in row] for row in x]), signal.astype(int))
    return tables


def rows_of(arrays):
    return sorted(map(tuple, np.concatenate(arrays).round(6)))


HEPMASS_KEPT = [f"f{j}" for j in range(27) if j not in (3, 7)]       # f3, f7 and mass dropped: 25 columns


def test_hepmass_keeps_the_signal_events_and_drops_columns_with_a_repeated_smallest_value(tmp_path):
    tables = write_hepmass(tmp_path / "raw")
    root = prepare(tmp_path, {"hepmass": {"whiten": False, "noise_std": 0.0, "dtype": "float64"},
                              "hepmass_mode": {"dataset": "hepmass", "repeated_value": "most_common",
                                               "whiten": False, "noise_std": 0.0, "dtype": "float64"}})
    m = read_manifest(root, "hepmass")
    assert m["columns"] == HEPMASS_KEPT and m["shape"] == [25] and not m["labels"]
    assert m["info"]["dropped_columns"] == ["f3", "f7", "mass"]
    assert [m["splits"][k]["rows"] for k in ("train", "val", "test")] == [180, 20, 66]  # val: 200 // 10; test file
    s = split_arrays(root, "hepmass")
    cols = [j for j in range(28) if j not in (3, 7, 27)]
    (x, label), (xt, label_t) = tables["1000_train.csv"], tables["1000_test.csv"]
    assert rows_of([s["train"].x.numpy(), s["val"].x.numpy()]) == rows_of([x[label == 1][:, cols]])
    assert rows_of([s["test"].x.numpy()]) == rows_of([xt[label_t == 1][:, cols]])
    mode = read_manifest(root, "hepmass_mode")                  # the most common value: f11 goes as well
    assert mode["info"]["dropped_columns"] == ["f3", "f7", "f11", "mass"] and mode["shape"] == [24]


def test_hepmass_all_events_keep_the_class_as_label_and_gz_files_are_read(tmp_path):
    tables = write_hepmass(tmp_path / "raw", gz=True)
    root = prepare(tmp_path, {"hepmass": {"events": "all", "max_repeats": None, "whiten": False,
                                          "noise_std": 0.0, "dtype": "float64"}})
    m = read_manifest(root, "hepmass")
    assert m["shape"] == [28] and m["columns"] == HEPMASS_HEADER[1:] and m["info"]["dropped_columns"] == []
    assert [m["splits"][k]["rows"] for k in ("train", "val", "test")] == [270, 30, 100]
    assert m["source"]["files"].keys() == {"uci/1000_train.csv.gz", "uci/1000_test.csv.gz"}
    s = split_arrays(root, "hepmass")
    for k in s:                                                  # background rows sit at +10
        assert np.array_equal(s[k].y.numpy(), (s[k].x.numpy()[:, 0] < 5).astype(int))
    assert sum(s[k].y.sum().item() for k in ("train", "val")) == tables["1000_train.csv"][1].sum()


def write_miniboone(raw, n_signal=120, n_background=180, outliers=(4, 50, 200), bad_row=None, counts=None):
    """MiniBooNE_PID.txt: the counts line, then rows of 50 numbers in the file's %E format. Column 5 is
    clipped at 0, column 9 is 0 (its minimum) in 90% of rows, column 20 piles up at 0.5 inside its range;
    the ``outliers`` rows (two signal, one background) hold -999 everywhere."""
    rng = np.random.default_rng(6)
    n = n_signal + n_background
    x = rng.normal(0, 1, (n, 50)) + 10 * (np.arange(n) >= n_signal)[:, None]
    x[:, 5] = np.maximum(x[:, 5], 0.0)
    x[:, 9] = np.where(rng.random(n) < 0.9, 0.0, np.abs(x[:, 9]) + 0.1)
    x[:, 20] = np.where(rng.random(n) < 0.3, 0.5, x[:, 20])
    x[list(outliers)] = -999.0
    lines = [counts or f"    {n_signal}    {n_background}"]
    lines += [" " + " ".join(f"{v:.5E}" for v in (row[:-1] if i == bad_row else row)) for i, row in enumerate(x)]
    (raw / "uci").mkdir(parents=True, exist_ok=True)
    (raw / "uci" / "MiniBooNE_PID.txt").write_text("\n".join(lines) + "\n")
    return np.array([[float(f"{v:.5E}") for v in row] for row in x])


def test_miniboone_drops_outlier_rows_and_repeated_columns_and_splits_like_maf(tmp_path):
    x = write_miniboone(tmp_path / "raw")
    root = prepare(tmp_path, {"miniboone": {"whiten": False, "noise_std": 0.0, "dtype": "float64"}})
    m = read_manifest(root, "miniboone")
    assert m["shape"] == [48] and m["info"]["dropped_columns"] == ["f5", "f9"] and not m["labels"]
    assert m["info"]["outlier_rows_dropped"] == 3
    # 118 signal rows left: test ⌊118/10⌋ = 11 (no test_max), val ⌊107/10⌋ = 10
    assert [m["splits"][k]["rows"] for k in ("train", "val", "test")] == [97, 10, 11]
    s = split_arrays(root, "miniboone")
    signal = np.array([i for i in range(120) if i not in (4, 50)])
    cols = [j for j in range(50) if j not in (5, 9)]
    assert rows_of([s[k].x.numpy() for k in s]) == rows_of([x[signal][:, cols]])


def test_miniboone_all_events_and_options(tmp_path):
    write_miniboone(tmp_path / "raw")
    root = prepare(tmp_path, {"miniboone": {"events": "all", "whiten": False, "noise_std": 0.0},
                              "mb_keep": {"dataset": "miniboone", "outlier_value": None, "max_repeats": None,
                                          "whiten": False, "noise_std": 0.0, "test_max": 5}})
    m = read_manifest(root, "miniboone")
    assert sum(m["splits"][k]["rows"] for k in m["splits"]) == 297 and m["shape"] == [48]
    s = split_arrays(root, "miniboone")
    for k in s:                                                  # background rows sit at +10
        assert np.array_equal(s[k].y.numpy(), (s[k].x.numpy()[:, 0] < 5).astype(int))
    keep = read_manifest(root, "mb_keep")
    assert keep["shape"] == [50] and keep["info"]["outlier_rows_dropped"] == 0
    assert [keep["splits"][k]["rows"] for k in ("train", "val", "test")] == [104, 11, 5]   # 120 signal rows
    assert min(v.x.numpy().min() for v in split_arrays(root, "mb_keep").values()) == -999.0


@pytest.mark.parametrize("name", ["hepmass", "miniboone"])
def test_maf_sets_are_whitened_on_train_finite_and_seeded(tmp_path, name):
    if name == "hepmass":
        write_hepmass(tmp_path / "raw", n_train=600)
    else:
        write_miniboone(tmp_path / "raw", n_signal=400)
    datasets = {name: {"noise_std": 0.0}, f"{name}_noisy": {"dataset": name}}   # noise 0.05, the same split
    runs = {out: prepare_datasets(DataSettings(root=str(tmp_path / out), raw_root=str(tmp_path / "raw"), seed=seed,
                                               datasets=datasets))
            for seed, out in ((0, "a"), (0, "b"), (1, "c"))}
    train = load_split(tmp_path / "a", name, "train").x.double()
    cov = (train - train.mean(0)).T @ (train - train.mean(0)) / len(train)
    assert train.mean(0).abs().max() < 1e-5 and (cov - torch.eye(train.shape[1], dtype=cov.dtype)).abs().max() < 1e-4
    for k in ("train", "val", "test"):
        noisy = load_split(tmp_path / "a", f"{name}_noisy", k).x
        assert noisy.dtype == torch.float32 and torch.isfinite(noisy).all()
        assert abs((noisy.double() - load_split(tmp_path / "a", name, k).x.double()).std() - 0.05) < 0.01
    assert runs["a"][name]["splits"] == runs["b"][name]["splits"]                   # same seed, same files
    assert runs["a"][name]["splits"]["train"]["sha256"] != runs["c"][name]["splits"]["train"]["sha256"]


@pytest.mark.parametrize("kwargs,pattern", [
    ({"bad_row": 7}, r"MiniBooNE_PID.txt: not rows of 50 whitespace-separated numbers"),
    ({"counts": "36499"}, r"MiniBooNE_PID.txt: its first line '36499' is not two counts"),
    ({"counts": "120 181"}, r"MiniBooNE_PID.txt: 300 rows of 50 numbers; its first line announces 120 \+ 181 rows"),
])
def test_garbled_miniboone_names_the_file(tmp_path, kwargs, pattern):
    write_miniboone(tmp_path / "raw", **kwargs)
    with pytest.raises(ValueError, match=pattern):
        prepare(tmp_path, {"miniboone": {}})
    assert not (tmp_path / "prepared").exists()


def test_garbled_hepmass_names_the_file(tmp_path):
    write_hepmass(tmp_path / "raw")
    train = tmp_path / "raw" / "uci" / "1000_train.csv"
    text = train.read_text().splitlines()
    train.write_text("\n".join(text[:5] + [text[5].rsplit(",", 1)[0]] + text[6:]) + "\n")   # a short row
    with pytest.raises(ValueError, match=r"1000_train.csv: not a ','-separated table of the 29 columns"):
        prepare(tmp_path, {"hepmass": {}})
    train.write_text("\n".join(["label;" + ";".join(HEPMASS_HEADER[1:])] + text[1:]) + "\n")
    with pytest.raises(ValueError, match=r"1000_train.csv: header .* does not start with '# label'"):
        prepare(tmp_path, {"hepmass": {}})
    train.write_text("\n".join(text[:3] + [text[3].replace(",", ",nan,", 1).rsplit(",", 1)[0]] + text[4:]) + "\n")
    with pytest.raises(ValueError, match=r"1000_train.csv: row 4 holds a non-finite value"):
        prepare(tmp_path, {"hepmass": {}})
    write_hepmass(tmp_path / "raw")
    test = tmp_path / "raw" / "uci" / "1000_test.csv"
    test.write_text(test.read_text().replace(",mass\n", ",m\n", 1))
    with pytest.raises(ValueError, match=r"1000_test.csv: columns .* differ from those of .*1000_train.csv"):
        prepare(tmp_path, {"hepmass": {}})


def test_hepmass_download_saves_the_served_gz_names(tmp_path, monkeypatch):
    write_hepmass(tmp_path / "served", gz=True)
    fetched = []

    def download_url(url, root, filename):                      # stands in for the network
        fetched.append(url)
        (Path(root) / filename).write_bytes((tmp_path / "served" / "uci" / filename).read_bytes())

    monkeypatch.setattr("torchvision.datasets.utils.download_url", download_url)
    (tmp_path / "raw" / "uci").mkdir(parents=True)
    root = prepare(tmp_path, {"hepmass": {}}, download=True)
    assert fetched == [UCI + "00347/1000_train.csv.gz", UCI + "00347/1000_test.csv.gz"]
    assert read_manifest(root, "hepmass")["shape"] == [25]


# --- missing files ---------------------------------------------------------------------------------

MISSING = {
    "mnist": ("MNIST/raw", ["train-images-idx3-ubyte or train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]),
    "cifar10": ("cifar-10-batches-py", ["data_batch_1", "data_batch_5", "test_batch", "batches.meta"]),
    "celeba64": ("celeba", ["img_align_celeba/", "list_eval_partition.txt", "identity_CelebA.txt",
                            "list_landmarks_align_celeba.txt"]),
    "redwine": ("uci", ["winequality-red.csv"]),
    "whitewine": ("uci", ["winequality-white.csv"]),
    "parkinsons": ("uci", ["parkinsons.data"]),
    "hepmass": ("uci", ["1000_train.csv or 1000_train.csv.gz", "1000_test.csv or 1000_test.csv.gz"]),
    "miniboone": ("uci", ["MiniBooNE_PID.txt"]),
}


@pytest.mark.parametrize("name", sorted(MISSING))
def test_missing_real_dataset_names_dataset_folder_and_files_and_writes_nothing(tmp_path, name):
    folder, files = MISSING[name]
    with pytest.raises(MissingDataError) as err:
        prepare(tmp_path, {"gaussian": {"n_train": 10}, name: {}})   # gaussian comes first: not written either
    msg = str(err.value)
    assert f"dataset {name!r}" in msg and str(tmp_path / "raw" / folder) in msg
    assert all(f in msg for f in files), msg
    assert not (tmp_path / "prepared").exists()


def test_partly_missing_mnist_lists_only_the_missing_file(tmp_path):
    write_mnist(tmp_path / "raw", 5, 5, "gz")
    (tmp_path / "raw" / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(MissingDataError, match=r"t10k-images-idx3-ubyte or t10k-images-idx3-ubyte.gz\. Put") as err:
        prepare(tmp_path, {"mnist": {}})
    assert "train-images" not in str(err.value)


def test_failed_download_says_so_and_names_the_files(tmp_path):
    files = RawFiles(tmp_path / "uci", (("winequality-red.csv",),))
    ctx = Context("redwine", "redwine", tmp_path, 0, download=True)

    def offline():
        raise RuntimeError("Error downloading winequality-red.csv:\n<urlopen error [Errno -2] Name or service not known>")

    with pytest.raises(MissingDataError, match=r"could not download \(<urlopen error.*\).*winequality-red.csv"):
        fetch(ctx, files, offline)
