"""The one timing primitive every runtime uses: warm-up, synchronise, median / p90 / min.

Every runtime (ONNX Runtime, PyTorch CPU/CUDA, TensorRT) times through :func:`interleaved`. A
runtime whose work is asynchronous passes ``sync`` (wait for the device) and may pass a
``clock``: the default reads the host's perf counter around the synchronised call, while
:class:`CudaEventClock` reads CUDA events recorded on the stream, which excludes host jitter.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p90_ms: float
    min_ms: float
    runs: int
    warmup: int

    def to_dict(self) -> dict:
        return asdict(self)


# The most timed calls a time budget (``interleaved(seconds=...)``) extends a measurement to.
MAX_RUNS = 300


def _summarise(samples_ms: list[float], warmup: int) -> Timing:
    ordered = sorted(samples_ms)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return Timing(statistics.median(ordered), p90, ordered[0], len(ordered), warmup)


class HostClock:
    """Wall time on the host from ``start`` to ``stop`` (which synchronises first)."""

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self, sync: Callable[[], None]) -> float:
        sync()
        return (time.perf_counter() - self._start) * 1e3


class CudaEventClock:
    """Time between two CUDA events recorded on ``stream`` (default: the current stream)."""

    def __init__(self, stream=None) -> None:
        import torch

        self._stream = stream  # None: the current stream
        self._begin = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        self._begin.record(self._stream)

    def stop(self, sync: Callable[[], None]) -> float:
        self._end.record(self._stream)
        sync()
        self._end.synchronize()
        return float(self._begin.elapsed_time(self._end))


Clock = HostClock | CudaEventClock


def measure(
    fn: Callable[[], object],
    runs: int = 20,
    warmup: int = 3,
    sync: Callable[[], None] | None = None,
    clock: Clock | None = None,
) -> Timing:
    """Time ``fn`` ``runs`` times after ``warmup`` calls; ``sync`` waits for async devices."""
    return interleaved({"_": fn}, runs=runs, warmup=warmup, sync=sync, clock=clock)["_"]


def interleaved(
    fns: dict[str, Callable[[], object]],
    runs: int = 20,
    warmup: int = 3,
    sync: Callable[[], None] | Mapping[str, Callable[[], None] | None] | None = None,
    clock: Clock | Mapping[str, Clock | None] | None = None,
    block: int = 1,
    rewarm: int = 0,
    seconds: float = 0.0,
) -> dict[str, Timing]:
    """Time several callables A B A B ... so machine noise hits them alike: ``runs`` timed
    calls each, taken in turns of ``block`` consecutive calls, every turn after ``rewarm``
    untimed calls (for runtimes whose idle threads spin on and would slow the next one). With
    ``seconds``, more turns follow while the slowest callable's timed total stays within it
    (at most :data:`MAX_RUNS` calls each): fast models get the runs their noise needs.

    ``sync`` and ``clock`` are one for all callables or a mapping by name (runners on their own
    streams: each is timed on its own clock, and every one is synchronised before a timed call
    starts, so no runner's queued work overlaps another's timing)."""
    if runs < 1 or warmup < 0 or block < 1 or rewarm < 0 or seconds < 0:
        raise ValueError("runs and block must be >= 1, warmup, rewarm and seconds >= 0")
    sync_of = sync if isinstance(sync, Mapping) else dict.fromkeys(fns, sync)
    clock_of = clock if isinstance(clock, Mapping) else dict.fromkeys(fns, clock)
    syncs = {name: sync_of.get(name) or _no_sync for name in fns}
    clocks = {name: clock_of.get(name) or HostClock() for name in fns}
    distinct = list({id(s): s for s in syncs.values()}.values())

    def sync_all() -> None:
        for s in distinct:
            s()

    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        syncs[name]()
    samples: dict[str, list[float]] = {name: [] for name in fns}

    def take(total: int) -> None:
        while len(next(iter(samples.values()))) < total:
            for name, fn in fns.items():
                for _ in range(rewarm):
                    fn()
                for _ in range(min(block, total - len(samples[name]))):
                    sync_all()
                    clocks[name].start()
                    fn()
                    samples[name].append(clocks[name].stop(syncs[name]))

    take(runs)
    if seconds:
        slowest = max(statistics.median(values) for values in samples.values())
        take(min(MAX_RUNS, max(runs, int(seconds * 1e3 / max(slowest, 1e-6)))))
    return {name: _summarise(values, warmup) for name, values in samples.items()}


def _no_sync() -> None:
    pass
