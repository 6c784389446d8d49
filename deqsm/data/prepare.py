"""Prepare the datasets of a :class:`~deqsm.data.settings.DataSettings`: check every real dataset's files
first (a missing one fails before anything is written), load and preprocess each dataset, and write
them all atomically (:class:`~deqsm.data.store.PreparedWriter`). ``pipelines/prepare.py`` is the CLI.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from deqsm.data.base import Context, missing_error
from deqsm.data.settings import DataSettings
from deqsm.data.store import PreparedWriter


def check_raw_files(settings: DataSettings, raw_root: Path, names: list[str]) -> None:
    """Fail early, naming the dataset, folder and files, when a real dataset's files are absent and
    downloading is off."""
    if settings.download:
        return
    for name in names:
        files = settings.datasets[name].raw_files(raw_root)
        if files is not None and (missing := files.missing()):
            raise missing_error(name, files, missing)


def prepare_datasets(settings: DataSettings, base: str | Path = ".", names: list[str] | None = None,
                     log: Callable[[str], None] = lambda message: None) -> dict[str, dict[str, Any]]:
    """Prepare ``names`` (default: all) under ``settings.root``; returns the manifests by name."""
    root, raw_root = settings.paths(base)
    names = names or settings.dataset_names()
    if unknown := [n for n in names if n not in settings.datasets]:
        raise ValueError(f"datasets {unknown} are not in data.datasets; configured: {', '.join(settings.datasets)}")
    check_raw_files(settings, raw_root, names)
    manifests = {}
    with PreparedWriter(root) as writer:
        for i, name in enumerate(names, 1):
            spec, dataset, t0 = settings.datasets[name], settings.registry_name(name), time.perf_counter()
            log(f"[{i}/{len(names)}] {name}: preparing ({dataset})")
            prepared = spec.load(Context(name, dataset, raw_root, settings.seed, settings.download, log))
            m = manifests[name] = writer.write(name, prepared, dataset=dataset,
                                               preprocessing={"seed": settings.seed, **spec.model_dump()})
            rows = ", ".join(f"{s} {v['rows']}" for s, v in m["splits"].items())
            log(f"[{i}/{len(names)}] {name}: {rows} rows of shape {tuple(m['shape'])} {m['dtype']} "
                f"({time.perf_counter() - t0:.1f} s)")
    log(f"wrote {', '.join(names)} to {root}")
    return manifests
