"""Provenance: the tags every MLflow run of a stage carries (:func:`provenance_tags`), and the device it runs on.

Tags of every run (:func:`provenance_tags`):

- MLflow's own source tags, which fill the UI's Source / Version / User columns: ``mlflow.source.name`` (the
  stage module, e.g. ``pipelines.train``), ``mlflow.source.type`` (``JOB`` when DVC runs the stage, i.e.
  ``DVC_STAGE`` is set; ``LOCAL`` by hand), ``mlflow.source.git.commit`` / ``.branch`` / ``.repoURL`` (left out
  when unknown: no git, a detached HEAD, no ``origin``; credentials are cut from the URL), ``mlflow.user``.
- ``pipeline_sha256``: sha256 of the validated params (canonical JSON) and of ``dvc.yaml``'s bytes. Equal for
  every stage of one ``dvc repro`` (unlike a hash of dvc.lock, which DVC rewrites after each stage), different
  when a param or the pipeline changes (``dvc exp run -S ...``). The git commit says which code ran.
- ``dvc.stage`` (e.g. ``train@nice-digits``), and under ``dvc exp run`` ``dvc.exp_name`` and
  ``dvc.exp_baseline_rev``: the environment DVC gives stage commands (``DVC_STAGE``, ``DVC_EXP_NAME``,
  ``DVC_EXP_BASELINE_REV``; see dvc/stage/run.py and dvc/repo/experiments/queue/base.py).
- ``device``: the torch device the run trains on (``cpu``, ``cuda:0``), resolved as :func:`deqsm.train.fit`
  resolves ``base.device`` (``auto``: CUDA when present); ``device.name`` for a GPU. A tune trial's device is
  the one its Ray worker reports (a worker may see no GPU where the driver does).
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mlflow.entities import SourceType
from mlflow.utils.mlflow_tags import (MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL, MLFLOW_SOURCE_NAME,
                                      MLFLOW_SOURCE_TYPE, MLFLOW_USER)


def device_label(device: Any) -> str:
    """The torch device a setting (``auto``, ``cpu``, ``cuda``, ``cuda:1``) or a ``torch.device`` trains on, as
    :func:`deqsm.train.fit` resolves it, with its index (``cuda`` → ``cuda:0``, the current device)."""
    import torch

    from deqsm.train import resolve_device

    d = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())
    return str(d)


def device_tags(device: Any) -> dict[str, str]:
    """``device`` (and ``device.name`` for a GPU) of the device a setting resolves to."""
    label = device_label(device)
    tags = {"device": label}
    if label.startswith("cuda"):
        import torch

        try:
            tags["device.name"] = torch.cuda.get_device_name(torch.device(label))
        except Exception:  # noqa: BLE001 — the name is a nicety
            pass
    return tags


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return out or None


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return url


def pipeline_sha256(settings: Any, root: Path) -> str:
    """sha256 of the validated params (canonical JSON) and dvc.yaml: the same for every stage of one repro."""
    h = hashlib.sha256(b"params\n")
    h.update(json.dumps(settings.model_dump(mode="json"), sort_keys=True, default=str).encode())
    dvc_yaml = Path(root) / "dvc.yaml"
    h.update(b"\ndvc.yaml\n" + (dvc_yaml.read_bytes() if dvc_yaml.exists() else b""))
    return h.hexdigest()


def provenance_tags(settings: Any, source: str, root: Path | None = None, *, device: bool = True) -> dict[str, str]:
    """The tags every run of stage module ``source`` carries (see the module's docstring); ``root``: the
    project (default: params.yaml's folder); ``device=False`` leaves the device out (a tune trial's comes from
    its worker)."""
    root = Path(root or settings.root)
    tags = {MLFLOW_SOURCE_NAME: source,
            MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.JOB if os.environ.get("DVC_STAGE")
                                                     else SourceType.LOCAL),
            "pipeline_sha256": pipeline_sha256(settings, root)}
    commit = _git(root, "rev-parse", "HEAD")
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
        branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags[MLFLOW_GIT_BRANCH] = branch
        url = _git(root, "remote", "get-url", "origin")
        if url:
            tags[MLFLOW_GIT_REPO_URL] = _without_credentials(url)
    try:
        tags[MLFLOW_USER] = getpass.getuser()
    except Exception:  # noqa: BLE001 — no user name in this environment
        pass
    for env, tag in (("DVC_STAGE", "dvc.stage"), ("DVC_EXP_NAME", "dvc.exp_name"),
                     ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    if device:
        tags.update(device_tags(settings.base.device))
    return tags
