"""Per-layer latency tables: conv shape -> measured time on one runtime, cached per device.

A table is measured on the runtime a model deploys to (ONNX Runtime CPU here; PyTorch CUDA
fp16 on a GPU): each entry is one Conv2d + SiLU (what a yolov5 ``Conv`` becomes once BN is
folded) of a given shape, timed alone with the shared timing primitive. Tables are JSON files,
one per (runtime, device, precision, batch, threads), under ``~/.cache/yoloprune/latency`` by
default; missing entries are measured on demand and saved atomically.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from yoloprune.graphs.errors import LatencyTableError, first_line
from yoloprune.graphs.files import write_text_atomic
from yoloprune.kernels.timing import measure

TABLE_FORMAT = "yoloprune.latency-table.v1"
MAX_TABLE_BYTES = 64 << 20
# while a table is being measured it is saved this often (and when measuring stops, however)
SAVE_EVERY_S = 30.0
_KEY = re.compile(r"c\d+-o\d+-k\d+-s\d+-p\d+-g\d+-\d+x\d+")
DEFAULT_CACHE = Path(os.environ.get("YOLOPRUNE_CACHE", Path.home() / ".cache" / "yoloprune"))


@dataclass(frozen=True)
class ConvShape:
    cin: int
    cout: int
    kernel: int
    stride: int
    groups: int
    height: int  # input spatial size
    width: int
    padding: int | None = None  # None: kernel // 2 (yolov5's autopad)

    @property
    def pad(self) -> int:
        return self.kernel // 2 if self.padding is None else self.padding

    def key(self) -> str:
        return (
            f"c{self.cin}-o{self.cout}-k{self.kernel}-s{self.stride}-p{self.pad}-g{self.groups}-"
            f"{self.height}x{self.width}"
        )

    def module(self) -> nn.Module:
        conv = nn.Conv2d(
            self.cin,
            self.cout,
            self.kernel,
            self.stride,
            self.pad,
            groups=self.groups,
            bias=True,
        )
        return nn.Sequential(conv, nn.SiLU()).eval()

    def onnx(self, batch: int, precision: str = "fp32"):
        return conv_onnx(self, batch, precision)


@dataclass(frozen=True)
class TableKey:
    runtime: str  # "ort", "torch" or "tensorrt"
    device: str  # CPU model or GPU name
    precision: str
    batch: int
    threads: int
    spinning: bool | None = None  # ort: intra-op thread spinning; None for torch

    def filename(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.device).strip("-").lower()
        spin = {None: "", True: "-spin", False: "-nospin"}[self.spinning]
        return f"{self.runtime}-{slug}-{self.precision}-b{self.batch}-t{self.threads}{spin}.json"


class LatencyTable:
    """Measured milliseconds per conv shape for one runtime on one device. A shape is anything
    with ``key()``, ``onnx(batch)``, ``module()``, ``cin``, ``height`` and ``width``
    (:class:`ConvShape`; :class:`kernels.alignment.ChainShape` in the alignment profile)."""

    FORMAT = TABLE_FORMAT
    KEY = _KEY
    FOLDER = "latency"  # under the cache
    FIX = "delete it or pass another --latency-table"  # what a bad file's message suggests

    def __init__(self, key: TableKey, path: Path, measurer: Callable[[ConvShape], float]):
        self.key, self.path, self._measurer = key, Path(path), measurer
        self.entries: dict[str, float] = {}
        self.measured = 0  # entries measured by this object (the rest came from the cache)
        if self.path.is_dir():
            raise LatencyTableError(
                f"{self.path}: is a folder; a latency table is a JSON file (created if missing)"
            )
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        """Read the table file; anything but a table of this key, with a finite positive time
        for every well-formed conv key, is refused."""
        fix = self.FIX
        try:
            if self.path.stat().st_size > MAX_TABLE_BYTES:
                raise LatencyTableError(f"{self.path}: too large for a latency table; {fix}")
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise LatencyTableError(
                f"{self.path}: not a readable latency table ({first_line(exc)}); {fix}"
            ) from exc
        if type(data) is not dict or data.get("format") != self.FORMAT:
            raise LatencyTableError(f"{self.path}: not a yoloprune latency table; {fix}")
        if data.get("key") != self.key.__dict__:
            raise LatencyTableError(
                f"{self.path}: latency table for {data.get('key')!r:.200}, not "
                f"{self.key.__dict__}; {fix}"
            )
        entries = data.get("entries")
        if type(entries) is not dict or not all(
            type(k) is str
            and self.KEY.fullmatch(k)
            and type(v) in (int, float)
            and math.isfinite(v)
            and v > 0
            for k, v in entries.items()
        ):
            raise LatencyTableError(
                f"{self.path}: malformed entries (conv keys with positive milliseconds); {fix}"
            )
        self.entries = {k: float(v) for k, v in entries.items()}

    def save(self) -> None:
        payload = {"format": self.FORMAT, "key": self.key.__dict__, "entries": self.entries}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(payload, indent=0, sort_keys=True))
        except OSError as exc:
            raise LatencyTableError(
                f"{self.path}: cannot write the latency table ({exc.strerror or exc}); pass a "
                "writable --latency-table"
            ) from exc

    def lookup(self, shape: ConvShape) -> float | None:
        return self.entries.get(shape.key())

    def ensure(self, shapes: Iterable[ConvShape], progress: bool = True) -> None:
        """Measure every shape not yet in the table. The table is saved every
        :data:`SAVE_EVERY_S` seconds while measuring and when measuring ends, also by an error
        or Ctrl-C, so a long profile (TensorRT builds an engine per entry) resumes where it
        stopped instead of starting over."""
        from tqdm import tqdm

        missing = sorted({s for s in shapes if s.key() not in self.entries}, key=lambda s: s.key())
        if not missing:
            return
        unsaved, last_save = 0, time.monotonic()
        try:
            for shape in tqdm(
                missing,
                desc="latency table",
                unit="conv",
                leave=False,
                disable=not progress or None,
            ):
                self.entries[shape.key()] = self._measurer(shape)
                self.measured += 1
                unsaved += 1
                if time.monotonic() - last_save >= SAVE_EVERY_S:
                    unsaved, last_save = 0, time.monotonic()
                    self.save()
        except BaseException:
            if unsaved:  # keep what was measured; the error that stopped it is the one raised
                with contextlib.suppress(LatencyTableError):
                    self.save()
            raise
        if unsaved:
            self.save()

    def __getitem__(self, shape: ConvShape) -> float:
        value = self.lookup(shape)
        if value is None:
            self.ensure([shape], progress=False)
            value = self.entries[shape.key()]
        return value


def conv_onnx(shape: ConvShape, batch: int, precision: str = "fp32"):
    """A one-node-pair ONNX model: Conv (with bias) then SiLU as Sigmoid * x, as a folded
    yolov5 ``Conv`` exports, at ``precision`` (:func:`conv_silu_onnx`). Built directly
    (milliseconds), not through the exporter."""
    import numpy as np

    rng = np.random.default_rng(0)
    weight = rng.standard_normal(
        (shape.cout, shape.cin // shape.groups, shape.kernel, shape.kernel), dtype=np.float32
    )
    bias = rng.standard_normal(shape.cout, dtype=np.float32)
    layer = ConvLayer(weight, bias, shape.stride, shape.pad, shape.groups)
    input_shape = [batch, shape.cin, shape.height, shape.width]
    return conv_silu_onnx([layer], input_shape, "conv", precision)


@dataclass(frozen=True)
class ConvLayer:
    """One ``Conv + SiLU`` of a timed ONNX graph: numpy weight (out, in/groups, k, k), bias."""

    weight: object
    bias: object
    stride: int = 1
    pad: int = 0
    groups: int = 1


# int8: Q/DQ with an fp16 body (compile's default INT8 file); int8-fp32: the same Q/DQ with an
# fp32 body (--int8-float fp32), which TensorRT runs with other kernels between the convs.
TIMED_PRECISIONS = ("fp32", "fp16", "int8", "int8-fp32")
# Timing graphs at fp16/int8 use opset 19: QuantizeLinear/DequantizeLinear take fp16 scales and
# a DequantizeLinear outputs fp16 (as compiler.quantize writes INT8 files with an fp16 body).
_OPSET = {"fp32": 17, "fp16": 19, "int8": 19, "int8-fp32": 19}
_FP32_BODY = ("fp32", "int8-fp32")
_IR_VERSION = {17: 8, 19: 9}  # what each opset needs; newer onnx defaults exceed older runtimes
# int8 graphs: the per-tensor activation scale (amax / 127) of every conv input; timing does
# not depend on it, and SiLU outputs of the unit-variance layers below stay well inside it.
ACTIVATION_AMAX = 4.0


def conv_silu_onnx(
    layers: list[ConvLayer], input_shape: list[int], name: str, precision: str = "fp32"
):
    """An ONNX model of ``Conv + SiLU`` layers in sequence (SiLU as Sigmoid * x), input ``x``,
    output ``out``; a single layer's tensors are ``w``, ``b``, ``y``, ``s``, several are
    numbered.

    ``precision``: ``fp32``; ``fp16`` (every tensor fp16, inputs and outputs included, as a
    strongly typed TensorRT network runs it); ``int8``: the fp16 graph with explicit
    quantization where TensorRT fuses it, as :mod:`compiler.quantize` writes files: each conv's
    input through QuantizeLinear/DequantizeLinear (per-tensor, symmetric, zero point 0) and
    its weight stored as int8 codes with a per-output-channel DequantizeLinear; ``int8-fp32``:
    the same quantization in an fp32 graph (``--int8-float fp32`` files)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    if precision not in TIMED_PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(TIMED_PRECISIONS)}")
    dtype = np.float32 if precision in _FP32_BODY else np.float16
    nodes, weights, x = [], [], "x"
    shape = list(input_shape)  # of each layer's output, in turn
    for i, layer in enumerate(layers):
        tag = "" if len(layers) == 1 else str(i)
        out = "out" if i == len(layers) - 1 else f"o{tag}"
        kernel = list(layer.weight.shape[2:])
        weights.append(numpy_helper.from_array(layer.bias.astype(dtype), f"b{tag}"))
        conv_input, weight = x, f"w{tag}"
        if precision.startswith("int8"):
            conv_input, qnodes, qweights = _quantized_conv_inputs(x, layer.weight, tag, dtype)
            nodes += qnodes
            weights += qweights
        else:
            weights.append(numpy_helper.from_array(layer.weight.astype(dtype), weight))
        nodes += [
            helper.make_node(
                "Conv",
                [conv_input, weight, f"b{tag}"],
                [f"y{tag}"],
                kernel_shape=kernel,
                strides=[layer.stride] * 2,
                pads=[layer.pad] * 4,
                group=layer.groups,
            ),
            helper.make_node("Sigmoid", [f"y{tag}"], [f"s{tag}"]),
            helper.make_node("Mul", [f"y{tag}", f"s{tag}"], [out]),
        ]
        x = out
        size = [
            (d + 2 * layer.pad - k) // layer.stride + 1
            for d, k in zip(shape[2:], kernel, strict=True)
        ]
        shape = [shape[0], layer.weight.shape[0], *size]
    elem = TensorProto.FLOAT if precision in _FP32_BODY else TensorProto.FLOAT16
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", elem, input_shape)],
        [helper.make_tensor_value_info("out", elem, shape)],
        weights,
    )
    opset = _OPSET[precision]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = _IR_VERSION[opset]
    return model


