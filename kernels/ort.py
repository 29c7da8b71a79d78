"""ONNX Runtime (CPU) runner with fixed threads, and a description of the machine."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a core dependency, but say how to fix it
        raise ImportError("onnxruntime is missing: pip install onnxruntime") from exc
    return onnxruntime


class OrtRunner:
    """One InferenceSession on the CPU execution provider; ``threads`` intra-op threads."""

    def __init__(self, path: str | Path, threads: int | None = None):
        ort = _onnxruntime()
        self.threads = threads or default_threads()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Idle intra-op threads spin-wait by default; with several sessions timed A B A B on few
        # cores, one session's spinning threads steal the CPU from the next (measured here: a
        # 3 ms model read 2-16 ms depending on its neighbours). Without spinning the timings
        # are stable and fair between sessions.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: images})

    def metadata(self) -> dict[str, str]:
        """The model's metadata_props (yoloprune writes stride, names, layout, export_mode)."""
        return dict(self.session.get_modelmeta().custom_metadata_map)


def default_threads() -> int:
    return max(
        1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )


def machine_info() -> dict:
    """CPU model, cores and library versions, for every reported number."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ort = _onnxruntime()
    import torch

    return {
        "cpu": cpu,
        "cores_available": default_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }
