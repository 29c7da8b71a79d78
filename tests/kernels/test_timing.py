import time

import pytest

from kernels.ort import default_threads, machine_info
from kernels.timing import interleaved, measure


def test_measure_a_known_sleep():
    timing = measure(lambda: time.sleep(0.02), runs=5, warmup=1)
    assert 19.0 <= timing.min_ms <= timing.median_ms <= timing.p90_ms
    assert timing.median_ms < 60.0
    assert timing.runs == 5 and timing.warmup == 1


def test_interleaved_runs_alternately_and_separates_durations():
    calls = []
    fns = {
        "short": lambda: (calls.append("s"), time.sleep(0.002)),
        "long": lambda: (calls.append("l"), time.sleep(0.012)),
    }
    result = interleaved(fns, runs=4, warmup=1)
    assert calls[2:] == ["s", "l"] * 4  # after one warm-up call each, A B A B
    assert result["long"].median_ms > result["short"].median_ms + 5


def test_invalid_counts():
    with pytest.raises(ValueError):
        measure(lambda: None, runs=0)


def test_machine_info_names_cpu_and_versions():
    info = machine_info()
    assert info["cores_available"] == default_threads() >= 1
    assert info["cpu"] and info["onnxruntime"] and info["torch"]
