"""The one timing primitive every runtime uses: warm-up, synchronise, median / p90 / min."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
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


def _summarise(samples_ms: list[float], warmup: int) -> Timing:
    ordered = sorted(samples_ms)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return Timing(statistics.median(ordered), p90, ordered[0], len(ordered), warmup)


def measure(
    fn: Callable[[], object],
    runs: int = 20,
    warmup: int = 3,
    sync: Callable[[], None] | None = None,
) -> Timing:
    """Time ``fn`` ``runs`` times after ``warmup`` calls; ``sync`` waits for async devices."""
    return interleaved({"_": fn}, runs=runs, warmup=warmup, sync=sync)["_"]


def interleaved(
    fns: dict[str, Callable[[], object]],
    runs: int = 20,
    warmup: int = 3,
    sync: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Time several callables A B A B ... so machine noise hits them alike."""
    if runs < 1 or warmup < 0:
        raise ValueError("runs must be >= 1 and warmup >= 0")
    sync = sync or (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
        sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: _summarise(values, warmup) for name, values in samples.items()}
