"""Where an ONNX model's time goes on ONNX Runtime's CPU provider: per operator type, and per
convolution with its multiply-accumulates, from ONNX Runtime's own profiler.

The profiler's JSON is written into a temporary folder and removed once read; only the runs
after the warm-up are counted (each node's kernel time falls inside one ``model_run`` event).

Two MAC counts: each profiled convolution's *executed* MACs, read from the shapes ONNX Runtime
ran (its blocked NCHWc layout pads channel counts to its block, 8 or 16), and the model's
*declared* convolution MACs, read from the ONNX file. The split of a ratio uses the declared
ones, so channel padding shows as efficiency lost, not as MACs."""

from __future__ import annotations

import json
import statistics
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from yoloprune.graphs.files import import_native
from yoloprune.kernels.ort import _onnxruntime, default_threads, session_options

CONV_OPS = ("Conv", "FusedConv")
# Convolutions below this share of a model's convolution MACs are left out of its fastest
# throughput (their few microseconds make their throughput noisy).
PEAK_MIN_MACS_SHARE = 0.01
# ONNX Runtime's profiler stops recording at a million events (about 3 per operator per run).
PROFILE_MAX_RUNS = 200
# Profiled runs slower than this times the timed ones are flagged: the profiler's own cost
# per operator (large for small models) or noise then weighs on the split.
PROFILER_SLACK = 1.1


def profiled_slow(profiled_ms: float, timed_ms: float) -> bool:
    """Whether a profiled run took more than :data:`PROFILER_SLACK` times the timed one."""
    return profiled_ms > PROFILER_SLACK * timed_ms


@dataclass(frozen=True)
class ConvTime:
    """One convolution node as ONNX Runtime ran it: mean kernel ms per run, executed MACs."""

    name: str
    ms: float
    macs: int

    @property
    def gmacs_per_s(self) -> float:
        return self.macs / self.ms / 1e6 if self.ms > 0 else 0.0


@dataclass(frozen=True)
class OrtProfile:
    """Mean kernel milliseconds per run by operator type (means add up across operators), the
    convolutions one by one, the median wall time of a profiled run, and the convolution MACs
    the ONNX file declares (0: not known, the executed MACs stand in)."""

    runs: int
    run_ms: float
    op_ms: dict[str, float]
    convs: list[ConvTime]
    declared_conv_macs: int = 0

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
    def executed_conv_macs(self) -> int:
        return sum(c.macs for c in self.convs)

    @property
    def conv_macs(self) -> int:
        """The declared convolution MACs where known, else the executed ones."""
        return self.declared_conv_macs or self.executed_conv_macs

    @property
    def conv_gmacs_per_s(self) -> float:
        return self.conv_macs / self.conv_ms / 1e6 if self.conv_ms > 0 else 0.0

    def to_dict(self, convs: bool = True) -> dict:
        fields = asdict(self)
        if not convs:
            del fields["convs"]
        return {
            **fields,
            "kernel_ms": self.kernel_ms,
            "conv_ms": self.conv_ms,
            "other_ms": self.other_ms,
            "executed_conv_macs": self.executed_conv_macs,
            "conv_macs": self.conv_macs,
            "conv_gmacs_per_s": self.conv_gmacs_per_s,
        }


def profile_onnx(
    path: str | Path,
    images: np.ndarray,
    runs: int = 30,
    warmup: int = 3,
    threads: int | None = None,
    spinning: bool = False,
) -> OrtProfile:
    """Run ``path`` ``warmup + runs`` times on ``images`` with ONNX Runtime's profiler on (the
    same session options as :class:`kernels.ort.OrtRunner`) and summarise the last ``runs``."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0 (got {runs}, {warmup})")
    ort = _onnxruntime()
    with tempfile.TemporaryDirectory(prefix="yoloprune-profile-") as folder:
        options = session_options(ort, threads or default_threads(), spinning)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: images}
        for _ in range(warmup + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    profile = summarise_events(events, runs)
    return replace(profile, declared_conv_macs=onnx_conv_macs(path, images.shape[0]) or 0)


def summarise_events(events: list[dict], runs: int) -> OrtProfile:
    """The :class:`OrtProfile` of the last ``runs`` ``model_run`` events of a profiler trace."""
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    windows = windows[-runs:]
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
    """Executed multiply-accumulates of one convolution from the profiler's shapes: output
    elements times the weight's input channels per group and kernel size, both as ONNX Runtime
    ran them (channels padded to its NCHWc block where it reorders the layout)."""
    weight = _shape(args["input_type_shape"][1])
    output = _shape(args["output_type_shape"][0])
    return int(np.prod(output)) * int(np.prod(weight[1:]))


def _shape(entry: dict) -> list[int]:
    (dims,) = entry.values()  # {"float": [dims]}
    return [int(d) for d in dims]


def onnx_conv_macs(path: str | Path, batch: int = 1) -> int | None:
    """The convolution MACs the ONNX file declares (no runtime padding): for every Conv node,
    output elements times input channels per group and kernel size, shapes from ONNX's shape
    inference, a symbolic first axis taken as ``batch``. None where a shape is not static."""
    onnx = import_native("onnx")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    graph_values = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    for value in graph_values:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [
            d.dim_value if d.HasField("dim_value") else (batch if axis == 0 else None)
            for axis, d in enumerate(dims)
        ]
    total = 0
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        weight, output = shapes.get(node.input[1]), shapes.get(node.output[0])
        if not weight or not output or None in weight or None in output:
            return None
        total += int(np.prod(output)) * int(np.prod(weight[1:]))
    return total


def peak_throughput(profile: OrtProfile) -> float:
    """The fastest convolution's executed GMAC/s, among those with a fair share of the MACs."""
    floor = PEAK_MIN_MACS_SHARE * profile.executed_conv_macs
    return max((c.gmacs_per_s for c in profile.convs if c.macs >= floor), default=0.0)


def split_against(model: OrtProfile, base: OrtProfile) -> dict:
    """``model``'s kernel-time ratio to ``base``'s, split into shares of ``base``'s time:
    ``macs_share`` (its declared convolution MACs at ``base``'s mean convolution throughput),
    ``conv_efficiency_lost`` (the extra time its convolutions take at their own throughput,
    channel padding included) and ``rest`` (every other operator); they add up to ``ratio``.
    ``floor``: its MACs at ``base``'s fastest convolution's throughput (a stand-in for the
    machine's peak, not a bound) plus the rest as measured."""
    if base.conv_ms <= 0 or base.kernel_ms <= 0:
        raise ValueError("the reference profile has no convolution time to compare with")
    total = base.kernel_ms
    macs_ms = model.conv_macs / base.conv_gmacs_per_s / 1e6
    return {
        "ratio": model.kernel_ms / total,
        "macs_share": macs_ms / total,
        "conv_efficiency_lost": (model.conv_ms - macs_ms) / total,
        "rest": model.other_ms / total,
        "floor": (model.conv_macs / peak_throughput(base) / 1e6 + model.other_ms) / total,
        "conv_macs_ratio": model.conv_macs / base.conv_macs,
        "conv_ms_ratio": model.conv_ms / base.conv_ms,
        "other_ms_ratio": model.other_ms / base.other_ms if base.other_ms > 0 else None,
    }