def _quantized_conv_inputs(x: str, weight, tag: str, dtype) -> tuple[str, list, list]:
    """Q/DQ nodes and initializers feeding one conv of an int8 timing graph: (the conv's
    input name, nodes, initializers); the dequantized weight is named ``w{tag}``; scales are
    of the graph's float ``dtype`` (a DequantizeLinear outputs its scale's type)."""
    import numpy as np
    from onnx import helper, numpy_helper

    amax = np.abs(weight).reshape(weight.shape[0], -1).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(weight / scale[:, None, None, None]), -127, 127).astype(np.int8)
    initializers = [
        numpy_helper.from_array(np.array(ACTIVATION_AMAX / 127.0, dtype), f"xs{tag}"),
        numpy_helper.from_array(np.array(0, np.int8), f"xz{tag}"),
        numpy_helper.from_array(codes, f"wq{tag}"),
        numpy_helper.from_array(scale.astype(dtype), f"ws{tag}"),
        numpy_helper.from_array(np.zeros(weight.shape[0], np.int8), f"wz{tag}"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", [x, f"xs{tag}", f"xz{tag}"], [f"xq{tag}"]),
        helper.make_node("DequantizeLinear", [f"xq{tag}", f"xs{tag}", f"xz{tag}"], [f"xd{tag}"]),
        helper.make_node(
            "DequantizeLinear", [f"wq{tag}", f"ws{tag}", f"wz{tag}"], [f"w{tag}"], axis=0
        ),
    ]
    return f"xd{tag}", nodes, initializers


def ort_measurer(batch: int, threads: int, spinning: bool = True, runs: int = 15, warmup: int = 3):
    """Time one shape on ONNX Runtime CPU (fp32), with the session options of the model
    runs (:class:`kernels.ort.OrtRunner`)."""
    import numpy as np

    from yoloprune.kernels.ort import OrtRunner

    def measure_shape(shape: ConvShape) -> float:
        x = np.random.default_rng(0).random(
            (batch, shape.cin, shape.height, shape.width), dtype=np.float32
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "conv.onnx"
            path.write_bytes(shape.onnx(batch).SerializeToString())
            with OrtRunner(path, threads, spinning) as runner:  # timed alone, as one conv
                return measure(lambda: runner.infer(x), runs=runs, warmup=warmup).median_ms

    return measure_shape


def torch_measurer(batch: int, device: str, precision: str, runs: int = 30, warmup: int = 5):
    """Time one conv shape through the PyTorch runtime (CUDA fp16 channels_last by default)."""
    from yoloprune.kernels.torch_runtime import TorchRunner, TorchSettings

    settings = TorchSettings(device=device, precision=precision, channels_last=True)

    def measure_shape(shape: ConvShape) -> float:
        runner = TorchRunner(shape.module(), batch, shape.height, settings, channels=shape.cin)
        return runner.time(runs=runs, warmup=warmup).median_ms

    return measure_shape


def open_table(
    runtime: str = "ort",
    batch: int = 1,
    threads: int | None = None,
    precision: str | None = None,
    device: str | None = None,
    path: Path | None = None,
    spinning: bool = True,
    kind: type[LatencyTable] = LatencyTable,
) -> LatencyTable:
    """The cached table of this runtime on this machine (created empty if new).

    ONNX Runtime tables are measured with intra-op spinning on by default, whatever setting the
    models are timed with: each conv is timed alone (no other session to disturb), and the table
    should hold what channel counts change. With spinning off every entry also carries a thread
    wake-up, a constant per operator that no plan changes, which makes small convs look dearer
    per channel than they are (one benchmark run each: latency-aware plans from such a table
    reached MACs 0.5 at latency ratios 0.556 and 0.564 on yolo11s and yolo26s, against 0.543
    and 0.542 from the spinning table)."""
    from yoloprune.kernels.ort import default_threads, machine_info

    if runtime == "ort":
        if precision not in (None, "fp32"):
            raise LatencyTableError(f"ort latency tables are fp32, not {precision}")
        threads = threads or default_threads()
        machine = machine_info()  # the vector extensions decide the kernels: part of the key
        cpu = f"{machine['cpu']} ({', '.join(machine['cpu_flags']) or 'flags unknown'})"
        key = TableKey("ort", cpu, "fp32", batch, threads, spinning)
        measurer = ort_measurer(batch, threads, spinning)
    elif runtime == "torch":
        device = device or "cuda"
        precision = precision or ("fp16" if device.startswith("cuda") else "fp32")
        name = torch.cuda.get_device_name(0) if device.startswith("cuda") else machine_info()["cpu"]
        key = TableKey("torch", name, precision, batch, torch.get_num_threads())
        measurer = torch_measurer(batch, device, precision)
    elif runtime == "tensorrt":
        from yoloprune.kernels.tensorrt import available, shape_measurer

        ok, version = available()
        if not ok:
            raise LatencyTableError(f"latency tables on tensorrt: {version}")
        precision = precision or "fp32"  # as compile's --precision
        name = f"{torch.cuda.get_device_name(0)} TensorRT {version}"
        key = TableKey("tensorrt", name, precision, batch, 1)
        measurer = shape_measurer(batch, precision)
    else:
        raise LatencyTableError(
            f"latency tables are measured on ort, torch or tensorrt, not {runtime!r}"
        )
    return kind(key, path or DEFAULT_CACHE / kind.FOLDER / key.filename(), measurer)
