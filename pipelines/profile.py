"""``python -m pipelines.profile PROFILE [--params params.yaml] [--check]``: apply a params profile.

A profile (``profiles/*.yaml``) is a partial params.yaml: its sections are merged over params.yaml key by key,
except ``experiments``, ``data.datasets`` and ``tune.search_space``, which it replaces whole (a profile names its
own experiments, not additions to the default ones). The merged file is validated as every stage validates
params.yaml (an unknown key or a bad value is refused, naming it) before it replaces params.yaml; nothing is
written on an error. ``--check`` validates without writing. Then ``dvc repro`` (or ``dvc exp run``) runs it.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipelines import ParamsError, read_params_file

REPLACED = {("experiments",), ("data", "datasets"), ("tune", "search_space")}


def merge(base: dict[str, Any], profile: dict[str, Any], at: tuple[str, ...] = ()) -> dict[str, Any]:
    """``base`` with ``profile`` merged over it (a new dict; mappings merge key by key, except at REPLACED)."""
    out = copy.deepcopy(base)
    for key, value in profile.items():
        where = (*at, key)
        if isinstance(value, dict) and isinstance(out.get(key), dict) and where not in REPLACED:
            out[key] = merge(out[key], value, where)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_profile(profile: Path, params: Path, write: bool = True) -> dict[str, Any]:
    """Merge ``profile`` over ``params``, validate, and (``write``) replace ``params`` atomically."""
    import yaml

    from pipelines.settings import load_params

    merged = merge(read_params_file(params), read_params_file(profile))
    text = (f"# params.yaml with the profile {profile.name} merged in (python -m pipelines.profile)\n"
            + yaml.safe_dump(merged, sort_keys=False))
    with tempfile.TemporaryDirectory(dir=params.parent) as tmp:
        candidate = Path(tmp) / params.name
        candidate.write_text(text)
        try:
            load_params(candidate)
        except ParamsError as err:
            raise ParamsError(f"profile {profile}: {err}") from None
        if write:
            candidate.replace(params)
    return merged


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile", help="a partial params file, e.g. profiles/paper-gpu.yaml")
    p.add_argument("--params", default="params.yaml", help="the params file to merge it into (default: params.yaml)")
    p.add_argument("--check", action="store_true", help="validate the merged params, write nothing")
    args = p.parse_args(argv)
    merged = apply_profile(Path(args.profile), Path(args.params), write=not args.check)
    verb = "is valid over" if args.check else "applied to"
    print(f"{args.profile} {verb} {args.params}: experiments {', '.join(merged.get('experiments') or {})}",
          file=sys.stderr)


if __name__ == "__main__":
    from pipelines.settings import main_guard

    main_guard(main)
