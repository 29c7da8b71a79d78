"""ONNX Runtime (CPU) runner with fixed threads, and a description of the machine."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from yoloprune.graphs.errors import RuntimeSetupError, first_line
from yoloprune.graphs.files import import_native
from yoloprune.kernels.runner import Runner
from yoloprune.kernels.runner import time_runners as _time_runners
from yoloprune.kernels.timing import Timing

# ONNX Runtime 1.32's Linux wheel starts Microsoft's 1DS telemetry when it is imported (a
# device id and an event database under ~/.cache/Microsoft/DeveloperTools, a session file in
# $TMPDIR); off unless the user set the variable themselves.
TELEMETRY_SWITCH = "ORT_DISABLE_TELEMETRY"


def telemetry_off() -> None:
    os.environ.setdefault(TELEMETRY_SWITCH, "1")


def _onnxruntime():
    telemetry_off()
    try:
        onnxruntime = import_native("onnxruntime")
    except ImportError as exc:  # pragma: no cover - a core dependency, but say how to fix it
        raise RuntimeSetupError("onnxruntime is missing: pip install onnxruntime") from exc
    return onnxruntime


# How spinning ONNX Runtime sessions are timed against each other (see :func:`timing_order`).
SPINNING_BLOCK = {"block": 5, "rewarm": 2}


class OrtRunner(Runner):
    """One InferenceSession on the CPU execution provider; ``threads`` intra-op threads. The
    session is made in :meth:`activate` (load errors are raised there); :meth:`infer` takes
    the input array and returns every output as numpy arrays.

    Intra-op thread spinning is off unless ``spinning``. ONNX Runtime's own default is on: idle
    threads spin-wait instead of sleeping, which saves each parallel operator a thread wake-up
    (about 0.1 ms per operator on 2 cores). But on few, shared cores a spinning thread holds a
    core another thread needs: timings turn bimodal (measured here: a 3 ms yolov5n read 2-8 ms,
    the same file 3.5 or 6.3 ms in one run), while without spinning they repeat within 1%.
    Spinning sessions are timed in blocks (see :meth:`timing_order`)."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, threads: int | None = None, spinning: bool = False):
        self.path = Path(path)
        self.threads = threads or default_threads()
        self.spinning = spinning
        self.session = None

    def activate_impl(self) -> None:
        ort = _onnxruntime()
        options = session_options(ort, self.threads, self.spinning)
        try:
            session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT's own error types (InvalidProtobuf, Fail, ...)
            raise RuntimeSetupError(
                f"{self.path}: ONNX Runtime cannot load it ({first_line(exc)}); export it again"
            ) from exc
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]
        self.session = session

    def deactivate_impl(self) -> None:
        self.session = None

    def infer_impl(self, images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: images})

    def input_shape(self) -> list:
        """The input's shape as the file declares it (a str or None for a dynamic axis)."""
        self.require_active()
        return list(self.session.get_inputs()[0].shape)

    def metadata(self) -> dict[str, str]:
        """The model's metadata_props (yoloprune writes stride, names, layout, export_mode)."""
        self.require_active()
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def timing_order(self) -> dict:
        return timing_order(self.spinning)

    def order_text(self) -> str:
        return order_text(self.spinning)

    def describe(self) -> dict:
        return {"threads": self.threads, "spinning": self.spinning, "order": self.order_text()}


def session_options(ort, threads: int, spinning: bool):
    """The SessionOptions every yoloprune session uses: ``threads`` intra-op threads, one
    inter-op thread, all graph optimisations, warnings off, spinning as given."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spinning)))
    return options


def time_runners(
    runners: dict[str, OrtRunner], images: np.ndarray, runs: int, warmup: int
) -> dict[str, Timing]:
    """Time active ONNX Runtime sessions against each other on the same input ({name: Timing}),
    in the order their spinning setting needs (:meth:`OrtRunner.timing_order`)."""
    if len({r.spinning for r in runners.values()}) != 1:
        raise ValueError("time sessions with the same spinning setting together")
    return _time_runners(runners, images, runs=runs, warmup=warmup)


def timing_order(spinning: bool) -> dict:
    """Arguments for :func:`kernels.timing.interleaved`. A spinning session's threads keep
    spinning for a while after it returns and would steal the cores from the next session
    timed (measured here: a 3 ms model read 2-16 ms depending on its neighbours), so such
    sessions are timed in blocks of consecutive runs, each after untimed re-warm runs."""
    return dict(SPINNING_BLOCK) if spinning else {"block": 1, "rewarm": 0}


def order_text(spinning: bool) -> str:
    """How :func:`time_runners` orders the runs of sessions with this spinning, for reports."""
    order = timing_order(spinning)
    if order["block"] == 1:
        return "interleaved A B A B after warm-up (intra-op spinning off)"
    return (
        f"interleaved in blocks of {order['block']} timed runs, each after {order['rewarm']} "
        "untimed runs, after warm-up (intra-op spinning on, ONNX Runtime's default)"
    )


def default_threads() -> int:
    return max(
        1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )


SIMD_FLAGS = frozenset(
    {"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
    | {"avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve"}
)


def cpu_description() -> tuple[str, list[str]]:
    """The CPU's model name and its vector extensions among ``SIMD_FLAGS`` (none where the
    system does not report them: no ``/proc/cpuinfo``)."""
    cpu, flags = platform.processor() or "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = sorted(set(line.split(":", 1)[1].split()) & SIMD_FLAGS)
                break
    except OSError:
        pass
    return cpu, flags


def machine_info() -> dict:
    """CPU model, cores and library versions, for every reported number."""
    cpu, flags = cpu_description()
    ort = _onnxruntime()
    import torch

    return {
        "cpu": cpu,
        "cpu_flags": flags,  # the vector extensions kernels choose between
        "cores_available": default_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }


def machine_text(machine: dict) -> str:
    """``AMD EPYC (avx2, avx512f, ...), 2 cores``: the CPU and its vector extensions, which
    decide which kernels a runtime picks (latency figures compare only within one machine)."""
    flags = ", ".join(machine.get("cpu_flags") or []) or "flags not recorded"
    return f"{machine['cpu']} ({flags}), {machine['cores_available']} cores"
