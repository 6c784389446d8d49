"""benchmarks/mutation_check.py: a deliberate bug is caught by the tests named for it, a harmless edit is reported
as surviving, a mutation whose text moved is refused by name, and the working tree is never touched."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "mutation_check.py"
TARGET = "deqsm/metrics/density.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def digest():
    return hashlib.sha256((ROOT / TARGET).read_bytes()).hexdigest()


def test_a_bug_is_caught_a_harmless_edit_survives_and_the_tree_is_untouched():
    before = digest()
    caught = run("--only", "fisher divergence: the 1/2 dropped")
    rows = [json.loads(line) for line in caught.stdout.splitlines()]
    assert caught.returncode == 0, caught.stderr
    assert rows[0]["caught"] and rows[0]["failed_tests"] == [
        "tests/test_density_metrics.py::test_fisher_divergence_equals_its_closed_form_between_gaussians"]
    assert rows[-1]["summary"] == {"mutations": 1, "caught": 1, "survived": []}
    harmless = run("--file", TARGET, "--old", "averaged over the rows of ``x``.", "--new", "averaged over x's rows.",
                   "--tests", "tests/test_density_metrics.py")
    rows = [json.loads(line) for line in harmless.stdout.splitlines()]
    assert harmless.returncode == 1 and not rows[0]["caught"] and rows[-1]["summary"]["survived"] == ["ad hoc"]
    assert digest() == before


def test_a_mutation_whose_text_moved_is_refused_by_name():
    out = run("--file", TARGET, "--old", "no such line", "--new", "x", "--tests", "tests/test_density_metrics.py")
    assert out.returncode != 0 and "expected one occurrence of its text in deqsm/metrics/density.py, found 0" in out.stderr
    assert "needs --file, --old, --new and --tests" in run("--file", TARGET).stderr
    listed = [json.loads(line)["mutation"] for line in run("--list").stdout.splitlines()]
    assert "phantom takes K+1 steps" in listed and len(listed) == len(set(listed))
