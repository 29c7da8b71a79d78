"""TensorRT lowering and runner, for TensorRT 10.x (Jetson) and 11.x alike: strongly typed.

TensorRT 11 removed weak typing (the FP16/INT8 builder flags, implicit INT8 calibrators and
calibration profiles): every network is strongly typed, so the precision of every tensor comes
from the ONNX file itself (an fp16 ONNX, or explicit QuantizeLinear/DequantizeLinear nodes for
INT8). TensorRT 10 builds such networks too, when asked for with the ``STRONGLY_TYPED``
creation flag (11.x accepts and ignores it). So one code path serves both, and no precision
builder flag is ever set: ``build --precision`` only picks which ONNX file to build.

TensorRT is imported lazily: nothing here needs it until an engine is built or run, and where it
is missing every entry point raises :class:`TensorRTUnavailable` naming the fix. It could not be
installed on the machines this project was developed on (the registry's TensorRT wheels are
stubs that download from NVIDIA's index), so this module has not been run against a real
TensorRT; its API is checked against stand-in modules that expose only TensorRT 10's or only
TensorRT 11's Python names (tests/kernels/test_tensorrt.py), which is an API check, not a run.

- :func:`build_engine`: ONNX -> serialized engine; an optimisation profile over the batch axis
  only where the ONNX's batch is dynamic, a timing cache file reused across builds, a
  workspace limit; beside the engine a metadata JSON a deployment pipeline can read
  (:func:`engine_metadata`: precision and output layout read from the ONNX's own metadata).
- :class:`EngineRunner`: deserialize, bind torch CUDA tensors as I/O buffers (pycuda is not
  needed), run with ``execute_async_v3`` and time with the shared primitive.
- :func:`write_triton_repository`: ``model_repository/<name>/1/model.plan`` + ``config.pbtxt``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from yoloprune.graphs.errors import RuntimeSetupError, YoloPruneError, first_line
from yoloprune.graphs.family import OUTPUT_LAYOUTS
from yoloprune.graphs.files import import_native, write_bytes_atomic
from yoloprune.kernels.runner import Runner

PRECISIONS = ("fp32", "fp16", "int8")
INPUT_NAME, OUTPUT_NAME = "images", "output0"


class TensorRTUnavailable(RuntimeSetupError):
    """TensorRT (or a CUDA GPU) is missing where an engine is built or run."""


def tensorrt():
    """The ``tensorrt`` module, or a clear error saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(
            "TensorRT is not installed: install NVIDIA's wheel on a machine with a CUDA GPU "
            "(pip install tensorrt --extra-index-url https://pypi.nvidia.com), or measure with "
            "--runtime torch (PyTorch CUDA) or --runtime ort (CPU)"
        ) from exc
    if not hasattr(trt, "Builder"):  # the registry's stub package imports but is empty
        raise TensorRTUnavailable(
            "the installed 'tensorrt' package is a stub without the library: install NVIDIA's "
            "wheel (pip install tensorrt --extra-index-url https://pypi.nvidia.com)"
        )
    return trt


def available() -> tuple[bool, str]:
    """(True, version) when engines can be built and run here, else (False, why not)."""
    try:
        trt = tensorrt()
    except TensorRTUnavailable as exc:
        return False, str(exc)
    import torch

    if not torch.cuda.is_available():
        return False, "TensorRT is installed but no CUDA GPU is visible to PyTorch"
    return True, trt.__version__


DEFAULT_BATCH_PROFILE = (1, 1, 32)  # min, opt, max of a dynamic-batch ONNX


