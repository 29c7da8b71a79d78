"""Quantize pass: INT8 as explicit QuantizeLinear/DequantizeLinear in the ONNX (TensorRT 10/11
build it strongly typed; ONNX Runtime runs the same file here).

NVIDIA Model Optimizer's PyTorch quantization (``nvidia-modelopt``, ``modelopt.torch.
quantization``) inserts the quantizers; we choose what TensorRT's INT8 kernels want and run the
calibration: BatchNorm folded into its conv first (TensorRT fuses them; a Q/DQ on unfolded
weights would quantize the wrong tensor), symmetric int8 (zero point 0), per-output-channel
weights, per-tensor activations at every conv input (where TensorRT fuses Q/DQ into the conv),
activation ranges from calibration images by max, entropy or percentile. Calibration needs
images only (the data YAML's train split, or ``--calib-images DIR``), letterboxed as at
inference; no labels. The quantized model is PTQ as it stands, or the start of QAT
(compiler.train.qat); compiler.sensitivity may keep costly convs in float before the export.
What the file leaves in float runs in fp16 by default (``--int8-float``, see
:data:`INT8_FLOAT_PRECISIONS`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from yoloprune.compiler.export import DEFAULT_OPSET, export_onnx
from yoloprune.compiler.train.data import DataError
from yoloprune.graphs.errors import ExportError, PlanError, YoloPruneError, first_line
from yoloprune.graphs.family import family_of
from yoloprune.kernels.preprocess import IMAGE_SUFFIXES, letterbox, open_image

if TYPE_CHECKING:
    from yoloprune.compiler.train.qat import QuantizationAwareTraining

MODELOPT_HINT = (
    "INT8 needs NVIDIA Model Optimizer's core package: pip install 'nvidia-modelopt==0.47.0' "
    "huggingface_hub requests (make install does this)"
)
DEFAULT_CALIBRATION_IMAGES = 256
CALIBRATION_BATCH = 16
# How activation ranges are set from the calibration images (weights always take their max):
# max: the largest |value| seen (ModelOpt's MaxCalibrator); entropy: the range whose int8
# histogram loses least information (KL divergence, TensorRT's classic calibrator); percentile:
# the PERCENTILE-th percentile of |value| (clips outliers).
CALIBRATION_METHODS = ("max", "entropy", "percentile")
PERCENTILE = 99.99
# What an INT8 file leaves in float (activations between the quantized convs, SiLU, adds,
# concats, the head, and any conv the sensitivity pass keeps) runs at this precision. TensorRT
# builds the file strongly typed, so fp16 must be in the file: INT8 convs with an fp16 body is
# what a weakly typed INT8+FP16 build gave (ModelOpt's ONNX PTQ writes it with
# high_precision_dtype fp16); an fp32 body makes TensorRT run every non-INT8 layer in fp32.
# fp16 Q/DQ scales (a DequantizeLinear's output type is its scale's) need opset 19.
INT8_FLOAT_PRECISIONS = ("fp16", "fp32")
DEFAULT_INT8_FLOAT = "fp16"
FP16_QDQ_OPSET = 19


def refuse_unused_flags(precision: str | None, tolerance, flags: dict[str, object]) -> None:
    """Precision flags the chosen precision would not use are refused, not ignored: calibration
    ``flags`` ({flag: value}) without int8, a lowered file's ``tolerance`` without one."""
    calibrating = [flag for flag, value in flags.items() if value is not None]
    if calibrating and precision != "int8":
        raise PlanError(
            f"{', '.join(calibrating)} apply to INT8 only: add --precision int8 or drop them"
        )
    if tolerance is not None and precision in (None, "fp32"):
        raise PlanError(
            "--precision-parity-tol is the fp16/int8 file's tolerance: add --precision fp16 or "
            "int8, or drop it"
        )


def calibration_for(
    precision: str | None, images, data, count, method=None, float_precision=None
) -> Calibration | None:
    """INT8 calibration (``images`` folder, else ``data``'s train split) and the precision of
    the file's float part, its images listed and ModelOpt imported now, so a missing source or
    package fails before any work; None unless int8."""
    if precision != "int8":
        return None
    count = DEFAULT_CALIBRATION_IMAGES if count is None else count
    method = "max" if method is None else method
    body = DEFAULT_INT8_FLOAT if float_precision is None else float_precision
    calibration = Calibration(
        images=images, data=data, count=count, method=method, float_precision=body
    )
    calibration.files  # noqa: B018  (a missing or empty source fails now)
    modelopt()
    return calibration


def modelopt():
    try:
        with warnings.catch_warnings():  # it warns about every optional integration it lacks
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise YoloPruneError(f"{MODELOPT_HINT} ({first_line(exc)})") from exc
    return mtq


