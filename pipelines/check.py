"""Check params.yaml before `dvc repro`: every section, every experiment's dataset, model, loss and search space.

`make repro` runs it first. DVC checks a stage's deps before it runs the stage's command, so an experiment
that names a dataset the data section does not prepare would otherwise stop `dvc repro` with DVC's own
"No such file or directory" for data/prepared/<name>, not with what is wrong in params.yaml.
"""
from __future__ import annotations

import argparse

from pipelines.settings import load_params, main_guard


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = p.parse_args(argv)
    settings = load_params(args.params)
    print(f"{args.params}: valid; experiments: {', '.join(settings.experiments) or 'none'}")


if __name__ == "__main__":
    main_guard(main)
