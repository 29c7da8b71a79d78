"""The batch benchmark's table: each recipe's mAP and seconds per seed, the means and the time
against the defaults' row; its recipe is the one `make compile` runs."""

from pathlib import Path

from tests.benchmarks.test_demo_seeds import HEADER
from tests.helpers import benchmark_module


def runs(*cells):
    return [{"seed": s, "map": m, "seconds": t} for s, (m, t) in enumerate(cells)]


def test_the_table_gives_each_seed_the_means_and_the_time_against_the_defaults():
    module = benchmark_module("demo_batch")
    result = {
        **HEADER,
        "mixed_precision": "bf16",
        "fine_tune": "--eval-every 0",
        "one_shot": {"map_original": 0.8, "map_one_shot": 0.5},
        "runs": {
            "batch 8": runs((0.70, 100.0), (0.72, 120.0)),
            "batch 16": runs((0.71, 80.0), (0.73, 85.0)),
        },
    }
    text = module.render(result, "x.png")
    assert "the student's forward in bf16" in text
    header = "| recipe | seed 0: mAP, s | seed 1: mAP, s | mean mAP (of original) | mean s |"
    assert header + " time / defaults |" in text
    assert "| batch 8 | 0.7000, 100 | 0.7200, 120 | 0.7100 (88.8%) | 110 | 1.00 |" in text
    assert "| batch 16 | 0.7100, 80 | 0.7300, 85 | 0.7200 (90.0%) | 82 | 0.75 |" in text
    assert "![mAP against fine-tune seconds](x.png)" in text


def test_the_recipe_make_compile_runs_is_one_the_benchmark_measured():
    module = benchmark_module("demo_batch")
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    measured = [changes for changes in module.RECIPES.values() if changes.get("batch") == 16]
    assert {"epochs": 7, "batch": 16, "lr0": 0.005} in measured
    for line in ("DEMO_EPOCHS := 7", "DEMO_BATCH := 16", "DEMO_LR0 := 0.005"):
        assert line in makefile
