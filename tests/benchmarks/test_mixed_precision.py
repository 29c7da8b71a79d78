"""The mixed-precision benchmark's table: each precision's mAP per seed, mean and fine-tune
seconds, the paired differences and the step timing."""

from tests.benchmarks.test_demo_seeds import HEADER
from tests.helpers import benchmark_module


def test_the_table_pairs_each_seed_in_fp32_and_bf16():
    module = benchmark_module("mixed_precision")

    def runs(maps, seconds):
        return [
            {"seed": s, "map": m, "seconds": t}
            for s, (m, t) in enumerate(zip(maps, seconds, strict=True))
        ]

    result = {
        **HEADER,
        "cpu_computes_bf16": True,
        "fine_tune": "--epochs 7 --eval-every 0",
        "one_shot": {"map_original": 0.8, "map_one_shot": 0.5},
        "runs": {
            "fp32 (--no-amp)": runs((0.70, 0.72), (100.0, 110.0)),
            "bf16 (--amp)": runs((0.71, 0.70), (90.0, 88.0)),
        },
        "steps": {
            "batch": 8,
            "imgsz": 256,
            "rounds": 15,
            "steps_per_round": 10,
            "fp32_ms": 60.0,
            "bf16_ms": 51.0,
            "ratio": 0.85,
        },
    }
    text = module.render(result)
    assert "bf16 instructions: yes." in text
    assert "| precision | seed 0 | seed 1 | mean | fine-tune s |" in text
    assert "| fp32 (--no-amp) | 0.7000 | 0.7200 | 0.7100 (88.8%) | 100 / 110 |" in text
    assert "| bf16 (--amp) | 0.7100 | 0.7000 | 0.7050 (88.1%) | 90 / 88 |" in text
    assert "seed by seed: +0.0100, -0.0200 (mean -0.0050)" in text
    assert "bf16 / fp32 per seed: 0.90, 0.80." in text
    assert "fp32 60.0 ms, bf16 51.0 ms (ratio 0.850)" in text
