"""dvc.yaml's deps of each stage cover every file of this repo the stage runs, and stages are siblings.

A stage's code is its module (``python -m pipelines.<stage>``), every repo module it imports, directly or
through others (imports inside functions count: they run too), the packages' ``__init__.py`` files Python
executes on the way, and the repo scripts it names as paths (the bench stage runs
``benchmarks/memory_depth.py``). A file missing from the deps is a stale result waiting to happen: editing
it would leave outputs that `dvc repro` calls up to date.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("deqsm", "pipelines")
STAGE_MODULE = re.compile(r"python -m (pipelines\.[a-z_]+)")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of a repo module (``a.b`` → a/b.py or a/b/__init__.py), or None when it is not in the repo."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def with_parents(name: str) -> list[str]:
    """``a.b.c`` → ``a``, ``a.b``, ``a.b.c``: importing a module runs its packages' ``__init__`` first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Repo modules imported anywhere in ``path`` (top level or inside functions), and repo script paths it
    names in string literals."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}:{node.lineno}: a relative import (this walk reads absolute imports)"
            mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".py"):
            if (root / node.value).is_file():
                names.add("file:" + node.value)
    return {n for n in names if n.startswith("file:") or (n.split(".")[0] in PACKAGES and module_file(n, root))}


def stage_files(module: str, root: Path = ROOT) -> set[str]:
    """Every repo file (relative path) that running ``python -m <module>`` executes."""
    seen: set[str] = set()
    todo = [module]
    files: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name.startswith("file:"):
            rel = name[len("file:"):]
            files.add(rel)
            path = root / rel
        else:
            for parent in with_parents(name):
                if parent != name and parent not in seen:
                    todo.append(parent)
            path = module_file(name, root)
            if path is None:
                continue
            files.add(path.relative_to(root).as_posix())
        todo.extend(imported_modules(path, root) - seen)
    return files


def covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


def dvc_stages(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, tuple[str, list[str]]]:
    """stage name → (its pipelines module, its deps as written; templated deps are data, not code)."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        match = STAGE_MODULE.search(body["cmd"])
        assert match, f"stage {name}: cmd {body['cmd']!r} does not run `python -m pipelines.<stage>`"
        out[name] = (match.group(1), [d for d in body.get("deps", []) if "${" not in d])
    return out


def missing_deps(dvc_yaml: Path = ROOT / "dvc.yaml", root: Path = ROOT) -> dict[str, list[str]]:
    return {name: sorted(f for f in stage_files(module, root) if not covered(f, deps))
            for name, (module, deps) in dvc_stages(dvc_yaml).items()}


def test_every_stage_lists_the_code_it_runs():
    missing = {name: files for name, files in missing_deps().items() if files}
    assert not missing, "dvc.yaml deps miss files the stage imports or runs:\n" + "\n".join(
        f"  {name}: {', '.join(files)}" for name, files in missing.items())


def test_no_stage_imports_another_stage():
    stages = {module for module, _ in dvc_stages().values()}
    for module in stages:
        reached = {f for f in stage_files(module)} - {module_file(module).relative_to(ROOT).as_posix()}
        others = sorted(m for m in stages - {module} if module_file(m).relative_to(ROOT).as_posix() in reached)
        assert not others, f"{module} imports the stage(s) {others}: move the shared piece out of the stage"


def test_the_walk_finds_imports_inside_functions_and_named_scripts():
    """The derivation itself: evaluate imports the checkpoint format inside the artifacts module, the
    report's parts live in a package, and the bench stage runs a script it names."""
    assert {"pipelines/artifacts.py", "pipelines/settings.py", "pipelines/__init__.py",
            "pipelines/tracking.py"} <= stage_files("pipelines.evaluate")
    assert "deqsm/experiments.py" in stage_files("pipelines.evaluate")  # imported inside load_model
    assert {"pipelines/reporting/__init__.py", "pipelines/reporting/figures.py"} <= stage_files("pipelines.report")
    assert "benchmarks/memory_depth.py" in stage_files("pipelines.bench")


OLD_DVC_YAML = """
stages:
  train:
    foreach: ${experiments}
    do:
      cmd: python -m pipelines.train --params params.yaml --experiment ${key}
      deps: [pipelines/train.py, pipelines/settings.py, pipelines/tracking.py, deqsm]
  report:
    cmd: python -m pipelines.report --params params.yaml
    deps: [pipelines/report.py, pipelines/settings.py, pipelines/tracking.py, pipelines/evaluate.py, deqsm]
"""


def test_a_stage_that_misses_an_imported_file_is_caught(tmp_path):
    """dvc.yaml as it was before the stages were split: train's deps lacked what it imports."""
    path = tmp_path / "dvc.yaml"
    path.write_text(OLD_DVC_YAML)
    missing = missing_deps(path)
    assert "pipelines/artifacts.py" in missing["train"] and "pipelines/__init__.py" in missing["train"]
    assert "pipelines/reporting/inputs.py" in missing["report"]


@pytest.mark.parametrize("stage", ["tune", "train", "evaluate", "fidelity"])
def test_per_experiment_stages_read_their_experiments_data(stage):
    """The data deps of the per-experiment stages: the prepared dataset of the experiment (templated)."""
    body = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["do"]
    assert "${data.root}/${item.dataset}" in body["deps"]


def stage_params(stage: str) -> list[str]:
    body = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    return body.get("do", body).get("params", [])


def test_tune_depends_on_the_train_keys_its_trials_read_and_no_others():
    """Trials take every train.* setting but steps (tune.steps), progress and checkpoint_every, and take seed and
    device from base: exactly those train.* keys are tune's params, so that changing train.steps re-runs the
    train stage and not the search. Each listed key is in params.yaml (DVC fails on a missing one)."""
    from deqsm.train import TrainSettings
    from pipelines.tune import NOT_FROM_TRAIN

    read = set(TrainSettings.model_fields) - set(NOT_FROM_TRAIN) - {"seed", "device"}
    listed = {p.split(".", 1)[1] for p in stage_params("tune") if p.startswith("train.")}
    assert listed == read
    assert "train" not in stage_params("tune") and "base" not in stage_params("tune")
    assert {"base.seed", "base.device"} <= set(stage_params("tune"))
    in_file = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    assert listed <= set(in_file), f"params.yaml's train section lacks {sorted(listed - set(in_file))}"


def test_search_config_leaves_out_what_the_search_does_not_read():
    from pipelines.settings import load_params
    from pipelines.tune import search_config

    settings = load_params(ROOT / "params.yaml")
    name = next(iter(settings.experiments))
    cfg = search_config(settings, name, next(iter(settings.experiments[name].variants)))
    assert cfg["train"]["steps"] == settings.tune.steps
    assert "progress" not in cfg["train"] and "checkpoint_every" not in cfg["train"] and "eval_options" not in cfg


def test_train_depends_on_its_experiments_own_train_values():
    """An experiment's step cap (experiments.<exp>.train.steps) is read by the train stage only, and may be unset:
    the stage lists the whole experiment (DVC stops on a listed key that params.yaml lacks)."""
    assert "experiments.${key}" in stage_params("train")
    assert "train.steps" in stage_params("train") and "train.steps" not in stage_params("tune")
