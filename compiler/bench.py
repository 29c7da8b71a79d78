"""Bench pass: latency of one or more models on one runtime, interleaved, with ratios.

Runtimes: ``ort`` (ONNX Runtime CPU), ``torch`` (PyTorch; CUDA fp16 by default, CPU fp32 with
``--device cpu``) and ``tensorrt`` (an engine file, or an ONNX/PyTorch model built on the fly;
needs TensorRT and a GPU). Every result names its runtime, device, batch, size, precision and
threads, so no number is quoted without what produced it.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from yoloprune.graphs.errors import YoloPruneError

RUNTIMES = ("ort", "torch", "tensorrt")


@dataclass(frozen=True)
class BenchSettings:
    runtime: str = "ort"
    batch: int = 1
    imgsz: int | None = None
    # ort: each file's own; torch: fp16 on cuda, fp32 on cpu; tensorrt: each file's own (given,
    # it must match the ONNX file's: the precision lives in the file)
    precision: str | None = None
    device: str | None = None  # torch: cuda (default) or cpu
    threads: int | None = None  # ort intra-op threads (default: all available cores)
    spinning: bool = False  # ort: idle intra-op threads spin-wait (ONNX Runtime's default: on)
    runs: int = 50
    warmup: int = 10
    cuda_graph: bool = False
    seconds: float = 0.0  # more runs (up to kernels.timing.MAX_RUNS) within this, per model
    profile: bool = False  # ort: also where each model's time goes (ONNX Runtime's profiler)

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise YoloPruneError(f"--runtime {self.runtime}: use one of {', '.join(RUNTIMES)}")
        if self.batch < 1 or self.runs < 1 or self.warmup < 0 or self.seconds < 0:
            raise YoloPruneError(
                "--batch and --runs must be positive, --warmup and the time budget non-negative"
            )
        if self.profile and self.runtime != "ort":
            raise YoloPruneError(
                f"--profile reads ONNX Runtime's profiler: use it with --runtime ort, not "
                f"{self.runtime}"
            )
        torch_only = {"--device": self.device, "--cuda-graph": self.cuda_graph or None}
        given = [flag for flag, value in torch_only.items() if value is not None]
        if given and self.runtime != "torch":
            raise YoloPruneError(
                f"{', '.join(given)} set PyTorch's runtime: use with --runtime torch, not "
                f"{self.runtime}"
            )
        if self.runtime == "ort" and self.precision not in (None, "fp32"):
            raise YoloPruneError(
                "ONNX Runtime runs each ONNX file at its own precision (an X.fp16.onnx at "
                "fp16): drop --precision and pass the file"
            )

    def resolved_precision(self) -> str:
        if self.precision:
            return self.precision
        if self.runtime == "torch":
            return "fp32" if self.resolved_device() == "cpu" else "fp16"
        return "fp32"

    def resolved_device(self) -> str:
        if self.runtime == "ort":
            return "cpu"
        return self.device or "cuda"


def _load(spec: str):
    from yoloprune.graphs.checkpoint import load_model

    return load_model(spec)


def _model_imgsz(spec: str, settings: BenchSettings) -> int:
    if settings.imgsz:
        return settings.imgsz
    if spec.endswith(".onnx"):
        from yoloprune.compiler.export import onnx_input_size

        return onnx_input_size(Path(spec))
    return _load(spec)[1].imgsz


def _onnx_path(source, imgsz: int, scratch: Path, index: int) -> Path:
    """An ONNX file for ``source``: itself if it is one, else exported (dynamic batch) from the
    model or the model file."""
    from yoloprune.compiler.export import export_onnx

    if isinstance(source, str) and source.endswith(".onnx"):
        return Path(source)
    model = source if isinstance(source, nn.Module) else _load(source)[0]
    return export_onnx(model, scratch / f"model{index}.onnx", imgsz, dynamic=True)


def _ort_runner(source, settings: BenchSettings, imgsz: int, scratch: Path, index: int):
    from yoloprune.kernels.ort import OrtRunner

    return OrtRunner(_onnx_path(source, imgsz, scratch, index), settings.threads, settings.spinning)


def _torch_runner(source, settings: BenchSettings, imgsz: int, scratch: Path, index: int):
    from yoloprune.kernels.torch_runtime import TorchRunner, TorchSettings

    if isinstance(source, str) and source.endswith(".onnx"):
        raise YoloPruneError(f"{source}: --runtime torch needs a PyTorch model (.pt or .yaml)")
    model = source if isinstance(source, nn.Module) else _load(source)[0]
    torch_settings = TorchSettings(
        device=settings.resolved_device(),
        precision=settings.resolved_precision(),
        cuda_graph=settings.cuda_graph,
    )
    return TorchRunner(model, settings.batch, imgsz, torch_settings)


def _tensorrt_runner(spec: str, settings: BenchSettings, imgsz: int, scratch: Path, index: int):
    from yoloprune.kernels.tensorrt import (
        BuildSettings,
        EngineRunner,
        build_engine,
        onnx_batch,
        onnx_properties,
    )

    path = Path(spec)
    if path.suffix not in (".engine", ".plan"):
        onnx_path = _onnx_path(spec, imgsz, scratch, index)
        own = onnx_properties(onnx_path).get("precision", "fp32")
        if settings.precision not in (None, own):
            raise YoloPruneError(
                f"{spec}: is {own}, and TensorRT runs it at {own} (strongly typed: the "
                f"precision is the ONNX file's): drop --precision, or bench the "
                f"{settings.precision} ONNX file"
            )
        dynamic = onnx_batch(onnx_path) is None
        build = (
            BuildSettings(opt_batch=settings.batch, max_batch=settings.batch) if dynamic else None
        )
        path = build_engine(onnx_path, scratch / f"model{index}.engine", build).engine
    return EngineRunner(path, settings.batch)


# runtime -> (source, settings, imgsz, scratch folder, index) -> an inactive Runner
RUNNERS = {"ort": _ort_runner, "torch": _torch_runner, "tensorrt": _tensorrt_runner}


def time_sources(sources: dict, settings: BenchSettings, imgsz: int, profiles: dict | None = None):
    """Make a runner for each source (a model file name or an in-memory model) on
    ``settings.runtime``, activate them all and time them A B A B (or in the turns the runtime
    needs): ({name: Timing}, what the runtime's report states). ONNX Runtime is fed one
    seeded batch; the GPU runtimes rerun the seeded batch they hold on the device. Given a
    ``profiles`` dict (ONNX Runtime only), each source's file is then profiled into it, one
    after another (:func:`kernels.profile.profile_onnx`)."""
    from yoloprune.kernels.runner import time_runners

    images = seeded_images(settings.batch, imgsz) if settings.runtime == "ort" else None
    make = RUNNERS[settings.runtime]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as active:
        runners = {
            name: active.enter_context(make(source, settings, imgsz, Path(tmp), i))
            for i, (name, source) in enumerate(sources.items())
        }
        timings = time_runners(
            runners, images, runs=settings.runs, warmup=settings.warmup, seconds=settings.seconds
        )
        described = next(iter(runners.values())).describe()
        if profiles is not None:
            profiles.update(profile_runners(runners, settings, images))
    return timings, described


def seeded_images(batch: int, imgsz: int) -> np.ndarray:
    """The seeded input ONNX Runtime models are timed and profiled on."""
    return np.random.default_rng(0).random((batch, 3, imgsz, imgsz), dtype=np.float32)


def profile_runners(runners: dict, settings: BenchSettings, images: np.ndarray) -> dict:
    """ONNX Runtime's profile of each runner's file ({name: OrtProfile}), one after another,
    at most ``kernels.profile.PROFILE_MAX_RUNS`` runs after the warm-up, with the timing's
    threads and spinning."""
    from yoloprune.kernels.profile import PROFILE_MAX_RUNS, profile_onnx

    runs = min(settings.runs, PROFILE_MAX_RUNS)
    print(f"profiling {len(runners)} model(s) with ONNX Runtime's profiler, {runs} runs each")
    return {
        name: profile_onnx(
            runner.path,
            images,
            runs=runs,
            warmup=settings.warmup,
            threads=settings.threads,
            spinning=settings.spinning,
        )
        for name, runner in runners.items()
    }


def time_models(models: dict, settings: BenchSettings, imgsz: int) -> dict:
    """Time in-memory PyTorch models A B A B on ``settings.runtime`` (ort or torch):
    {name: Timing}."""
    if settings.runtime not in ("ort", "torch"):
        raise YoloPruneError(f"in-memory models are timed on ort or torch, not {settings.runtime}")
    return time_sources(models, settings, imgsz)[0]


def _precision_of(spec: str, settings: BenchSettings) -> str:
    """What a model ran at: an ONNX file's own precision (ONNX Runtime and TensorRT run fp16
    and Q/DQ files as they are), an engine's from its ``<engine>.json``, else the setting."""
    from yoloprune.kernels.tensorrt import onnx_properties

    if settings.runtime in ("ort", "tensorrt") and spec.endswith(".onnx"):
        return onnx_properties(Path(spec)).get("precision", "fp32")
    if settings.runtime == "tensorrt" and spec.endswith((".engine", ".plan")):
        described = Path(spec).with_suffix(".json")
        try:
            return str(json.loads(described.read_text())["precision"])
        except (OSError, ValueError, KeyError, TypeError):
            return f"not recorded (no valid {described.name})"
    return settings.resolved_precision()


