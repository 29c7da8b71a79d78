"""Export pass: ONNX (static or dynamic batch) -> onnxsim -> onnx.checker -> parity vs PyTorch."""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from graphs.checkpoint import class_names
from graphs.errors import ExportError

DEFAULT_OPSET = 17
# Parity is measured on output0 with box columns (xywh, pixels) divided by the image size, so
# every column is O(1): 1e-3 is 0.64 px at 640 and 0.001 of a score.
DEFAULT_PARITY_TOLERANCE = 1e-3
PARITY_METRIC = "max |ORT - PyTorch| over output0, xywh divided by imgsz, scores as is; fp32"


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    max_abs_diff_pixels: float
    tolerance: float
    metric: str = PARITY_METRIC
    input: str = "uniform noise in [0, 1], seed 0"

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _export_model(model: nn.Module) -> nn.Module:
    from graphs import ultralytics_family

    exported = copy.deepcopy(model).float().eval()
    if ultralytics_family.is_ultralytics_model(exported):
        head = ultralytics_family.detect_head(exported)
        head.export, head.format = True, "onnx"  # output0: (batch, 4 + nc, anchors), as theirs
        return exported
    exported.detect.export = True  # output0 only: (batch, anchors, 5 + nc), as yolov5 exports
    return exported


def _box_last(output: np.ndarray, model: nn.Module) -> np.ndarray:
    """output0 with the box/score values on the last axis (ultralytics puts them on axis 1)."""
    from graphs import ultralytics_family

    if ultralytics_family.is_ultralytics_model(model):
        return np.swapaxes(output, 1, 2)
    return output


def export_onnx(
    model: nn.Module,
    path: Path,
    imgsz: int,
    *,
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    simplify: bool = True,
    names=None,
) -> Path:
    """Write ``path`` (via a temporary file); input ``images``, output ``output0``."""
    import onnx

    if opset < 17:
        raise ExportError(f"--opset {opset}: yoloprune exports opset 17 or newer")
    exported = _export_model(model)
    example = torch.zeros(1, 3, imgsz, imgsz)
    tmp = path.with_name(path.name + ".tmp")
    axes = {"images": {0: "batch"}, "output0": {0: "batch"}} if dynamic else None
    try:
        with warnings.catch_warnings():
            # The head turns static grid sizes into ints on purpose (constant grids).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                exported,
                example,
                str(tmp),
                opset_version=opset,
                input_names=["images"],
                output_names=["output0"],
                dynamic_axes=axes,
                do_constant_folding=True,
                dynamo=False,
            )
        proto = onnx.load(str(tmp))
        if simplify:
            proto = _simplify(proto)
        onnx.checker.check_model(proto, full_check=True)
        meta = {
            "stride": str(int(max(model.stride))),
            "names": json.dumps({i: n for i, n in enumerate(names or class_names(model))}),
            "imgsz": json.dumps([imgsz, imgsz]),
            "producer": "yoloprune",
        }
        for key, value in meta.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, str(tmp))
        tmp.replace(path)
    except ExportError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{path}: ONNX export failed: {type(exc).__name__}: {exc}") from exc
    return path


def _simplify(proto):
    import onnxsim

    simplified, ok = onnxsim.simplify(proto)
    if not ok:
        raise ExportError("onnxsim could not validate the simplified model; use --no-simplify")
    return simplified


def check_parity(
    model: nn.Module,
    onnx_path: Path,
    imgsz: int,
    *,
    batch: int = 1,
    tolerance: float = DEFAULT_PARITY_TOLERANCE,
    threads: int | None = None,
) -> Parity:
    """Run PyTorch and ONNX Runtime on the same fixed input and compare output0."""
    from kernels.ort import OrtRunner

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, imgsz, imgsz, generator=generator)
    with torch.no_grad():
        expected = _export_model(model)(images).numpy()
    actual = OrtRunner(onnx_path, threads).run(images.numpy())[0]
    if actual.shape != expected.shape:
        raise ExportError(f"{onnx_path}: output0 shape {actual.shape} != PyTorch {expected.shape}")
    actual, expected = _box_last(actual, model), _box_last(expected, model)
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    pixels = float(diff[..., :4].max())
    diff[..., :4] /= imgsz
    return Parity(float(diff.max()), pixels, tolerance)