@dataclass(frozen=True)
class BuildSettings:
    """How to build; the precision is the ONNX file's own. Batch bounds apply to ONNX files
    with a dynamic batch axis (None: :data:`DEFAULT_BATCH_PROFILE`)."""

    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    workspace_gib: float = 4.0
    timing_cache: Path | None = None  # read if present, written back after the build

    def __post_init__(self) -> None:
        given = [b for b in (self.min_batch, self.opt_batch, self.max_batch) if b is not None]
        if any(type(b) is not int or b < 1 for b in given):
            raise YoloPruneError("batch sizes must be positive integers")
        low, opt, high = self.profile()
        if not (1 <= low <= opt <= high):
            raise YoloPruneError(
                f"batch profile {low}/{opt}/{high} must satisfy 1 <= min <= opt <= max"
            )
        if self.workspace_gib <= 0:
            raise YoloPruneError("--workspace must be positive (GiB)")

    def profile(self) -> tuple[int, int, int]:
        """(min, opt, max) batch: given values, else the defaults (opt at most max)."""
        default_low, default_opt, default_high = DEFAULT_BATCH_PROFILE
        high = default_high if self.max_batch is None else self.max_batch
        low = default_low if self.min_batch is None else self.min_batch
        opt = min(max(default_opt, low), high) if self.opt_batch is None else self.opt_batch
        return low, opt, high

    def batch_given(self) -> bool:
        return any(b is not None for b in (self.min_batch, self.opt_batch, self.max_batch))


@dataclass
class BuiltEngine:
    engine: Path
    metadata: Path


def version_major(trt) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError as exc:
        raise TensorRTUnavailable(f"TensorRT version {trt.__version__!r} is not readable") from exc


def network_flags(trt) -> int:
    """Creation flags of a strongly typed network: TensorRT 10's ``STRONGLY_TYPED`` flag (11.x
    accepts and ignores it; where 11.x no longer names it, strong typing is the only mode)."""
    kinds = getattr(trt, "NetworkDefinitionCreationFlag", None)
    flag = getattr(kinds, "STRONGLY_TYPED", None)
    if flag is not None:
        return 1 << int(flag)
    if version_major(trt) >= 11:
        return 0
    raise TensorRTUnavailable(
        f"TensorRT {trt.__version__} cannot build strongly typed networks; yoloprune builds "
        "with TensorRT 10.x or 11.x"
    )


def onnx_input_dims(path: Path) -> list[int | None]:
    """The first input's dimensions (None where an axis is dynamic); a file that is not ONNX
    is one line naming it."""
    onnx = import_native("onnx")

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends: not an ONNX file
        raise YoloPruneError(f"{path}: not a readable ONNX file ({first_line(exc)})") from exc
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def onnx_batch(path: Path) -> int | None:
    """The first input's batch size, or None where the axis is dynamic."""
    return onnx_input_dims(path)[0]


def onnx_properties(path: Path) -> dict[str, str]:
    """The ONNX file's metadata_props (yoloprune writes layout, precision, names, ...)."""
    onnx = import_native("onnx")

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends: not an ONNX file
        raise YoloPruneError(f"{path}: not a readable ONNX file ({first_line(exc)})") from exc
    return {p.key: p.value for p in proto.metadata_props}


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)