def _check_onnx_input(spec: str, batch: int, imgsz: int) -> None:
    """An ONNX file takes the batch and image size it is fed (fixed axes must match), or the
    one line saying which and how to get a file that does."""
    from yoloprune.kernels.tensorrt import onnx_input_dims

    fixed = onnx_input_dims(Path(spec))
    if fixed[0] is not None and fixed[0] != batch:
        raise YoloPruneError(
            f"{spec}: takes batch {fixed[0]} (exported without --dynamic); bench at --batch "
            f"{fixed[0]}, or export it with --dynamic"
        )
    size = [f for f in fixed[2:4] if f is not None]
    if size and size != [imgsz] * len(size):
        raise YoloPruneError(
            f"{spec}: takes {fixed[2]}x{fixed[3]} images, not {imgsz}x{imgsz} (the first "
            "model's size or --imgsz); bench files exported at one size"
        )


def bench(models: list[str], settings: BenchSettings) -> dict:
    """Time every model A B A B ...; ratios are against the first."""
    from yoloprune.kernels.ort import machine_info

    if not models:
        raise YoloPruneError("bench needs at least one MODEL")
    for spec in models:
        if spec.endswith((".onnx", ".engine", ".plan")) and not Path(spec).is_file():
            raise YoloPruneError(f"{spec}: file not found; check the path")
    imgsz = _model_imgsz(models[0], settings)
    for spec in models:
        if spec.endswith(".onnx") and settings.runtime in ("ort", "tensorrt"):
            _check_onnx_input(spec, settings.batch, imgsz)
    sources = {f"{i}:{spec}": spec for i, spec in enumerate(models)}
    if settings.profile:
        check_profilable(models, settings)
    profiles = {} if settings.profile else None
    timings, extra = time_sources(sources, settings, imgsz, profiles)
    first = next(iter(timings.values())).median_ms
    rows = [
        {
            "model": key.split(":", 1)[1],
            "precision": _precision_of(key.split(":", 1)[1], settings),
            **timing.to_dict(),
            "ratio": timing.median_ms / first,
            "images_per_s": settings.batch * 1e3 / timing.median_ms,
        }
        for key, timing in timings.items()
    ]
    if profiles:
        add_profiles(rows, [profiles[key] for key in timings])
    machine = machine_info()
    if settings.resolved_device().startswith("cuda"):
        from yoloprune.kernels.torch_runtime import gpu_info

        machine.update(gpu_info())
    precisions = sorted({row["precision"] for row in rows})
    return {
        "runtime": settings.runtime,
        "device": settings.resolved_device(),
        "precision": precisions[0] if len(precisions) == 1 else "per row",
        "batch": settings.batch,
        "imgsz": imgsz,
        "runs": settings.runs,
        "warmup": settings.warmup,
        **extra,
        "machine": machine,
        "rows": rows,
    }


