"""Every file the pipeline writes under ``base.out`` and ``base.results``, and the trained-model format.

The stages are siblings that never import each other: what one writes and the next reads is named here,
once. dvc.yaml's ``outs`` and ``deps`` name the same paths with params.yaml's variables
(``${base.out}/models/${key}`` ...); ``tests/test_dvc_deps.py`` checks that the two agree.

Layout (``<exp>``: an experiment of params.yaml, ``<variant>``: one of its variants)::

    <out>/tune/<exp>/best.json                  tune: best configuration and metrics per variant
    <out>/ray/                                  tune: Ray Tune's experiment state (resumable)
    <out>/models/<exp>/<variant>/seed<s>.pt     train: weights + spec + training summary (save_model), per seed
    <results>/experiments/<exp>/curves/<variant>/seed<s>.csv   train: training curve, per seed
    <results>/experiments/<exp>/metrics.json    evaluate: test metrics per variant, mean and se across seeds
    <results>/experiments/<exp>/seeds.json      evaluate: the same metrics of every seed
    <results>/experiments/<exp>/samples/<variant>.png  evaluate: sample grid (models that sample)
    <results>/experiments/<exp>/fidelity.json   fidelity: phantom-vs-exact gradients of the DEQ variants
    <results>/benchmarks/memory_depth.jsonl     bench: memory vs depth / solver iterations
    <results>/REPORT.md, tables/, figures/, plots/     report
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pipelines.settings import Settings

MODEL_SUFFIX = ".pt"


def _in_report_dir(name: str) -> property:
    return property(lambda self: self.report_dir / name, doc=f"``<report_dir>/{name}``")


@dataclass(frozen=True)
class Artifacts:
    """The pipeline's paths for one project: params.yaml's folders resolved against ``root``."""

    root: Path
    out: Path
    results: Path
    data_root: Path
    report_dir: Path  # the report's own files (REPORT.md, tables/, figures/, plots/)

    @classmethod
    def of(cls, settings: Settings, root: Path | None = None, report_dir: Path | None = None) -> "Artifacts":
        """``root``: where relative folders start (default: the folder of params.yaml); ``report_dir``:
        the report's folder, relative to ``root`` (default: ``base.results``)."""
        root = (root or settings.root).resolve()
        results = root / settings.base.results
        return cls(root, root / settings.base.out, results, root / settings.data.root,
                   results if report_dir is None else root / report_dir)

    # --- tune
    def tune_best(self, experiment: str) -> Path:
        return self.out / "tune" / experiment / "best.json"

    @property
    def ray_storage(self) -> Path:
        return self.out / "ray"

    # --- train
    def models_dir(self, experiment: str) -> Path:
        return self.out / "models" / experiment

    def model(self, experiment: str, variant: str, seed: int) -> Path:
        return self.models_dir(experiment) / variant / f"seed{seed}{MODEL_SUFFIX}"

    def models(self, experiment: str) -> dict[str, dict[int, Path]]:
        """The trained variants' files: variant → seed → file, variants and seeds sorted."""
        out: dict[str, dict[int, Path]] = {}
        for path in sorted(self.models_dir(experiment).glob(f"*/seed*{MODEL_SUFFIX}")):
            seed = seed_of(path)
            if seed is not None:
                out.setdefault(path.parent.name, {})[seed] = path
        return {v: dict(sorted(by_seed.items())) for v, by_seed in sorted(out.items())}

    def experiment_dir(self, experiment: str) -> Path:
        """``<results>/experiments/<exp>``: apart from the report's own files in ``<results>``, so the report
        stage can depend on the whole folder."""
        return self.results / "experiments" / experiment

    def curves_dir(self, experiment: str) -> Path:
        return self.experiment_dir(experiment) / "curves"

    def curve(self, experiment: str, variant: str, seed: int) -> Path:
        """Everything the train stage logged for one variant and seed (step rows and evaluation rows; the
        report's input)."""
        return self.curves_dir(experiment) / variant / f"seed{seed}.csv"

    def curve_plot(self, experiment: str, key: str) -> Path:
        """One logged quantity of every variant, long format (step, variant, ``key``): a DVC plot (dvc.yaml)."""
        return self.experiment_dir(experiment) / "plots" / f"{key}.csv"

    # --- evaluate
    def metrics(self, experiment: str) -> Path:
        return self.experiment_dir(experiment) / "metrics.json"

    def seed_metrics(self, experiment: str) -> Path:
        """Every seed's test metrics (variant → seed → metrics); metrics.json holds their mean and se."""
        return self.experiment_dir(experiment) / "seeds.json"

    def samples_dir(self, experiment: str) -> Path:
        return self.experiment_dir(experiment) / "samples"

    def sample_grid(self, experiment: str, variant: str) -> Path:
        return self.samples_dir(experiment) / f"{variant}.png"

    # --- fidelity, bench
    def fidelity(self, experiment: str) -> Path:
        return self.experiment_dir(experiment) / "fidelity.json"

    @property
    def memory_bench(self) -> Path:
        return self.results / "benchmarks" / "memory_depth.jsonl"

    # --- report: its own files, under report_dir
    report = _in_report_dir("REPORT.md")
    tables = _in_report_dir("tables")
    figures = _in_report_dir("figures")
    plots = _in_report_dir("plots")

    def rel_to_root(self, path: Path) -> str:
        """``path`` relative to the project (what outputs record, so they do not depend on the checkout's place)."""
        return Path(os.path.relpath(path, self.root)).as_posix()

    def rel(self, path: Path) -> str:
        """``path`` relative to the report's folder (links inside REPORT.md)."""
        return Path(os.path.relpath(path, self.report_dir)).as_posix()


