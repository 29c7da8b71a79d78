"""The Makefile's compile line (the embedded model's demo recipe, and every value given passed on
unchanged) and its test line, checked with ``make -n``: nothing runs."""

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = "graphs/weights/yolov5n-shapes.pt"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def compile_line(*assignments: str) -> list[str]:
    out = subprocess.run(
        ["make", "-n", "compile", *assignments], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "-m yoloprune compile" in line]
    assert len(lines) == 1, out.stdout
    return lines[0].split()[lines[0].split().index("compile") + 1 :]


def test_the_embedded_model_compiles_at_macs_0_35_with_a_short_fine_tune():
    args = compile_line()
    assert args[0] == EMBEDDED
    assert " ".join(args[1:]) == (
        "--macs 0.35 --data runs/data/shapes/data.yaml --epochs 7 --batch 16 --lr0 0.005 "
        "--eval-every 0 --out runs/compile"
    )


def test_the_short_finetune_benchmark_measures_what_make_compile_runs():
    module = benchmark_module("short_finetune")
    kind, value, epochs = module.DEMO
    line = " ".join(compile_line())
    assert f"--{kind} {value:g} " in line
    assert f"--epochs {epochs} {' '.join(module.DEMO_FLAGS)} " in line


def test_the_demo_budget_benchmark_marks_make_compiles_epochs():
    module = benchmark_module("demo_budget")
    assert f"--epochs {module.DEMO_EPOCHS} " in " ".join(compile_line()) + " "
    assert module.DEMO_EPOCHS in module.EPOCHS


@pytest.mark.parametrize(
    ("given", "present", "absent"),
    [
        (["MACS=0.5"], ["--macs 0.5", "--epochs 7 --batch 16"], ["--speedup", "0.35"]),
        (["RATIO=0.3", "EPOCHS=2"], ["--ratio 0.3", "--epochs 2"], ["--eval-every", "--batch"]),
        (["ARGS=--batch 4"], ["--batch 16 --lr0 0.005", "--out runs/compile --batch 4"], []),
        (["SPEEDUP=2"], ["--speedup 2 ", "--epochs 7"], ["--macs"]),
        (["EPOCHS=0"], ["--macs 0.35"], ["--epochs", "--eval-every", "--batch", "--lr0"]),
        (["MODEL=x.pt"], ["x.pt --out runs/compile"], ["--speedup", "--epochs", "--data"]),
        (["MODEL=x.pt", "DATA=d.yaml", "EPOCHS=3"], ["--data d.yaml --epochs 3"], ["--speedup"]),
    ],
)
def test_given_values_are_passed_on_and_other_models_get_the_cli_defaults(given, present, absent):
    line = " ".join(compile_line(*given)) + " "
    for flag in present:
        assert flag in line
    for flag in absent:
        assert flag not in line


def test_make_test_runs_the_timing_tests_alone_after_the_parallel_run():
    """The wall-clock assertions (marker ``timing``) would compete with the other workers."""
    out = subprocess.run(["make", "-n", "test"], cwd=ROOT, text=True, capture_output=True)
    assert out.returncode == 0, out.stderr
    runs = [
        line.split("-m pytest", 1)[1] for line in out.stdout.splitlines() if "-m pytest" in line
    ]
    assert runs == [' -q -n auto --dist loadfile -m "not timing"', " -q -m timing"]


def test_auto_workers_follow_the_cpu_affinity(monkeypatch):
    """`-n auto` counts the cores this process may use, not the host's; the variable
    pytest-xdist reads still decides where it is set."""
    import os

    from tests.conftest import pytest_xdist_auto_num_workers

    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "5")
    assert pytest_xdist_auto_num_workers(None) is None
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert pytest_xdist_auto_num_workers(None) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert pytest_xdist_auto_num_workers(None) == 3
