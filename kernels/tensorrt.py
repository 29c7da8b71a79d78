"""TensorRT lowering and runner, written against the TensorRT 10 Python API.

TensorRT is imported lazily: nothing here needs it until an engine is built or run, and where it
is missing every entry point raises :class:`TensorRTUnavailable` naming the fix. It could not be
installed on the machines this project was developed on (the registry's TensorRT wheels are
stubs that download from NVIDIA's index), so this module has not been run against a real
TensorRT; its tests skip with that reason where it is absent (see README, "What is verified").

- :func:`build_engine`: ONNX -> serialized engine; fp16 (default), fp32 or int8 (entropy
  calibration from a folder of images, with a calibration cache), one optimization profile
  over the batch axis, a timing cache file reused across builds, a workspace limit; beside the
  engine a metadata JSON a deployment pipeline can read (:func:`engine_metadata`).
- :class:`EngineRunner`: deserialize, bind torch CUDA tensors as I/O buffers (pycuda is not
  needed), run with ``execute_async_v3`` and time with the shared primitive.
- :func:`write_triton_repository`: ``model_repository/<name>/1/model.plan`` + ``config.pbtxt``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from yoloprune.graphs.errors import YoloPruneError
from yoloprune.graphs.files import write_bytes_atomic

PRECISIONS = ("fp32", "fp16", "int8")
INPUT_NAME, OUTPUT_NAME = "images", "output0"


class TensorRTUnavailable(YoloPruneError):
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


@dataclass(frozen=True)
class BuildSettings:
    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 32
    workspace_gib: float = 4.0
    timing_cache: Path | None = None  # read if present, written back after the build
    calibration_images: Path | None = None  # int8: a folder of images
    calibration_cache: Path | None = None  # int8: reused when present (no images needed then)
    calibration_batches: int = 32
    calibration_batch: int = 8

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise YoloPruneError(
                f"--precision {self.precision}: use one of {', '.join(PRECISIONS)}"
            )
        if not (1 <= self.min_batch <= self.opt_batch <= self.max_batch):
            raise YoloPruneError("batch profile must satisfy 1 <= min <= opt <= max")
        if self.workspace_gib <= 0:
            raise YoloPruneError("--workspace must be positive (GiB)")
        if self.precision == "int8":
            cache = self.calibration_cache
            has_cache = cache is not None and Path(cache).is_file()
            if not has_cache and self.calibration_images is None:
                raise YoloPruneError(
                    "int8 needs calibration data: pass --calib-images DIR (a folder of "
                    "representative images) or an existing --calib-cache file"
                )


@dataclass
class BuiltEngine:
    engine: Path
    metadata: Path


def calibration_batches(folder: Path, imgsz: int, batch: int, count: int):
    """Letterboxed float32 NCHW batches in [0, 1] from the images of ``folder`` (sorted), as
    the deployed pipeline feeds them; at most ``count`` batches."""
    from PIL import Image

    from yoloprune.kernels.preprocess import IMAGE_SUFFIXES, letterbox

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise YoloPruneError(f"{folder}: no images found for INT8 calibration")
    chunk: list[np.ndarray] = []
    produced = 0
    for path in files:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        boxed = letterbox(pixels, imgsz)[0]
        chunk.append(boxed.transpose(2, 0, 1).astype(np.float32) / 255.0)
        if len(chunk) == batch:
            yield np.ascontiguousarray(np.stack(chunk))
            chunk, produced = [], produced + 1
            if produced == count:
                return
    if chunk and produced < count:
        yield np.ascontiguousarray(np.stack(chunk + [chunk[-1]] * (batch - len(chunk))))


def _entropy_calibrator(trt, batches, batch: int, cache_path: Path | None):
    """An IInt8EntropyCalibrator2 feeding ``batches`` through a torch CUDA buffer."""
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self._batches = iter(batches)
            self._buffer = None

        def get_batch_size(self):
            return batch

        def get_batch(self, names):
            try:
                host = next(self._batches)
            except StopIteration:
                return None
            self._buffer = torch.from_numpy(host).cuda()
            return [int(self._buffer.data_ptr())]

        def read_calibration_cache(self):
            if cache_path is not None and Path(cache_path).is_file():
                return Path(cache_path).read_bytes()
            return None

        def write_calibration_cache(self, cache):
            if cache_path is not None:
                _atomic_write(Path(cache_path), bytes(cache))

    return EntropyCalibrator()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    settings: BuildSettings | None = None,
    metadata: dict | None = None,
) -> BuiltEngine:
    """Parse ``onnx_path`` and write ``engine_path`` plus ``<engine>.json`` (metadata)."""
    trt = tensorrt()
    settings = settings or BuildSettings()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise YoloPruneError(f"{onnx_path}: TensorRT cannot parse this ONNX file: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(
        trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gib * (1 << 30))
    )
    image = network.get_input(0)
    _, channels, height, width = image.shape
    profile = builder.create_optimization_profile()
    profile.set_shape(
        image.name,
        (settings.min_batch, channels, height, width),
        (settings.opt_batch, channels, height, width),
        (settings.max_batch, channels, height, width),
    )
    config.add_optimization_profile(profile)
    if settings.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # int8 falls back to fp16, not fp32, per layer
    if settings.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        batches = (
            calibration_batches(
                settings.calibration_images,
                height,
                settings.calibration_batch,
                settings.calibration_batches,
            )
            if settings.calibration_images is not None
            else iter(())
        )
        calib_profile = builder.create_optimization_profile()
        shape = (settings.calibration_batch, channels, height, width)
        calib_profile.set_shape(image.name, shape, shape, shape)
        config.set_calibration_profile(calib_profile)
        config.int8_calibrator = _entropy_calibrator(
            trt, batches, settings.calibration_batch, settings.calibration_cache
        )
    cache_bytes = b""
    if settings.timing_cache is not None and Path(settings.timing_cache).is_file():
        cache_bytes = Path(settings.timing_cache).read_bytes()
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise YoloPruneError(f"{onnx_path}: TensorRT failed to build an engine (see its log)")
    engine_path = Path(engine_path)
    _atomic_write(engine_path, bytes(serialized))
    if settings.timing_cache is not None:
        _atomic_write(Path(settings.timing_cache), bytes(config.get_timing_cache().serialize()))
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(bytes(serialized))
    meta = engine_metadata(_io_description(trt, engine), settings, trt.__version__, metadata)
    meta_path = engine_path.with_suffix(".json")
    _atomic_write(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
    return BuiltEngine(engine_path, meta_path)


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
    tensors: list[dict], settings: BuildSettings, trt_version: str, extra: dict | None = None
) -> dict:
    """What a deployment pipeline needs beside the engine (pure data; no TensorRT needed)."""
    import torch

    for tensor in tensors:
        if tensor["io"] == "input" and "strides" not in tensor:
            # dense NCHW row-major strides of the opt-batch shape (the engine's linear input)
            shape = [settings.opt_batch if d < 0 else d for d in tensor["shape"]]
            tensor["strides"] = [int(np.prod(shape[i + 1 :])) for i in range(len(shape))]
    build = asdict(settings)
    build = {k: (str(v) if isinstance(v, Path) else v) for k, v in build.items()}
    return {
        "format": "yoloprune.engine.v1",
        "tensorrt": trt_version,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "precision": settings.precision,
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
            "layout": "(batch, anchors*cells, 5 + nc): cx, cy, w, h in input pixels, "
            "objectness, class scores (sigmoid applied); NMS not included",
        },
        **(extra or {}),
    }


class EngineRunner:
    """Runs a serialized engine with torch CUDA tensors as buffers (no pycuda needed)."""

    def __init__(self, engine_path: Path):
        import torch

        ok, why = available()
        if not ok:
            raise TensorRTUnavailable(why)
        trt = tensorrt()
        self._torch = torch
        self.version = trt.__version__
        self._trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise YoloPruneError(
                f"{engine_path}: TensorRT cannot deserialize this engine (built by another "
                "TensorRT version or for another GPU?); rebuild it here"
            )
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.buffers: dict[str, object] = {}

    def set_batch(self, batch: int) -> None:
        torch, trt = self._torch, self._trt
        for name in self.inputs:
            shape = list(self.engine.get_tensor_shape(name))
            shape[0] = batch
            self.context.set_input_shape(name, shape)
        for name in self.inputs + self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch.from_numpy(
                np.zeros(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            ).dtype
            self.buffers[name] = torch.zeros(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, self.buffers[name].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())  # buffers exist before first use

    def run(self, images=None):
        if images is not None:
            with self._torch.cuda.stream(self.stream):  # ordered before the engine's work
                self.buffers[self.inputs[0]].copy_(images, non_blocking=True)
        self.context.execute_async_v3(self.stream.cuda_stream)
        return self.buffers[self.outputs[0]]

    def sync(self) -> None:
        self.stream.synchronize()

    def clock(self):
        from yoloprune.kernels.timing import CudaEventClock

        return CudaEventClock(self.stream)


TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int8": "TYPE_INT8"}


def triton_config(name: str, metadata: dict, max_batch: int) -> str:
    """``config.pbtxt`` for Triton's TensorRT backend (batch dimension left out of dims)."""
    lines = [
        f'name: "{name}"',
        'platform: "tensorrt_plan"',
        f"max_batch_size: {max_batch}",
    ]
    for tensor in metadata["tensors"]:
        dims = ", ".join(str(d) for d in tensor["shape"][1:])
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
    _atomic_write(folder / "1" / "model.plan", Path(engine_path).read_bytes())
    max_batch = int(metadata["build"]["max_batch"])
    _atomic_write(folder / "config.pbtxt", triton_config(name, metadata, max_batch).encode())
    return folder
