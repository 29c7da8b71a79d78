"""Export pass: ONNX (static or dynamic batch) -> onnxsim -> onnx.checker -> parity vs PyTorch.

Two export modes. ``raw`` is the decoded head before NMS: yolov5's (batch, anchors, 5 + nc),
ultralytics' (batch, 4 + nc, anchors). ``end2end`` is for heads with a one-to-one (NMS-free)
branch, as YOLO26's: (batch, max_det, 6) rows of x1, y1, x2, y2, score, class, top-k inside the
graph; it is the default for such models, as in ultralytics. The mode and the output layout are
written into the ONNX metadata (``layout``) so evaluation and parity read the file as it is.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from yoloprune.graphs.checkpoint import class_names
from yoloprune.graphs.errors import ExportError, first_line
from yoloprune.graphs.family import family_of
from yoloprune.graphs.files import atomic_path, import_native, signals_held

DEFAULT_OPSET = 17
# Parity is measured on output0 with box columns (pixels) divided by the image size, or by the
# value itself where a box lies far outside the image, so every column is O(1): 1e-3 is 0.64 px
# at 640 and 0.001 of a score.
DEFAULT_PARITY_TOLERANCE = 1e-3
PARITY_METRIC = (
    "max |ORT - PyTorch| over output0, boxes divided by max(imgsz, |PyTorch value|), scores as "
    "is; fp32"
)
END2END_PARITY_METRIC = (
    "end2end: max |ORT - PyTorch| of the sorted top-k scores, and of the boxes (divided by "
    "max(imgsz, |PyTorch value|)) and classes of every detection whose score is unambiguous "
    "(further than the tolerance from its neighbours); fp32"
)
EXPORT_MODES = ("raw", "end2end")
# output0's layout per family and mode; evaluation decodes by it.


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    max_abs_diff_pixels: float
    tolerance: float
    metric: str = PARITY_METRIC
    input: str = "uniform noise in [0, 1], seed 0"
    # end-to-end files: detections compared (those above the k-th score by more than the
    # tolerance); None for raw outputs, which are compared whole
    compared: int | None = None

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def require(self, onnx_name: str, flag: str = "--parity-tol") -> None:
        """Raise the one-line ExportError of a file that misses the tolerance."""
        if not self.ok:
            raise ExportError(
                f"{onnx_name}: ONNX Runtime differs from PyTorch by {self.max_abs_diff:.3g} > "
                f"tolerance {self.tolerance:g} ({self.metric}); nothing was written (if that "
                f"difference is acceptable, raise {flag})"
            )


def export_mode(model: nn.Module, requested: str | None = None) -> str:
    """The export mode: ``requested`` checked against the head, or the model's default."""
    end2end_capable = family_of(model).end2end_capable(model)
    if requested is None:
        return "end2end" if end2end_capable else "raw"
    if requested not in EXPORT_MODES:
        raise ExportError(f"--export-mode {requested}: use one of {', '.join(EXPORT_MODES)}")
    if requested == "end2end" and not end2end_capable:
        raise ExportError(
            "--export-mode end2end needs a head with a one-to-one (NMS-free) branch, as "
            "YOLO26's; export this model with --export-mode raw"
        )
    return requested


def output_layout(model: nn.Module, mode: str) -> str:
    """``yolov5``, ``anchor_free`` or ``end2end``: how output0 is laid out (see
    graphs.family.OUTPUT_LAYOUTS)."""
    return "end2end" if mode == "end2end" else family_of(model).raw_layout


def deployed_model(model: nn.Module, mode: str, runtime_forms: bool = True) -> nn.Module:
    """A copy that returns output0 only, as exported in ``mode`` (eval mode, fp32). With
    ``runtime_forms`` the head's DFL takes its deployment form (same values, faster on ONNX
    Runtime); without, the model's own modules run (the reference parity is checked against)."""
    exported = copy.deepcopy(model).float().eval()
    return family_of(model).deploy(exported, mode, runtime_forms)


