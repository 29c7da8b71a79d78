"""The allocation demo benchmark runs `make compile`'s own command line, and its table."""

import shutil

import pytest

from tests.benchmarks.test_demo_seeds import HEADER
from tests.helpers import benchmark_module


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_it_runs_make_compiles_command_line_on_the_given_data(tmp_path, monkeypatch):
    """The default command line, whatever the environment sets (an outer make's flags, the
    Makefile's variables)."""
    module = benchmark_module("demo_allocation")
    monkeypatch.setenv("MACS", "0.9")
    monkeypatch.setenv("ARGS", "--seed 5")
    monkeypatch.setenv("MAKEFLAGS", "EPOCHS=1")
    args = module.make_compile_args(tmp_path / "d.yaml")
    assert args == [
        "graphs/weights/yolov5n-shapes.pt", "--macs", "0.35", "--data", str(tmp_path / "d.yaml"),
        "--epochs", "7", "--batch", "16", "--lr0", "0.005", "--eval-every", "0",
    ]  # fmt: skip


def test_the_table_lists_every_run_and_each_allocations_means():
    module = benchmark_module("demo_allocation")

    def run(seed, one_shot, tuned, latency, measured):
        return {
            "seed": seed, "macs_kept": 0.35, "round_to": 16, "max_ratio": 0.75,
            "map_original": 0.8375, "map_one_shot": one_shot, "map_fine_tuned": tuned,
            "latency_ratio": latency, "allocation_seconds": measured, "seconds": 120.0,
        }  # fmt: skip

    result = {
        "machine": HEADER["machine"],
        "command": "python -m yoloprune compile m --seed S",
        "runs": {
            "sensitivity (default)": [run(0, 0.58, 0.81, 0.54, 6.8), run(1, 0.57, 0.80, 0.56, 7)],
            "uniform (before 2026-12-02)": [run(0, 0.55, 0.80, 0.55, None)],
        },
    }
    text = module.render(result)
    assert (
        "| sensitivity (default) | 0 | 0.350 | 16 | 0.75 | 0.5800 | 0.8100 | 0.540 | 6.8 |" in text
    )
    assert (
        "| uniform (before 2026-12-02) | 0 | 0.350 | 16 | 0.75 | 0.5500 | 0.8000 | 0.550 |  |"
        in text
    )
    assert (
        "- sensitivity (default): one-shot 0.5750, fine-tuned 0.8050, latency ratio 0.550" in text
    )
