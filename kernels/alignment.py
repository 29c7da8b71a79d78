"""Channel alignment measured on the runtime: which multiple of channels kept convs run fastest.

Convolution kernels work on blocks of channels (ONNX Runtime's CPU convolutions: 8 channels on
AVX2, 16 on AVX-512, and chains of convs whose counts fit the block stay in the blocked layout
without reorders between them; TensorRT: 8 for FP16 tensor cores, 32 for INT8). A conv whose
channel count is not a multiple of the block pays for the padded remainder and the reorders.
Single convs timed alone miss the reorders (measured here on AVX-512: 16-aligned single convs
0.94x the time at equal MACs, whole pruned YOLOv5n 0.77x), so the profile times *chains*: four
``Conv + SiLU`` of ``c`` channels (1x1, 3x3, 1x1, 3x3, a bottleneck's pattern), ``c`` every
multiple of 8 across two bands (narrow at 32x32, wide at 16x16). The times live in a table
like the per-layer latency tables (:mod:`kernels.latency_table`): measured once per machine and
runtime (about 2 s on ONNX Runtime CPU), then read from the cache.

Candidates are compared at equal MACs. With alignment ``a`` the counts a layer can keep are the
multiples of ``a``; a plan that must spend ``M`` MACs in such layers mixes neighbouring counts,
so its time is the linear interpolation, in (MACs, ms), between the measured multiples of ``a``
around ``M``. A candidate's *relative latency* is the geometric mean, over both bands and every
measured count, of that interpolated time over the measured time at the count itself (alignment
8: exactly 1). Below 1: the coarser alignment is faster at the same MACs on this runtime.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass

from torch import nn

from yoloprune.kernels.latency_table import ConvLayer, LatencyTable, conv_silu_onnx

CANDIDATES = (8, 16, 32)  # every band's ends are multiples of the largest
KERNELS = (1, 3, 1, 3)  # the chain: a bottleneck's 1x1 and 3x3 convs, twice


@dataclass(frozen=True)
class ChainShape:
    """Four ``Conv + SiLU`` of ``channels`` in and out, at ``size`` x ``size``."""

    channels: int
    size: int

    @property
    def cin(self) -> int:
        return self.channels

    @property
    def height(self) -> int:
        return self.size

    @property
    def width(self) -> int:
        return self.size

    def key(self) -> str:
        return f"chain-c{self.channels}-{self.size}x{self.size}"

    def macs(self) -> int:
        return sum(self.channels**2 * k * k for k in KERNELS) * self.size**2

    def module(self) -> nn.Module:
        layers = []
        for k in KERNELS:
            layers += [nn.Conv2d(self.channels, self.channels, k, 1, k // 2), nn.SiLU()]
        return nn.Sequential(*layers).eval()

    def onnx(self, batch: int, precision: str = "fp32"):
        """Built directly (milliseconds), as :func:`kernels.latency_table.conv_onnx` is."""
        import numpy as np

        rng = np.random.default_rng(0)
        c, layers = self.channels, []
        for k in KERNELS:
            w = rng.standard_normal((c, c, k, k), dtype=np.float32) / math.sqrt(c * k * k)
            layers.append(ConvLayer(w, w[:, 0, 0, 0].copy(), 1, k // 2))
        return conv_silu_onnx(layers, [batch, c, self.size, self.size], "chain", precision)


class ChainTable(LatencyTable):
    """The alignment profile's times: chain shapes, cached beside the latency tables."""

    FORMAT = "yoloprune.alignment-profile.v1"
    KEY = re.compile(r"chain-c\d+-\d+x\d+")
    FOLDER = "alignment"
    FIX = (
        "delete it (it is measured again: about 2 s on ONNX Runtime CPU, an engine build per "
        "chain on TensorRT) or pass --round-to K"
    )


@dataclass(frozen=True)
class Band:
    """Chains at ``size`` x ``size``, ``low`` to ``high`` channels in steps of 8."""

    size: int
    low: int
    high: int

    def shapes(self) -> list[ChainShape]:
        return [ChainShape(c, self.size) for c in range(self.low, self.high + 1, 8)]


# 30 chains, the largest ~40 MMACs per conv: about 2 s in all on two CPU cores, once.
BANDS = (Band(32, 32, 128), Band(16, 128, 256))
# On a GPU those chains take microseconds, less than launching them: the GPU runtimes (torch,
# tensorrt) time the same channel counts at the sizes a 640 px YOLO runs them (stride 4 and 8).
GPU_BANDS = (Band(160, 32, 128), Band(80, 128, 256))


def bands_for(runtime: str) -> tuple[Band, ...]:
    """The profile's bands on ``runtime``: CPU-sized on ort, GPU-sized on torch and tensorrt."""
    return BANDS if runtime == "ort" else GPU_BANDS


def _interpolate(points: list[tuple[int, float]], x: int) -> float:
    """Piecewise-linear ``y(x)`` through ``points`` (sorted by x; x within their range)."""
    xs = [p[0] for p in points]
    if not xs[0] <= x <= xs[-1]:
        raise ValueError(f"{x} is outside the measured range {xs[0]}..{xs[-1]}")
    i = bisect.bisect_left(xs, x)
    if xs[i] == x:
        return points[i][1]
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def relative_latency(
    table: LatencyTable,
    bands: tuple[Band, ...] = BANDS,
    candidates: tuple[int, ...] = CANDIDATES,
) -> dict[int, float]:
    """Each candidate alignment's time at equal MACs relative to every multiple of 8 (see the
    module docstring), from ``table`` (measured on demand)."""
    for band in bands:
        if any(band.low % a or band.high % a for a in candidates):
            raise ValueError(f"{band} does not start and end on every candidate alignment")
    table.ensure([s for band in bands for s in band.shapes()])
    logs: dict[int, list[float]] = {a: [] for a in candidates}
    for band in bands:
        measured = {s: table[s] for s in band.shapes()}
        for a in candidates:
            points = [(s.macs(), ms) for s, ms in measured.items() if s.channels % a == 0]
            logs[a] += [math.log(_interpolate(points, s.macs()) / ms) for s, ms in measured.items()]
    return {a: math.exp(sum(v) / len(v)) for a, v in logs.items()}