def _rows_last(output: np.ndarray, layout: str) -> np.ndarray:
    """output0 with one row per box (ultralytics' raw layout puts boxes on the last axis)."""
    return np.swapaxes(output, 1, 2) if layout == "anchor_free" else output


def onnx_metadata(model: nn.Module, imgsz: int, mode: str, names=None, dynamic=False) -> dict:
    """ONNX metadata as the family's own exporter writes it, so its loaders read our files:
    yolov5's ``DetectMultiBackend`` (detect.py, val.py) takes ``stride`` as an int and ``names``
    through ``ast.literal_eval`` then indexes ``names[0]`` (a Python literal with int keys);
    ultralytics' ``AutoBackend`` also reads ``imgsz``, ``batch``, ``task``, ``channels`` and
    ``end2end`` (True: output0 is already (batch, k, 6) boxes, no NMS). yoloprune adds
    ``producer``, ``export_mode`` and ``layout`` (read by our own evaluation)."""
    labels = {i: str(n) for i, n in enumerate(names or class_names(model))}
    base = {"stride": str(int(max(model.stride))), "names": str(labels)}
    meta = family_of(model).export_metadata(base, mode, imgsz, dynamic)
    return {
        **meta,
        "producer": "yoloprune",
        "precision": "fp32",  # lowered copies (compiler.precision) say theirs
        "export_mode": mode,
        "layout": output_layout(model, mode),
    }


def export_onnx(
    model: nn.Module,
    path: Path,
    imgsz: int,
    *,
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    simplify: bool = True,
    names=None,
    mode: str | None = None,
) -> Path:
    """Write ``path`` (via a temporary file); input ``images``, output ``output0``."""
    onnx = import_native("onnx")

    if opset < 17:
        raise ExportError(f"--opset {opset}: yoloprune exports opset 17 or newer")
    mode = export_mode(model, mode)
    exported = deployed_model(model, mode)
    example = torch.zeros(1, 3, imgsz, imgsz)
    axes = {"images": {0: "batch"}, "output0": {0: "batch"}} if dynamic else None
    try:
        with atomic_path(path) as tmp:
            with warnings.catch_warnings(), signals_held():  # see signals_held: native tracer
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
            with signals_held():  # onnxsim and the checker are native code too
                if simplify:
                    proto = _simplify(proto)
                onnx.checker.check_model(proto, full_check=True)
            meta = onnx_metadata(model, imgsz, mode, names, dynamic)
            for key, value in meta.items():
                proto.metadata_props.add(key=key, value=value)
            onnx.save(proto, str(tmp))
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{path}: ONNX export failed: {type(exc).__name__}: {exc}") from exc
    return path


def _simplify(proto):
    onnxsim = import_native("onnxsim")

    simplified, ok = onnxsim.simplify(proto)
    if not ok:
        raise ExportError("onnxsim could not validate the simplified model; use --no-simplify")
    return simplified


def export_checked(
    model: nn.Module,
    path: Path,
    imgsz: int,
    *,
    dynamic: bool = False,
    simplify: bool = True,
    mode: str | None = None,
    tolerance: float = DEFAULT_PARITY_TOLERANCE,
    threads: int | None = None,
) -> Parity:
    """Export ``model`` to ``path`` as compile does and check ONNX Runtime against PyTorch;
    ``path`` appears only if parity holds."""
    from yoloprune.graphs.files import atomic_path

    with atomic_path(path) as staged:
        export_onnx(model, staged, imgsz, dynamic=dynamic, simplify=simplify, mode=mode)
        parity = check_parity(model, staged, imgsz, tolerance=tolerance, threads=threads)
        parity.require(path.name)
    return parity