def check_profilable(models: list[str], settings: BenchSettings) -> None:
    """``--profile`` splits convolution time: refuse INT8 files up front (ONNX Runtime runs
    their convolutions as QLinearConv, which the split does not count)."""
    for spec in models:
        if _precision_of(spec, settings) == "int8":
            raise YoloPruneError(
                f"{spec}: an INT8 file; --profile splits fp32 and fp16 convolution time: "
                "profile its fp32 file, or bench it without --profile"
            )


def add_profiles(rows: list[dict], profiles: list) -> None:
    """Each row's profile, and for every row after the first its kernel-time ratio to the
    first's split (:func:`kernels.profile.split_against`)."""
    from yoloprune.kernels.profile import split_against

    if profiles[0].conv_ms <= 0:
        raise YoloPruneError(
            f"{rows[0]['model']}: no convolution time in its profile, nothing to split the "
            "others against; put a model with convolutions first"
        )
    for index, (row, profile) in enumerate(zip(rows, profiles, strict=True)):
        row["profile"] = profile.to_dict()
        if index:
            row["split"] = split_against(profile, profiles[0])


def render(result: dict) -> str:
    from yoloprune.kernels.ort import machine_text

    threads = f", {result['threads']} threads" if "threads" in result else ""
    order = result.get("order", "interleaved runs")
    mixed = result["precision"] == "per row"  # then each row says its own
    lines = [
        f"{result['runtime']} on {result['device']} ({result['precision']}, batch "
        f"{result['batch']}, {result['imgsz']} px{threads}; median of {result['runs']} runs, "
        f"{order}, {result['warmup']} warm-up)",
        f"machine: {machine_text(result['machine'])}"
        + (f"; GPU {result['machine']['gpu']}" if result["machine"].get("gpu") else ""),
        f"{'model':<48} {'median ms':>10} {'p90 ms':>8} {'min ms':>8} {'ratio':>6} {'img/s':>8}"
        + ("  precision" if mixed else ""),
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['model'][-48:]:<48} {r['median_ms']:>10.2f} {r['p90_ms']:>8.2f} "
            f"{r['min_ms']:>8.2f} {r['ratio']:>6.3f} {r['images_per_s']:>8.1f}"
            + (f"  {r['precision']}" if mixed else "")
        )
    if "profile" in result["rows"][0]:
        lines += render_profiles(result["rows"])
    return "\n".join(lines)


