"""Check params.yaml before `dvc repro`: every section, every experiment's dataset, model, loss and search space.

The pipeline's ``check`` stage runs it before the tune stages (they depend on its ``--out`` file). DVC checks
a stage's deps before it runs the stage's command, so an experiment that names a dataset the data section does
not prepare would otherwise stop `dvc repro` with DVC's own "No such file or directory" for
data/prepared/<name>, not with what is wrong in params.yaml. The file written is the same for every valid
params.yaml: passing the check changes nothing downstream.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.artifacts import write_json
from pipelines.settings import load_params, main_guard


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--out", help="write {\"valid\": true} here once the params pass (the dvc.yaml stage's output)")
    args = p.parse_args(argv)
    settings = load_params(args.params)
    if args.out:
        write_json(Path(args.out), {"valid": True})
    print(f"{args.params}: valid; experiments: {', '.join(settings.experiments) or 'none'}")


if __name__ == "__main__":
    main_guard(main)