def check_parity(
    model: nn.Module,
    onnx_path: Path,
    imgsz: int,
    *,
    batch: int = 1,
    tolerance: float = DEFAULT_PARITY_TOLERANCE,
    threads: int | None = None,
    images: torch.Tensor | None = None,
    input_text: str | None = None,
) -> Parity:
    """Run PyTorch and ONNX Runtime on the same fixed input (seeded noise unless ``images``,
    described by ``input_text``) and compare output0, in the export mode the file records."""
    from yoloprune.kernels.ort import OrtRunner

    if images is None:
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(batch, 3, imgsz, imgsz, generator=generator)
    with OrtRunner(onnx_path, threads) as runner:
        mode = runner.metadata().get("export_mode", "raw")
        batch = runner.input_shape()[0]  # a static-batch file is fed a batch at a time
        step = batch if isinstance(batch, int) else len(images)
        chunks = [
            runner.infer(images[i : i + step].numpy())[0] for i in range(0, len(images), step)
        ]
        actual = np.concatenate(chunks).astype(np.float64)
    layout = output_layout(model, export_mode(model, mode))
    with torch.no_grad():
        expected = (
            deployed_model(model, mode, runtime_forms=False)(images).numpy().astype(np.float64)
        )
    if actual.shape != expected.shape:
        raise ExportError(f"{onnx_path}: output0 shape {actual.shape} != PyTorch {expected.shape}")
    if layout == "end2end":
        worst, pixels, compared = _end2end_diff(actual, expected, imgsz, tolerance)
        parity = Parity(worst, pixels, tolerance, END2END_PARITY_METRIC, compared=compared)
    else:
        actual, expected = _rows_last(actual, layout), _rows_last(expected, layout)
        diff = np.abs(actual - expected)
        pixels = float(diff[..., :4].max())
        diff[..., :4] /= np.maximum(imgsz, np.abs(expected[..., :4]))
        parity = Parity(float(diff.max()), pixels, tolerance)
    return parity if input_text is None else replace(parity, input=input_text)


def _end2end_diff(actual, expected, imgsz: int, tolerance: float) -> tuple[float, float, int]:
    """(worst normalised difference, worst box difference in pixels, detections compared) of
    two top-k outputs, compared as sets: top-k may order near-equal scores either way.

    Each detection of one output is matched to the nearest detection of the other, the distance
    being the largest of the score difference, the box difference (divided by max(imgsz,
    |value|)) and 1 for another class; detections within ``tolerance`` of the k-th score may
    fall out of either top-k, so they need no match.
    """
    worst, pixels, compared = 0.0, 0.0, 0
    for got, want in zip(actual, expected, strict=True):
        for one, other in ((want, got), (got, want)):
            boundary = min(one[:, 4].min(initial=np.inf), other[:, 4].min(initial=np.inf))
            rows = one[one[:, 4] > boundary + tolerance]
            if not len(rows):
                continue
            compared += len(rows)
            box = np.abs(rows[:, None, :4] - other[None, :, :4])
            scale = np.maximum(imgsz, np.abs(rows[:, None, :4]))
            distance = np.maximum(
                np.abs(rows[:, None, 4] - other[None, :, 4]), (box / scale).max(axis=2)
            )
            distance[rows[:, None, 5] != other[None, :, 5]] = 1.0
            nearest = distance.argmin(axis=1)
            worst = max(worst, float(distance[np.arange(len(rows)), nearest].max()))
            pixels = max(pixels, float(box[np.arange(len(rows)), nearest].max()))
    return worst, pixels, compared


def onnx_input_size(path: Path) -> int:
    """The square image size of an exported model's input ``images`` (batch, 3, size, size)."""
    onnx = import_native("onnx")

    try:
        dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type
        size = int(dims.shape.dim[2].dim_value)
    except Exception as exc:  # protobuf's DecodeError, a graph without inputs, ...
        raise ExportError(f"{path}: not a readable ONNX model ({first_line(exc)})") from exc
    if size <= 0:
        raise ExportError(f"{path}: its input has no fixed image size; pass --imgsz")
    return size
