"""Errors the CLI turns into one clear line and a non-zero exit."""


class YoloPruneError(Exception):
    """Base of every error a user can fix; its message names the file and the fix."""


class ModelError(YoloPruneError):
    """A model definition (YAML or rebuilt network) is malformed or unsupported."""


class CheckpointError(YoloPruneError):
    """A checkpoint file is missing, unreadable, unsafe or not a YOLO detector."""


class PlanError(YoloPruneError):
    """A pruning target or plan is invalid, or cannot be met."""


class TargetUnreachable(PlanError):
    """A valid target the planner cannot meet under the constraints given (alignment, max
    ratio): another alignment may meet it (``--round-to auto`` tries), and a sweep lists it."""


class ExportError(YoloPruneError):
    """ONNX export, simplification, checking or parity failed."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (library errors can span many)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class RuntimeSetupError(YoloPruneError):
    """A runtime (ONNX Runtime, PyTorch CUDA, TensorRT) is missing or cannot do what is asked."""


class LatencyTableError(YoloPruneError):
    """A latency table file is unreadable, malformed, or measured for another setting."""
