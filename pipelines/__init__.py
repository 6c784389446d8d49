"""Orchestration: one module per DVC stage, plus the only modules that import ray (ray_search, ray_session) and mlflow
(tracking, provenance). Shared here: reading params.yaml as YAML, for the stages that read only part of it."""
from __future__ import annotations

from pathlib import Path
from typing import Any


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the key."""


class ServiceError(RuntimeError):
    """A service the stage needs (the MLflow tracking store, a Ray cluster) is unreachable or broken. The message
    is one line: the service, its address, what went wrong and what to do; stages raise it before they write."""


def read_params_file(path: Path) -> dict[str, Any]:
    """params.yaml's sections as plain data (no validation): a clear :class:`ParamsError` when the file is
    missing, is not YAML, or is not a mapping."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"params file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw
