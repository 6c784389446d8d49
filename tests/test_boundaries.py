"""Architecture boundaries: the core never imports the orchestration stack."""
import subprocess
import sys


def test_import_deqsm_does_not_import_ray_mlflow_dvc():
    code = (
        "import sys, deqsm, deqsm.solvers, deqsm.deq, deqsm.losses, deqsm.metrics.memory, deqsm.models.energy_mlp\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'mlflow', 'dvc'})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_registry_refuses_duplicates_and_lists_names():
    import pytest

    from deqsm.registry import Registry, UnknownNameError

    reg: Registry[int] = Registry("widget")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a")(2)
    with pytest.raises(UnknownNameError, match="unknown widget 'b'; known: a"):
        reg.get("b")