def render_profiles(rows: list[dict]) -> list[str]:
    """Where each model's time goes, and how its ratio to the first model splits."""
    from yoloprune.kernels.profile import CONV_OPS, PROFILER_SLACK, profiled_slow

    runs = rows[0]["profile"]["runs"]
    lines = [
        f"where the time goes (ONNX Runtime's profiler, {runs} runs each; kernel ms per run):",
        f"{'model':<40} {'timed':>7} {'profiled':>8} {'kernel':>7} {'conv':>7} {'GMAC/s':>7} "
        f"{'other':>7}  largest others",
    ]
    for r in rows:
        p = r["profile"]
        others = [(op, ms) for op, ms in p["op_ms"].items() if op not in CONV_OPS][:3]
        largest = ", ".join(f"{op} {ms:.2f}" for op, ms in others)
        lines.append(
            f"{r['model'][-40:]:<40} {r['median_ms']:>7.2f} {p['run_ms']:>8.2f} "
            f"{p['kernel_ms']:>7.2f} {p['conv_ms']:>7.2f} {p['conv_gmacs_per_s']:>7.1f} "
            f"{p['other_ms']:>7.2f}  {largest}"
        )
    slow = [r for r in rows if profiled_slow(r["profile"]["run_ms"], r["median_ms"])]
    if slow:
        lines.append(
            f"note: {len(slow)} of {len(rows)} models' profiled runs took more than "
            f"{PROFILER_SLACK:g}x their timed median: the profiler's own cost per operator "
            "(large for small models, where it inflates fixed per-operator costs below) or "
            "noise between the two passes"
        )
    if len(rows) > 1:
        lines += [
            "kernel-time ratio to the first = its MACs at the first's convolution throughput + "
            "convolution efficiency lost + other operators; floor: its MACs at the first's "
            "fastest convolution's throughput + its other operators",
            f"{'model':<40} {'ratio':>7} {'MACs':>7} {'eff.':>7} {'rest':>7} {'floor':>7}",
        ]
        for r in rows[1:]:
            s = r["split"]
            lines.append(
                f"{r['model'][-40:]:<40} {s['ratio']:>7.3f} {s['macs_share']:>7.3f} "
                f"{s['conv_efficiency_lost']:>+7.3f} {s['rest']:>7.3f} {s['floor']:>7.3f}"
            )
    return lines
