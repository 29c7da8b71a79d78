"""Where an ONNX model's time goes on ONNX Runtime's CPU provider: per operator type, and per
convolution with its multiply-accumulates, from ONNX Runtime's own profiler.

The profiler's JSON is written into a temporary folder and removed once read; only the runs
after the warm-up are counted (each node's kernel time falls inside one ``model_run`` event)."""

from __future__ import annotations

import json
import statistics
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from yoloprune.kernels.ort import _onnxruntime, default_threads, session_options

CONV_OPS = ("Conv", "FusedConv")


@dataclass(frozen=True)
class ConvTime:
    """One convolution node: its mean kernel time per run and its multiply-accumulates."""

    name: str
    ms: float
    macs: int

    @property
    def gmacs_per_s(self) -> float:
        return self.macs / self.ms / 1e6 if self.ms > 0 else 0.0


@dataclass(frozen=True)
class OrtProfile:
    """Mean kernel milliseconds per run by operator type, the convolutions one by one, and the
    median wall time of a run (kernels plus the session's own overhead)."""

    runs: int
    run_ms: float
    op_ms: dict[str, float]
    convs: list[ConvTime]

    @property
    def kernel_ms(self) -> float:
        return sum(self.op_ms.values())

    @property
    def conv_ms(self) -> float:
        return sum(ms for op, ms in self.op_ms.items() if op in CONV_OPS)

    @property
    def other_ms(self) -> float:
        return self.kernel_ms - self.conv_ms

    @property
    def conv_macs(self) -> int:
        return sum(c.macs for c in self.convs)

    @property
    def conv_gmacs_per_s(self) -> float:
        return self.conv_macs / self.conv_ms / 1e6 if self.conv_ms > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "kernel_ms": self.kernel_ms,
            "conv_ms": self.conv_ms,
            "other_ms": self.other_ms,
            "conv_macs": self.conv_macs,
            "conv_gmacs_per_s": self.conv_gmacs_per_s,
        }


def profile_onnx(
    path: str | Path,
    images: np.ndarray,
    runs: int = 30,
    warmup: int = 3,
    threads: int | None = None,
) -> OrtProfile:
    """Run ``path`` ``warmup + runs`` times on ``images`` with ONNX Runtime's profiler on (the
    same session options as :class:`kernels.ort.OrtRunner`, spinning off) and summarise the
    last ``runs``."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0 (got {runs}, {warmup})")
    ort = _onnxruntime()
    with tempfile.TemporaryDirectory(prefix="yoloprune-profile-") as folder:
        options = session_options(ort, threads or default_threads(), spinning=False)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: images}
        for _ in range(warmup + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    return summarise_events(events, runs)


def summarise_events(events: list[dict], runs: int) -> OrtProfile:
    """The :class:`OrtProfile` of the last ``runs`` ``model_run`` events of a profiler trace."""
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[
        -runs:
    ]
    if len(windows) < runs:
        raise ValueError(f"the profile holds {len(windows)} runs, fewer than the {runs} asked")
    start = windows[0][0]
    op_us: Counter = Counter()
    conv_us: Counter = Counter()
    conv_macs: dict[str, int] = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        if event["ts"] < start:
            continue
        op = event["args"]["op_name"]
        op_us[op] += event["dur"]
        if op in CONV_OPS:
            node = event["name"].removesuffix("_kernel_time")
            conv_us[node] += event["dur"]
            conv_macs[node] = conv_node_macs(event["args"])
    per_run = 1000.0 * runs
    return OrtProfile(
        runs=runs,
        run_ms=statistics.median((end - begin) / 1000.0 for begin, end in windows),
        op_ms={op: us / per_run for op, us in op_us.most_common()},
        convs=[ConvTime(node, conv_us[node] / per_run, conv_macs[node]) for node in conv_us],
    )


def conv_node_macs(args: dict) -> int:
    """Multiply-accumulates of one convolution from the profiler's shapes: output elements
    (a blocked NCHWc output counts its padded channels) times the weight's input channels per
    group and kernel size."""
    weight = _shape(args["input_type_shape"][1])
    output = _shape(args["output_type_shape"][0])
    return int(np.prod(output)) * int(np.prod(weight[1:]))


def _shape(entry: dict) -> list[int]:
    (dims,) = entry.values()  # {"float": [dims]}
    return [int(d) for d in dims]


# Convolutions below this share of a model's convolution MACs are left out of its fastest
# throughput (their few microseconds make their throughput noisy).
PEAK_MIN_MACS_SHARE = 0.01


def peak_throughput(profile: OrtProfile) -> float:
    """The fastest convolution's GMAC/s, among those with a fair share of the MACs."""
    floor = PEAK_MIN_MACS_SHARE * profile.conv_macs
    return max((c.gmacs_per_s for c in profile.convs if c.macs >= floor), default=0.0)


def split_against(model: OrtProfile, base: OrtProfile) -> dict:
    """``model``'s kernel-time ratio to ``base``'s, split into shares of ``base``'s time:
    ``macs_share`` (its convolution MACs at ``base``'s mean convolution throughput),
    ``conv_efficiency_lost`` (the extra time its convolutions take at their own throughput)
    and ``rest`` (every other operator); they add up to ``ratio``. ``floor``: its MACs at
    ``base``'s fastest convolution's throughput (a stand-in for the machine's peak) plus the
    rest as measured."""
    if base.conv_ms <= 0 or base.kernel_ms <= 0:
        raise ValueError("the reference profile has no convolution time to compare with")
    total = base.kernel_ms
    macs_ms = model.conv_macs / base.conv_gmacs_per_s / 1e6
    peak = peak_throughput(base)
    return {
        "ratio": model.kernel_ms / total,
        "macs_share": macs_ms / total,
        "conv_efficiency_lost": (model.conv_ms - macs_ms) / total,
        "rest": model.other_ms / total,
        "floor": (model.conv_macs / peak / 1e6 + model.other_ms) / total,
        "conv_macs_ratio": model.conv_macs / base.conv_macs,
        "conv_ms_ratio": model.conv_ms / base.conv_ms,
        "other_ms_ratio": model.other_ms / base.other_ms if base.other_ms > 0 else float("nan"),
    }