def _replace_atomically(path: Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` then rename onto ``path``: a crash leaves the old file or the new, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)
    return path


def seed_of(path: Path) -> int | None:
    """The seed in a per-seed file's name (``seed3.pt`` → 3), None for another name."""
    digits = path.stem.removeprefix("seed")
    return int(digits) if path.stem.startswith("seed") and digits.isdigit() else None


def prune_seeds(folder: Path, suffix: str, keep: dict[str, list[int]]) -> None:
    """Remove what a per-seed output folder (``<folder>/<variant>/seed<s><suffix>``) holds beyond ``keep``
    (variant → seeds): files of dropped variants and seeds, and files of the one-model-per-variant layout
    (``<folder>/<variant><suffix>``). The outputs are DVC ``persist``, so DVC no longer clears them."""
    if not folder.exists():
        return
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix == suffix:
            path.unlink()
            print(f"removed {path} (the outputs are per seed now: <variant>/seed<s>{suffix})", flush=True)
        elif path.is_dir():
            for f in sorted(path.glob(f"*{suffix}")):
                if path.name not in keep or seed_of(f) not in keep[path.name]:
                    f.unlink()
                    print(f"removed {f} (variant {path.name!r}, seed {seed_of(f)} is no longer trained)", flush=True)
            if not any(path.iterdir()):
                path.rmdir()


def prune_variants(paths: list[Path], keep: set[str] | dict) -> None:
    """Remove the files (named ``<variant>.<ext>``) of variants not in ``keep``: stage outputs are DVC ``persist``,
    so DVC no longer clears them, and a variant dropped from params.yaml would otherwise linger."""
    for path in paths:
        if path.stem not in keep:
            path.unlink()
            print(f"removed {path} (variant {path.stem!r} is no longer in the experiment)", flush=True)


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return _replace_atomically(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, data: Any) -> Path:
    """``data`` as indented JSON with sorted keys (a stage output that is the same for the same inputs)."""
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def memory_bench_rows(lines: list[str], where: str) -> list[dict]:
    """benchmarks/memory_depth.py's rows (its closing ``summary`` line left out); an error names the line that is wrong."""
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}, line {i}: not JSON ({err})") from None
        if isinstance(obj, dict) and "summary" not in obj:
            if "variant" not in obj or "peak_bytes" not in obj:
                raise ValueError(f"{where}, line {i}: a benchmark row needs 'variant' and 'peak_bytes'")
            rows.append(obj)
    if not rows:
        raise ValueError(f"{where}: no benchmark rows")
    return rows


def load_splits(artifacts: Artifacts, dataset: str) -> dict:
    """A prepared dataset's splits (the prepare stage's output), checked against its manifest."""
    from deqsm.data import load_splits as load

    return load(artifacts.data_root, dataset)


# --- the trained-model file: written by the train stage, read by evaluate and fidelity
def save_model(path: Path, model: torch.nn.Module | dict[str, torch.Tensor], *, spec: dict[str, Any],
               train: dict[str, Any], fit: dict[str, Any], history: Any, mlflow_run_id: str,
               mlflow_variant_run_id: str | None = None) -> None:
    """Weights (on CPU; a module or its state dict) with what rebuilds the model (``spec``) and its training
    record; plain data only, so :func:`load_model` reads it with ``weights_only=True``. ``mlflow_run_id``: the
    run of this training (one seed), ``mlflow_variant_run_id``: the run of its variant (all seeds)."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    saved = {"state_dict": {k: v.cpu() for k, v in state.items()}, "spec": spec, "train": train,
             "fit": fit, "history": history, "mlflow_run_id": mlflow_run_id,
             "mlflow_variant_run_id": mlflow_variant_run_id}
    _replace_atomically(path, lambda tmp: torch.save(saved, tmp))


def load_model(path: Path, train: torch.Tensor):
    """Rebuild a saved variant: its spec builds the architecture, the weights load with ``weights_only``.
    Returns ``(spec, model, saved)``."""
    from deqsm.experiments import VariantSpec, build

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — re-raised naming the file
        raise ValueError(f"cannot load model file {path}: {err}") from err
    spec = VariantSpec(**saved["spec"])
    model, _ = build(spec, train)
    model.load_state_dict(saved["state_dict"])
    return spec, model, saved
