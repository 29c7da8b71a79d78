"""The short fine-tune benchmark's table: every point's figures, the demo marked, the recipes."""

import pytest

from tests.helpers import benchmark_module


@pytest.fixture(scope="module")
def short_finetune():
    return benchmark_module("short_finetune")


def point(target: str, ratio: float, finetuned: float, epochs: int = 2, flags=()) -> dict:
    return {
        "target": target,
        "epochs": epochs,
        "fine_tune_flags": list(flags),
        "macs_kept": 0.42,
        "round_to": 16,
        "latency_ratio": ratio,
        "latency_ms": [6.0, 6.0 * ratio],
        "map_original": 0.8,
        "map_one_shot": 0.5,
        "map_finetuned": finetuned,
        "stage_seconds": {"fine-tune": 130.4},
        "process_seconds": 171.6,
    }


def test_the_table_states_each_point_and_marks_what_make_compile_runs(short_finetune):
    result = {
        "machine": {"cpu": "test cpu", "cpu_flags": ["avx2"], "cores_available": 2},
        "threads": 2,
        "model": "m",
        "data": "d",
        "epochs": 2,
        "demo": "--macs 0.4 --epochs 3 --eval-every 0",
        "front": [
            point("--speedup 1.75", 0.559, 0.72),
            point("--macs 0.4", 0.553, 0.76),
            point("--macs 0.4", 0.56, 0.765, epochs=3),
            point("--macs 0.4", 0.55, 0.77, epochs=3, flags=("--eval-every", "0")),
        ],
        "recipes": {"previous recipe": {"map_per_epoch": [0.4687, 0.56], "seconds": 129.2}},
    }
    text = short_finetune.render(result, "x.png")
    rows = [line for line in text.splitlines() if line.startswith("| `--")]
    assert rows[0] == (
        "| `--speedup 1.75` | 2 | 0.420 | 16 | 0.559 | 0.5000 | 0.7200 (90.0%) | 130 | 172 |"
    )
    assert rows[1].startswith("| `--macs 0.4` | 2 | ") and "0.7600 (95.0%)" in rows[1]
    assert rows[2].startswith("| `--macs 0.4` | 3 | 0.420 | 16 | 0.560 |")  # other flags
    assert rows[3].startswith("| `--macs 0.4` (`make compile`) | 3 | 0.420 | 16 | 0.550 |")
    assert "| previous recipe | 0.4687 → 0.5600 | 129 |" in text
    assert "test cpu (avx2), 2 cores" in text and "![latency against mAP](x.png)" in text
