"""Precision pass: an exported fp32 ONNX lowered to the precision it is deployed at, with the
precision and how it was made recorded in its metadata. TensorRT 11 builds strongly typed
networks only, so the precision must live in the file; ONNX Runtime runs the same file here,
so its parity (and mAP) is measured on the exact file TensorRT will build.

fp16 (``X.fp16.onnx`` beside ``X.onnx``): onnxconverter-common's
``float16.convert_float_to_float16`` with fp32 inputs and outputs kept (``keep_io_types``), so
the deployed pipeline feeds and reads fp32 as before. Ops kept in fp32: the converter's own
block list (TopK, Resize, NonMaxSuppression, Range, CumSum, Min, Max, ...: index and shape
arithmetic, and ops whose fp16 kernels are missing in ONNX Runtime). Measured on the embedded
YOLOv5n (README, "Precision"): keeping box decoding (Mul/Add/Sub/Div) or the exponentials in
fp32 as well did not reduce the error, which comes from the fp16 convolutions themselves; the
DFL's exponentials see max-shifted logits (<= 0) in our deployment form, so they cannot
overflow. ModelOpt's AutoCast (NVIDIA's choice) is not used: its ONNX half pins onnx 1.21 and
onnxruntime-gpu and pulls onnxscript, onnxslim and graphsurgeon, which do not install beside
our onnx/ONNX Runtime.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from torch import nn

from yoloprune.compiler.export import DEFAULT_PARITY_TOLERANCE, Parity, check_parity
from yoloprune.graphs.errors import ExportError, first_line
from yoloprune.graphs.files import atomic_path, import_native

PRECISIONS = ("fp32", "fp16", "int8")
# Parity of a lowered file against the fp32 PyTorch model (same metric as export's: boxes
# relative to max(imgsz, |box|), scores absolute). fp16 keeps ~3 decimal digits: the embedded
# YOLOv5n measured 4e-4 (boxes) and 3.5e-3 (scores); 1e-2 leaves room for deeper models.
# int8: ONNX Runtime's Q/DQ arithmetic against ModelOpt's fake-quantized PyTorch model, on
# calibration images (not noise, which saturates calibrated ranges). Not bit-exact: weights are
# snapped to ModelOpt's codes (compiler.quantize.snap_weights), but an activation that float
# rounding puts on the other side of a half step flips one code, and flips cascade; the
# embedded YOLOv5n measured 0.12 (scores) on calibration images. A sanity bound against a
# broken export (wrong scales read as garbage), not an accuracy figure: mAP of the file is that.
# An INT8 file whose float part is fp16 (the default, compiler.quantize.DEFAULT_INT8_FLOAT) flips
# more codes against the fp32 fake-quantized model: the pruned embedded YOLOv5n 0.255 (0.12 with
# an fp32 body) at the same mAP (0.7001 vs 0.7005), the pruned YOLOv8n 0.067 (0.07); garbage
# reads near 1 (scores are probabilities).
PARITY_TOLERANCES = {"fp32": DEFAULT_PARITY_TOLERANCE, "fp16": 1e-2, "int8": 0.25}
INT8_FP16_PARITY_TOLERANCE = 0.5


def default_tolerance(precision: str, calibration=None) -> float:
    """The lowered file's parity tolerance (an INT8 file's depends on its float part)."""
    if precision == "int8" and calibration is not None and calibration.float_precision == "fp16":
        return INT8_FP16_PARITY_TOLERANCE
    return PARITY_TOLERANCES[precision]


FP16_METHOD = "onnxconverter-common float16.convert_float_to_float16 (keep_io_types)"


def precision_path(fp32_path: Path, precision: str) -> Path:
    """``X.onnx`` for fp32, ``X.fp16.onnx`` beside it for fp16 (what ``build --precision``
    looks for)."""
    fp32_path = Path(fp32_path)
    if precision == "fp32":
        return fp32_path
    return fp32_path.with_name(f"{fp32_path.name.removesuffix('.onnx')}.{precision}.onnx")


def to_fp16(fp32_path: Path, out: Path) -> Path:
    """Write ``out``: ``fp32_path`` with fp16 weights and activations, fp32 inputs/outputs."""
    onnx = import_native("onnx")
    converted, blocked = fp16_converted(onnx.load(str(fp32_path)), str(fp32_path))
    quantization = {"method": FP16_METHOD, "io": "fp32", "kept_fp32_ops": blocked}
    set_properties(converted, precision="fp16", quantization=json.dumps(quantization))
    onnx.save(converted, str(out))
    return Path(out)


def fp16_converted(proto, source: str) -> tuple[object, list[str]]:
    """``proto`` with every float tensor fp16 but its inputs and outputs (and the op types the
    converter keeps in fp32, returned sorted); a Q/DQ graph's scales become fp16 too, so its
    DequantizeLinear nodes output fp16 (opset 19 or newer)."""
    onnx = import_native("onnx")
    float16 = import_native("onnxconverter_common.float16")
    _constants_as_initializers(proto)
    blocked = list(float16.DEFAULT_OP_BLOCK_LIST)
    try:
        with warnings.catch_warnings():  # it warns per tiny weight it rounds to fp16's range
            warnings.simplefilter("ignore", UserWarning)
            converted = float16.convert_float_to_float16(
                proto, keep_io_types=True, op_block_list=blocked
            )
        _casts_follow_their_outputs(converted, onnx.TensorProto)
        onnx.checker.check_model(converted, full_check=True)
    except Exception as exc:  # the converter and checker raise their own types
        raise ExportError(
            f"{source}: fp16 conversion failed ({type(exc).__name__}: {first_line(exc)})"
        ) from exc
    return converted, sorted(blocked)


def lower_checked(
    model: nn.Module,
    fp32_path: Path,
    imgsz: int,
    precision: str,
    *,
    tolerance: float | None = None,
    threads: int | None = None,
    calibration=None,
    mode: str = "raw",
    dynamic: bool = False,
    trained=None,
    keep_float=None,
) -> tuple[Path, Parity, dict]:
    """Lower the exported ``fp32_path`` to ``precision`` beside it (int8: quantized from
    ``model`` on ``calibration``'s images, in export ``mode``, or the QAT result ``trained``;
    ``keep_float``: the sensitivity pass) and check ONNX Runtime on the lowered file against
    PyTorch (fp16: the fp32 model on seeded noise; int8: the fake-quantized model on
    calibration images); the file appears only if parity holds (tolerance:
    :func:`default_tolerance` unless given). Returns the path, the parity and the file's
    ``quantization`` record."""
    if precision not in PRECISIONS or precision == "fp32":
        raise ExportError(f"--precision {precision}: lowering takes fp16 or int8")
    tolerance = default_tolerance(precision, calibration) if tolerance is None else tolerance
    out = precision_path(fp32_path, precision)
    with atomic_path(out) as staged:
        if precision == "fp16":
            to_fp16(fp32_path, staged)
            reference, images, described = model, None, None
            record = {"method": FP16_METHOD, "io": "fp32"}
        else:
            from yoloprune.compiler.quantize import parity_images, to_int8

            _, reference, record = to_int8(
                model,
                staged,
                imgsz,
                calibration,
                mode=mode,
                dynamic=dynamic,
                trained=trained,
                keep_float=keep_float,
            )
            images, described = parity_images(calibration, imgsz)
        parity = check_parity(
            reference,
            staged,
            imgsz,
            tolerance=tolerance,
            threads=threads,
            images=images,
            input_text=described,
        )
        parity.require(out.name, "--precision-parity-tol")
    return out, parity, record


def _constants_as_initializers(proto) -> None:
    """Constant nodes become initializers: the converter turns a Constant node's value into
    fp16 even where its consumer stays fp32 (Resize's scales, which ONNX Runtime then refuses),
    while initializers feeding kept ops stay fp32."""
    kept = []
    for node in proto.graph.node:
        values = [a for a in node.attribute if a.name == "value"]
        if node.op_type == "Constant" and values:
            tensor = proto.graph.initializer.add()
            tensor.CopyFrom(values[0].t)
            tensor.name = node.output[0]
        else:
            kept.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(kept)


def _casts_follow_their_outputs(proto, tensor_proto) -> None:
    """A Cast to float whose output the converter typed fp16 (YOLO26's head) casts to fp16:
    the converter rewrites the value's type but not the Cast's ``to``."""
    types = {v.name: v.type.tensor_type.elem_type for v in proto.graph.value_info}
    for node in proto.graph.node:
        if node.op_type != "Cast" or types.get(node.output[0]) != tensor_proto.FLOAT16:
            continue
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == tensor_proto.FLOAT:
                attribute.i = tensor_proto.FLOAT16


def set_properties(proto, **values: str) -> None:
    """Set (or replace) ONNX metadata_props in place."""
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in values.items():
        if key in existing:
            existing[key].value = value
        else:
            proto.metadata_props.add(key=key, value=value)