@dataclass(frozen=True)
class Calibration:
    """An INT8 export's settings: where calibration images come from (a folder, or a data
    YAML's train split), how ranges are set, and the precision of the file's float part."""

    images: Path | None = None  # a folder of images
    data: Path | None = None  # a data YAML: its train split
    count: int = DEFAULT_CALIBRATION_IMAGES
    method: str = "max"  # one of CALIBRATION_METHODS
    float_precision: str = DEFAULT_INT8_FLOAT  # one of INT8_FLOAT_PRECISIONS

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise PlanError(
                f"--calib-method {self.method}: use one of {', '.join(CALIBRATION_METHODS)}"
            )
        if self.float_precision not in INT8_FLOAT_PRECISIONS:
            raise PlanError(
                f"--int8-float {self.float_precision}: use one of "
                f"{', '.join(INT8_FLOAT_PRECISIONS)}"
            )

    @property
    def method_text(self) -> str:
        if self.method == "percentile":
            return f"percentile ({PERCENTILE} % of absolute activations)"
        return {"max": "max (largest absolute activation)", "entropy": "entropy (KL divergence)"}[
            self.method
        ]

    @property
    def source(self) -> str:
        """Where the calibration images come from, as the user gave it."""
        if self.images is not None:
            return f"--calib-images {self.images}"
        return f"{self.data} (train split)" if self.data is not None else "no images given"

    @cached_property
    def files(self) -> list[Path]:
        """The calibration images, listed once (options, quantization and parity share them)."""
        if self.images is not None:
            folder = Path(self.images)
            if not folder.is_dir():
                raise DataError(f"--calib-images {folder}: not a folder of images")
            found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif self.data is not None:
            from yoloprune.compiler.train.data import image_files, read_data_yaml

            config = read_data_yaml(self.data)
            if not config.train:
                raise DataError(f"{self.data}: INT8 calibration reads its 'train' split; add one")
            found = image_files(config.train)
        else:
            raise DataError(
                "--precision int8 calibrates on images: pass --data data.yaml (its train split) "
                "or --calib-images DIR (no labels needed)"
            )
        if not found:
            raise DataError(f"{self.source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        from yoloprune.compiler.sensitivity import spread_indices

        # evenly over the whole set, first and last included, in a fixed order (a step of
        # len // count took the first count of a set under twice that size)
        return [found[i] for i in spread_indices(len(found), self.count)]


@dataclass
class CalibrationRecord:
    used: int = 0
    unreadable: int = 0


def calibration_batches(
    files: list[Path], imgsz: int, record: CalibrationRecord, batch: int = CALIBRATION_BATCH
) -> Iterator[torch.Tensor]:
    """Letterboxed float NCHW batches in [0, 1], as the deployed pipeline feeds them; images
    that cannot be read are counted in ``record`` and skipped."""
    from PIL import UnidentifiedImageError

    chunk: list[np.ndarray] = []
    for path in files:
        try:
            with open_image(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError):
            record.unreadable += 1
            continue
        boxed = letterbox(pixels, imgsz)[0]
        chunk.append(boxed.transpose(2, 0, 1).astype(np.float32) / 255.0)
        record.used += 1
        if len(chunk) == batch:
            yield torch.from_numpy(np.stack(chunk))
            chunk = []
    if chunk:
        yield torch.from_numpy(np.stack(chunk))


def fold_batchnorms(model: nn.Module) -> int:
    """Fold every conv's following BatchNorm into the conv, in place (eval mode); returns how
    many. Our blocks and ultralytics' hold them as ``conv`` and ``bn``."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for module in model.modules():
        conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(conv.eval(), bn.eval())
            module.bn = nn.Identity()
            folded += 1
    return folded


def quantized(
    model: nn.Module,
    batches: Iterator[torch.Tensor],
    method: str = "max",
    source: str = "the calibration images",
) -> tuple[nn.Module, int]:
    """A copy of ``model`` with BatchNorm folded and INT8 fake quantizers calibrated on
    ``batches`` by ``method`` (the model itself is untouched); and how many BatchNorms were
    folded. The copy keeps its training form (it can be fine-tuned: QAT) and exports in any
    mode. Calibration runs the training forward, which reaches every conv of every head branch
    (YOLO26's one-to-one and one-to-many alike); modules the family keeps unquantized (the DFL's
    fixed bins) and inputs of ops other than convs are never quantized."""
    mtq = modelopt()
    from modelopt.torch.quantization.nn import TensorQuantizer

    q = copy.deepcopy(model).float().eval()
    folded = fold_batchnorms(q)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints how many it inserted
        mtq.quantize(q, _config(method), None)  # quantizers inserted, not yet calibrated
    kept = {id(m) for keep in family_of(model).unquantized(q) for m in keep.modules()}
    for module in q.modules():
        if id(module) in kept or not isinstance(module, nn.Conv2d):
            for name in ("input_quantizer", "weight_quantizer", "output_quantizer"):
                quantizer = getattr(module, name, None)
                if quantizer is not None:
                    quantizer.disable()
    active = [
        (name, m)
        for name, m in q.named_modules()
        if isinstance(m, TensorQuantizer) and not m._disabled
    ]
    for _, quantizer in active:  # collect statistics on the unquantized network
        quantizer.disable_quant()
        quantizer.enable_calib()
    seen = 0
    with torch.no_grad():
        q.train()  # the training forward reaches every head branch; BatchNorms not folded
        for module in q.modules():  # (v5.0's BottleneckCSP) keep their running statistics
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        for images in batches:
            q(images)
            seen += len(images)
    q.eval()
    if not seen:
        raise DataError(
            f"{source}: no calibration image could be read; INT8 ranges cannot be set: give "
            "--calib-images DIR or --data data.yaml with readable images"
        )
    for name, quantizer in active:
        try:
            if name.endswith("input_quantizer") and method != "max":
                quantizer.load_calib_amax(method, **_method_arguments(method))
            else:
                quantizer.load_calib_amax()
        except RuntimeError as exc:
            raise ExportError(
                f"INT8 calibration: {name} saw no data ({first_line(exc)}); a module the "
                "training forward does not run must be listed in its family's unquantized()"
            ) from exc
        quantizer.enable_quant()
        quantizer.disable_calib()
    return q, folded


def _config(method: str) -> dict:
    """ModelOpt's INT8 config (symmetric; weights per output channel, activations per tensor),
    activations collected as histograms for the entropy and percentile methods; calibration is
    ours (:func:`quantized`)."""
    mtq = modelopt()
    config = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    if method != "max":
        for entry in config["quant_cfg"]:
            if entry.get("quantizer_name") == "*input_quantizer":
                entry["cfg"] = {**entry["cfg"], "calibrator": "histogram"}
    config["algorithm"] = None
    return config


def _method_arguments(method: str) -> dict:
    return {"percentile": PERCENTILE} if method == "percentile" else {}


def to_int8(
    model: nn.Module,
    out: Path,
    imgsz: int,
    calibration: Calibration,
    *,
    mode: str,
    dynamic: bool = False,
    trained: QuantizationAwareTraining | None = None,
    keep_float: Callable[[nn.Module], dict] | None = None,
) -> tuple[Path, nn.Module, dict]:
    """Write ``out``: the INT8 Q/DQ ONNX of ``model``, PTQ on ``calibration``'s images, or the
    model ``trained`` with its quantizers in the loop (QAT); returns the path, the fake-
    quantized PyTorch model it was exported from, and the record written to the file's
    ``quantization`` metadata. ``keep_float`` (compiler.sensitivity) may take convs out of
    quantization before the export; what it returns is recorded as ``sensitivity``."""
    with warnings.catch_warnings():  # ModelOpt's export warns about integrations it lacks
        warnings.filterwarnings("ignore", message="Cannot find transformers package")
        if trained is None:
            q, quantization = post_training_quantized(model, imgsz, calibration)
        else:
            q, quantization = trained.quantized, dict(trained.record)
        if keep_float is not None:  # the kept convs run at the file's float precision
            kept = keep_float(q)
            quantization["sensitivity"] = {**kept, "kept_precision": calibration.float_precision}
        snap_weights(q)
        fp16 = calibration.float_precision == "fp16"
        opset = FP16_QDQ_OPSET if fp16 else DEFAULT_OPSET
        export_onnx(q, out, imgsz, dynamic=dynamic, simplify=False, mode=mode, opset=opset)
    _set_int8_properties(out, quantization, calibration.float_precision)
    return out, q, quantization


def snap_weights(model: nn.Module) -> int:
    """Replace, in place, each quantized conv's weight by its fake-quantized value (the same
    outputs: fake quantization is idempotent), so the file's int8 codes are ModelOpt's.
    ModelOpt rounds ``w * (127 / amax)``, a QuantizeLinear ``w / (amax / 127)``: a weight within
    float rounding of a half step (1 in 512 of a YOLOv5n conv's) lands on another code, and one
    such code moved a conv's output by 0.02; a snapped weight sits on its code. Returns how many
    convs."""
    snapped = 0
    with torch.no_grad():
        for module in model.modules():
            quantizer = getattr(module, "weight_quantizer", None)
            if isinstance(module, nn.Conv2d) and quantizer is not None and quantizer.is_enabled:
                module.weight.copy_(quantizer(module.weight))
                snapped += 1
    return snapped


def post_training_quantized(
    model: nn.Module, imgsz: int, calibration: Calibration
) -> tuple[nn.Module, dict]:
    """PTQ: ``model`` fake-quantized with ranges calibrated on ``calibration``'s images, and the
    record that describes it."""
    record = CalibrationRecord()
    batches = calibration_batches(calibration.files, imgsz, record)
    q, folded = quantized(model, batches, calibration.method, calibration.source)
    return q, _record("PTQ", calibration, record, folded)


def _record(method: str, calibration: Calibration, record: CalibrationRecord, folded: int):
    return {
        "method": f"{method}, NVIDIA ModelOpt INT8 (TensorRT explicit quantization)",
        "calibrator": calibration.method_text,
        "calibration_images": record.used,
        "calibration_unreadable": record.unreadable,
        "weights": "int8 symmetric, per output channel",
        "activations": "int8 symmetric, per tensor, at conv inputs (not the DFL's)",
        "batchnorm_folded": folded,
    }


def _set_int8_properties(path: Path, quantization: dict, float_precision: str) -> None:
    """Weights stored as int8 codes, the float part lowered to ``float_precision``, and the
    ``quantization`` record written to the file's metadata."""
    from yoloprune.compiler.precision import fp16_converted, set_properties
    from yoloprune.graphs.files import import_native

    onnx = import_native("onnx")
    proto = onnx.load(str(path))
    quantization["weights_stored"] = f"int8 ({store_int8_weights(proto)} tensors)"
    if float_precision == "fp16":
        # below fp16's smallest normal number a scale keeps fewer digits (the converter clamps
        # it at 1e-7); the codes were computed with the fp32 scale: counted, for the record
        quantization["scales_below_fp16_normal"] = scales_below_fp16_normal(proto)
        proto, blocked = fp16_converted(proto, str(path))
        quantization["float"] = "fp16 (inputs and outputs fp32; Q/DQ scales fp16)"
        quantization["kept_fp32_ops"] = blocked
    else:
        quantization["float"] = "fp32"
    set_properties(proto, precision="int8", quantization=json.dumps(quantization))
    try:
        onnx.save(proto, str(path))
    except Exception as exc:  # protobuf errors
        raise ExportError(f"{path}: cannot write the INT8 metadata ({first_line(exc)})") from exc


def scales_below_fp16_normal(proto) -> int:
    """How many Q/DQ scale values (per channel, each node once) are below fp16's smallest
    normal number (a near-dead channel's weights)."""
    from onnx import numpy_helper

    values = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = node.attribute[0].t
    tiny = float(np.finfo(np.float16).tiny)
    return sum(
        int((np.abs(numpy_helper.to_array(values[node.input[1]])) < tiny).sum())
        for node in proto.graph.node
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[1] in values
    )


def store_int8_weights(proto) -> int:
    """Replace each QuantizeLinear of a constant (the weights; ModelOpt exports them fp32 and
    quantizes at run time) by the int8 tensor it computes, feeding its DequantizeLinear: the
    same values (ONNX rounds half to even, as ``np.rint``), a quarter of the bytes, and the
    weight form TensorRT documents for explicit quantization. Returns how many."""
    from onnx import numpy_helper

    values = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = node.attribute[0].t
    stored, kept = 0, []
    for node in proto.graph.node:
        if node.op_type != "QuantizeLinear" or not all(n in values for n in node.input[:3]):
            kept.append(node)
            continue
        weight, scale, zero = (numpy_helper.to_array(values[n]) for n in node.input[:3])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1:  # per channel: broadcast along ``axis``
            shape = [1] * weight.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        codes = np.clip(np.rint(weight / scale) + zero, -128, 127).astype(np.int8)
        tensor = numpy_helper.from_array(codes, name=node.output[0])
        proto.graph.initializer.append(tensor)
        stored += 1
    if stored:
        used = {name for node in kept for name in node.input} | {o.name for o in proto.graph.output}
        kept = [n for n in kept if n.op_type != "Constant" or n.output[0] in used]
        del proto.graph.node[:]
        proto.graph.node.extend(kept)
        for tensor in [i for i in proto.graph.initializer if i.name not in used]:
            proto.graph.initializer.remove(tensor)
    return stored


def parity_images(calibration: Calibration, imgsz: int, count: int = 4) -> tuple[torch.Tensor, str]:
    """The first ``count`` readable calibration images, letterboxed: what an INT8 file is
    compared on (noise would saturate the calibrated ranges)."""
    batches = calibration_batches(calibration.files, imgsz, CalibrationRecord(), batch=count)
    images = next(batches)
    return images, f"the first {len(images)} calibration images, letterboxed"
