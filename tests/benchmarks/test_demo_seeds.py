"""The seed benchmark's table: each recipe's mAP per seed, mean and spread, the paired gain."""

from tests.helpers import benchmark_module

HEADER = {
    "machine": {"cpu": "test cpu", "cpu_flags": ["avx2"], "cores_available": 2},
    "threads": 2,
    "model": "m",
    "data": "d",
    "start": "s",
}


def test_the_table_gives_each_seed_the_mean_and_the_paired_gain():
    module = benchmark_module("demo_seeds")
    runs = {
        "defaults (lr0 0.003)": [{"seed": s, "map": m} for s, m in ((0, 0.70), (1, 0.72))],
        "--lr0 0.005": [{"seed": s, "map": m} for s, m in ((0, 0.73), (1, 0.72))],
    }
    result = {
        **HEADER,
        "fine_tune": "--epochs 7 --eval-every 0",
        "one_shot": {"map_original": 0.8, "map_one_shot": 0.5},
        "runs": runs,
    }
    text = module.render(result)
    assert "| recipe | seed 0 | seed 1 | mean | spread |" in text
    assert "| defaults (lr0 0.003) | 0.7000 | 0.7200 | 0.7100 (88.8%) | 0.0200 |" in text
    assert "| --lr0 0.005 | 0.7300 | 0.7200 | 0.7250 (90.6%) | 0.0100 |" in text
    assert "seed by seed: +0.0300, +0.0000 (mean +0.0150, standard deviation 0.0212)" in text


def test_the_demo_budget_table_shows_the_last_epoch_make_compile_keeps():
    module = benchmark_module("demo_budget")
    curve = [
        {
            "epochs": 2,
            "map_best": 0.75,
            "map_per_epoch": [0.75, 0.74],
            "seconds": 30.0,
            "train_seconds": 25.0,
        },
    ]
    result = {
        **HEADER,
        "one_shot": {"macs_kept": 0.35, "map_one_shot": 0.5, "map_original": 0.8},
        "demo_epochs": 2,
        "curve": curve,
        "variants": {"--lr0 0.005": {"map_best": 0.76, "seconds": 31.0, "train_seconds": 26.0}},
    }
    text = module.render(result, "x.png")
    assert "| 2 (`make compile`) | 0.7500 (93.8%) | 0.7400 | 0.7500 → 0.7400 | 25 | 30 |" in text
    assert "| `--lr0 0.005` | 0.7600 (95.0%) | 26 |" in text
