import time

import pytest

from tests.kernels.test_runner import FixedClock
from yoloprune.kernels import timing
from yoloprune.kernels.ort import default_threads, machine_info
from yoloprune.kernels.timing import interleaved, measure


@pytest.mark.timing
def test_measure_a_known_sleep():
    timing = measure(lambda: time.sleep(0.02), runs=5, warmup=1)
    assert 19.0 <= timing.min_ms <= timing.median_ms <= timing.p90_ms
    assert timing.median_ms < 60.0
    assert timing.runs == 5 and timing.warmup == 1


@pytest.mark.timing
def test_interleaved_runs_alternately_and_separates_durations():
    calls = []
    fns = {
        "short": lambda: (calls.append("s"), time.sleep(0.002)),
        "long": lambda: (calls.append("l"), time.sleep(0.012)),
    }
    result = interleaved(fns, runs=4, warmup=1)
    assert calls[2:] == ["s", "l"] * 4  # after one warm-up call each, A B A B
    assert result["long"].median_ms > result["short"].median_ms + 5


def test_interleaved_blocks_with_untimed_rewarm_calls():
    calls = []
    fns = {tag: (lambda tag=tag: calls.append(tag)) for tag in ("a", "b")}
    result = interleaved(fns, runs=5, warmup=0, block=2, rewarm=1)
    # turns: a (1 untimed + 2 timed), b (same), a, b, then each one's last timed call
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 2 + ["b"] * 2
    assert result["a"].runs == result["b"].runs == 5
    with pytest.raises(ValueError):
        interleaved(fns, runs=1, block=0)


@pytest.mark.parametrize(
    ("slow_ms", "seconds", "runs"),
    [(10.0, 0.2, 20), (10.0, 0.0, 5), (100.0, 0.2, 5), (0.001, 1.0, timing.MAX_RUNS)],
)
def test_a_time_budget_extends_the_runs_of_fast_models(slow_ms, seconds, runs):
    """At least ``runs=5``; with a budget, as many as the slowest callable's timed total fits
    (0.2 s of 10 ms calls: 20), never more than MAX_RUNS, every callable alike."""
    calls = []
    fns = {tag: (lambda tag=tag: calls.append(tag)) for tag in ("fast", "slow")}
    clocks = {"fast": FixedClock(1.0), "slow": FixedClock(slow_ms)}
    result = interleaved(fns, runs=5, warmup=0, clock=clocks, seconds=seconds)
    assert result["fast"].runs == result["slow"].runs == runs
    assert calls == ["fast", "slow"] * runs
    with pytest.raises(ValueError):
        interleaved(fns, runs=5, seconds=-1)


def test_invalid_counts():
    with pytest.raises(ValueError):
        measure(lambda: None, runs=0)


def test_machine_info_names_cpu_and_versions():
    info = machine_info()
    assert info["cores_available"] == default_threads() >= 1
    assert info["cpu"] and info["onnxruntime"] and info["torch"]


def test_host_clock_synchronises_before_reading():
    synced = []
    timing = measure(
        lambda: None, runs=3, warmup=0, sync=lambda: (synced.append(1), time.sleep(0.01))
    )
    # sync is part of the timed region (it is what waits for asynchronous devices)
    assert timing.min_ms >= 9.0
    assert len(synced) == 1 + 2 * 3  # after warm-up, then before each start and in each stop


@pytest.mark.gpu
def test_cuda_event_clock_times_gpu_work():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    from yoloprune.kernels.timing import CudaEventClock

    a = torch.rand(4096, 4096, device="cuda")
    small = measure(lambda: a[:256, :256] @ a[:256, :256], runs=10, clock=CudaEventClock())
    large = measure(lambda: a @ a, runs=10, clock=CudaEventClock())
    assert large.median_ms > small.median_ms > 0