def serialized_engine(onnx_path: Path, settings: BuildSettings | None = None) -> bytes:
    """Parse ``onnx_path`` into a strongly typed network and build it: the serialized engine
    (the timing cache, where ``settings`` names one, is read and written back)."""
    trt = tensorrt()
    settings = settings or BuildSettings()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise YoloPruneError(f"{onnx_path}: TensorRT cannot parse this ONNX file: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(
        trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gib * (1 << 30))
    )
    _batch_profile(builder, config, network.get_input(0), settings, onnx_path)
    cache_bytes = b""
    if settings.timing_cache is not None and Path(settings.timing_cache).is_file():
        cache_bytes = Path(settings.timing_cache).read_bytes()
    timing_cache = config.create_timing_cache(cache_bytes)
    if config.set_timing_cache(timing_cache, ignore_mismatch=False) is False:
        raise YoloPruneError(
            f"--timing-cache {settings.timing_cache}: made for another GPU or TensorRT version; "
            "delete it or give another path"
        )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise YoloPruneError(f"{onnx_path}: TensorRT failed to build an engine (see its log)")
    if settings.timing_cache is not None:
        cache = config.get_timing_cache()
        if cache is None:
            raise YoloPruneError(
                f"--timing-cache {settings.timing_cache}: TensorRT returned no timing cache to "
                "save (see its log); build without --timing-cache"
            )
        _atomic_write(Path(settings.timing_cache), bytes(cache.serialize()))
    return bytes(serialized)


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    settings: BuildSettings | None = None,
    metadata: dict | None = None,
) -> BuiltEngine:
    """Build ``onnx_path`` (:func:`serialized_engine`) and write ``engine_path`` plus
    ``<engine>.json`` (metadata). The engine runs at the precision the ONNX file holds."""
    settings = settings or BuildSettings()
    engine_path = Path(engine_path)
    meta_path = _refuse_clobbering(Path(onnx_path), engine_path)
    properties = onnx_properties(onnx_path)
    serialized = serialized_engine(onnx_path, settings)
    trt = tensorrt()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(serialized)
    if engine is None:
        raise YoloPruneError(f"{onnx_path}: TensorRT cannot load the engine it built (its log)")
    tensors = _io_description(trt, engine)
    meta = engine_metadata(tensors, settings, trt.__version__, properties, metadata)
    # both files once everything is known: a failure above leaves neither
    _atomic_write(engine_path, serialized)
    _atomic_write(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    return BuiltEngine(engine_path, meta_path)


def _refuse_clobbering(onnx_path: Path, engine_path: Path) -> Path:
    """The metadata's path (the engine's, ending .json), where neither file would overwrite
    the ONNX file or each other."""
    meta_path = engine_path.with_suffix(".json")
    source = onnx_path.resolve()
    if engine_path.suffix == ".json" or source in (engine_path.resolve(), meta_path.resolve()):
        raise YoloPruneError(
            f"--out {engine_path}: the engine and its metadata ({meta_path.name}) would "
            f"overwrite {'the ONNX file' if engine_path.suffix != '.json' else 'each other'}; "
            "give a path ending in .engine"
        )
    return meta_path


# Executions per timed sample: a small engine's enqueue costs about as much as its kernels, so
# each sample times this many back-to-back runs on the stream and reports one run's share.
RUNS_PER_SAMPLE = 10


def shape_measurer(batch: int, precision: str, runs: int = 30, warmup: int = 5):
    """Time one latency-table shape (a conv, or the alignment profile's chain) as a TensorRT
    engine: its ONNX built at ``precision`` (fp16 I/O and body; int8: explicit Q/DQ, see
    :func:`kernels.latency_table.conv_silu_onnx`), built strongly typed, run on random input,
    timed on the engine's stream (:data:`RUNS_PER_SAMPLE` runs per sample). Never run here (no
    TensorRT on the development machines)."""
    import tempfile

    import torch

    from yoloprune.kernels.timing import measure

    def measure_shape(shape) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path, engine_path = Path(tmp) / "shape.onnx", Path(tmp) / "shape.engine"
            onnx_path.write_bytes(shape.onnx(batch, precision).SerializeToString())
            _atomic_write(engine_path, serialized_engine(onnx_path))
            with EngineRunner(engine_path, batch) as runner:
                runner.buffers[runner.inputs[0]].uniform_()
                torch.cuda.synchronize()  # the input is written before the engine's stream reads

                def runs_back_to_back() -> None:
                    for _ in range(RUNS_PER_SAMPLE):
                        runner.infer()

                timing = measure(
                    runs_back_to_back,
                    runs=runs,
                    warmup=warmup,
                    sync=runner.sync,
                    clock=runner.clock(),
                )
                return timing.median_ms / RUNS_PER_SAMPLE

    return measure_shape


def _batch_profile(builder, config, image, settings: BuildSettings, onnx_path: Path) -> None:
    """An optimisation profile over the batch axis, where the ONNX's batch is dynamic; a
    static batch has none to set (and refuses batch bounds it cannot honour)."""
    batch, *chw = tuple(image.shape)
    if batch >= 0:
        if settings.batch_given() and settings.profile() != (batch, batch, batch):
            raise YoloPruneError(
                f"{onnx_path}: its batch is fixed at {batch}; for other batch sizes export it "
                "with a dynamic batch (compile/export --dynamic), or drop the batch options"
            )
        return
    low, opt, high = settings.profile()
    profile = builder.create_optimization_profile()
    profile.set_shape(image.name, (low, *chw), (opt, *chw), (high, *chw))
    config.add_optimization_profile(profile)


def _io_description(trt, engine) -> list[dict]:
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        entry = {
            "name": name,
            "io": "input" if is_input else "output",
            "shape": list(engine.get_tensor_shape(name)),
            "dtype": np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name,
            "format": str(engine.get_tensor_format_desc(name)),
        }
        if is_input:
            entry["profile"] = [list(s) for s in engine.get_tensor_profile_shape(name, 0)]
        tensors.append(entry)
    return tensors


def engine_metadata(
    tensors: list[dict],
    settings: BuildSettings,
    trt_version: str,
    properties: dict[str, str] | None = None,
    extra: dict | None = None,
) -> dict:
    """What a deployment pipeline needs beside the engine (pure data; no TensorRT needed). The
    precision and the output layout are the ONNX file's own (``properties``: its metadata)."""
    import torch

    properties = properties or {}
    for tensor in tensors:
        if tensor["io"] == "input" and "strides" not in tensor:
            # dense NCHW row-major strides of the opt-batch shape (the engine's linear input)
            shape = [settings.profile()[1] if d < 0 else d for d in tensor["shape"]]
            tensor["strides"] = [int(np.prod(shape[i + 1 :])) for i in range(len(shape))]
    build = asdict(settings)
    build = {k: (str(v) if isinstance(v, Path) else v) for k, v in build.items()}
    build["batch_profile"] = list(settings.profile())
    layout = properties.get("layout")
    return {
        "format": "yoloprune.engine.v2",
        "tensorrt": trt_version,
        "network": "strongly typed",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "precision": properties.get("precision", "fp32"),
        "quantization": _json_or_none(properties.get("quantization")),
        "build": build,
        "tensors": tensors,
        "preprocess": {
            "letterbox": "resize the long side to the input size keeping aspect ratio, pad to "
            "a square with value 114, centred (yolov5 letterbox, auto=False)",
            "color": "RGB",
            "layout": "NCHW",
            "scale": "pixel / 255",
        },
        "output": {
            "layout": layout or "unknown",
            "output0": OUTPUT_LAYOUTS.get(
                layout, "not recorded: the ONNX was not written by yoloprune (no 'layout' metadata)"
            ),
            "export_mode": properties.get("export_mode"),
        },
        **(extra or {}),
    }


def _json_or_none(text: str | None):
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


class EngineRunner(Runner):
    """Runs a serialized engine at a fixed ``batch`` with torch CUDA tensors as buffers (no
    pycuda needed). :meth:`activate` deserializes the engine, sets the batch and allocates
    the buffers; ``infer(images)`` copies ``images`` (a CUDA tensor) into the input buffer on
    the engine's stream, ``infer()`` reruns the buffer as it is; both return the output0 buffer
    (call :meth:`sync` before reading it: the engine runs on its own stream)."""

    name = "tensorrt"

    def __init__(self, engine_path: Path, batch: int = 1):
        self.engine_path = Path(engine_path)
        self.batch = batch
        self.version: str | None = None
        self.engine = self.context = self.stream = None
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.buffers: dict[str, object] = {}

    def activate_impl(self) -> None:
        import torch

        ok, why = available()
        if not ok:
            raise TensorRTUnavailable(why)
        trt = tensorrt()
        logger = trt.Logger(trt.Logger.WARNING)
        try:
            plan = self.engine_path.read_bytes()
        except OSError as exc:
            raise RuntimeSetupError(
                f"{self.engine_path}: cannot read it ({first_line(exc)})"
            ) from exc
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        if engine is None:
            raise RuntimeSetupError(
                f"{self.engine_path}: TensorRT cannot deserialize this engine (built by another "
                "TensorRT version or for another GPU?); rebuild it here"
            )
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        for name in inputs:
            shape = list(engine.get_tensor_shape(name))
            mismatch = shape[0] >= 0 and shape[0] != self.batch  # a fixed batch
            shape[0] = self.batch
            if mismatch or not context.set_input_shape(name, shape):  # False: out of profile
                low, _, high = engine.get_tensor_profile_shape(name, 0)
                raise RuntimeSetupError(
                    f"{self.engine_path}: the engine runs batch {low[0]} to {high[0]}, not "
                    f"{self.batch}; rebuild it from a dynamic-batch ONNX (--dynamic) with "
                    "--max-batch, or bench at a batch it runs"
                )
        buffers = {}
        for name in names:
            shape = tuple(context.get_tensor_shape(name))
            dtype = torch.from_numpy(
                np.zeros(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))
            ).dtype
            buffers[name] = torch.zeros(shape, dtype=dtype, device="cuda")
            context.set_tensor_address(name, buffers[name].data_ptr())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())  # buffers exist before first use
        self._torch, self.version = torch, trt.__version__
        self.engine, self.context, self.stream, self.buffers = engine, context, stream, buffers
        self.inputs, self.outputs = inputs, [n for n in names if n not in inputs]

    def deactivate_impl(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()  # no queued work may outlive its buffers
        self.buffers = {}
        self.context = self.engine = self.stream = None

    def infer_impl(self, images=None):
        if images is not None:
            self.stream.wait_stream(self._torch.cuda.current_stream())  # images are ready
            with self._torch.cuda.stream(self.stream):  # ordered before the engine's work
                self.buffers[self.inputs[0]].copy_(images, non_blocking=True)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise YoloPruneError("TensorRT could not enqueue the engine's run (see its log)")
        return self.buffers[self.outputs[0]]

    def sync(self) -> None:
        self.stream.synchronize()

    def clock(self):
        from yoloprune.kernels.timing import CudaEventClock

        return CudaEventClock(self.stream)

    def describe(self) -> dict:
        return {"tensorrt": self.version}


TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int8": "TYPE_INT8"}


def triton_max_batch(metadata: dict) -> int:
    """Triton's ``max_batch_size``: the profile's maximum where the engine's batch is dynamic;
    0 where it is fixed (Triton then takes the batch axis as part of ``dims``)."""
    inputs = [t for t in metadata["tensors"] if t["io"] == "input"]
    if inputs and inputs[0]["shape"][0] < 0:
        return int(metadata["build"]["batch_profile"][2])
    return 0


def triton_config(name: str, metadata: dict) -> str:
    """``config.pbtxt`` for Triton's TensorRT backend (batch dimension left out of dims where
    the engine batches, kept where its batch is fixed)."""
    max_batch = triton_max_batch(metadata)
    lines = [
        f'name: "{name}"',
        'platform: "tensorrt_plan"',
        f"max_batch_size: {max_batch}",
    ]
    for tensor in metadata["tensors"]:
        shape = tensor["shape"][1:] if max_batch else tensor["shape"]
        dims = ", ".join(str(d) for d in shape)
        lines += [
            f"{tensor['io']} [",
            "  {",
            f'    name: "{tensor["name"]}"',
            f"    data_type: {TRITON_DTYPES[tensor['dtype']]}",
            f"    dims: [ {dims} ]",
            "  }",
            "]",
        ]
    lines += ["instance_group [ { kind: KIND_GPU, count: 1 } ]", ""]
    return "\n".join(lines)


def write_triton_repository(
    engine_path: Path, metadata_path: Path, repository: Path, name: str
) -> Path:
    """``repository/name/config.pbtxt`` and ``repository/name/1/model.plan``; returns the
    model folder."""
    metadata = json.loads(Path(metadata_path).read_text())
    folder = Path(repository) / name
    config = triton_config(name, metadata)  # before anything is written
    _atomic_write(folder / "1" / "model.plan", Path(engine_path).read_bytes())
    _atomic_write(folder / "config.pbtxt", config.encode())
    return folder
