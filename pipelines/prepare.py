"""DVC stage `prepare`: read the ``data`` section of params.yaml and write every dataset it lists to
``<data.root>/<name>/{train,val,test}.parquet`` + ``manifest.json`` (see :mod:`deqsm.data`).

Real datasets (mnist, cifar10, celeba64, redwine, whitewine, parkinsons) read their files from
``data.raw_root`` (or download them with ``data.download: true``); the defaults (digits, gaussian,
mixture) work offline. Bad input — invalid params, missing raw files — exits with status 2 and one line
on stderr, before anything is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from deqsm.data import DATASETS, prepare_datasets
from deqsm.schema import describe_errors
from deqsm.data.settings import DataSettings
from pipelines import read_params_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"registered datasets: {', '.join(DATASETS.names())}")
    p.add_argument("--params", type=Path, default=Path("params.yaml"),
                   help="params file; only its data section is read (default: params.yaml)")
    p.add_argument("--dataset", action="append", metavar="NAME",
                   help="prepare only this entry of data.datasets (repeatable; default: all)")
    return p.parse_args(argv)


def load_data_settings(path: Path) -> DataSettings:
    raw = read_params_file(path)
    try:
        return DataSettings.model_validate(raw.get("data") or {})
    except ValidationError as err:
        raise ValueError(f"invalid {path.name}: {'; '.join(describe_errors(err, 'data'))}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = load_data_settings(args.params)
        prepare_datasets(settings, base=args.params.resolve().parent, names=args.dataset,
                         log=lambda message: print(message, flush=True))
    except (ValueError, OSError) as err:  # bad params, unknown names, missing files: one clear line
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
