"""PyTorch runtime: how GPU latency is measured where TensorRT is absent (and CPU for tests).

On CUDA: fp16 (default), channels_last memory format, ``cudnn.benchmark`` (cuDNN picks the
fastest algorithm per conv shape during warm-up), timing by CUDA events after warm-up, and
optionally the whole forward captured once as a CUDA graph and replayed (no launch overhead).
On CPU: fp32, the same interface, so the code path is testable on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from yoloprune.graphs.errors import RuntimeSetupError
from yoloprune.kernels.runner import Runner, time_runners
from yoloprune.kernels.timing import CudaEventClock, Timing

PRECISIONS = ("fp32", "fp16")


def memory_layout(model: nn.Module) -> torch.memory_format:
    """The layout to run ``model``'s convolutions in: channels-last (measured on the 2-core
    CPU, yolov5n at batch 8 and 256 px: forward 44 -> 27 ms, training step 65 -> 45 ms), except
    for fake-quantized models (ModelOpt's quantizers hold ``_amax`` ranges), whose INT8 rounding
    turns the layout's float rounding into different values (PTQ mAP 0.8585 -> 0.8603 from the
    layout alone): they keep the layout they were calibrated and are exported in."""
    if any(name.endswith("_amax") for name, _ in model.named_buffers()):
        return torch.contiguous_format
    return torch.channels_last


@dataclass(frozen=True)
class TorchSettings:
    device: str = "cuda"
    precision: str = "fp16"
    channels_last: bool = True
    cudnn_benchmark: bool = True
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise RuntimeSetupError(
                f"precision {self.precision!r}: use one of {', '.join(PRECISIONS)}"
            )
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeSetupError(
                "the PyTorch CUDA runtime needs a CUDA GPU and a CUDA build of torch; none is "
                "available here: use --runtime ort (CPU) or --device cpu"
            )
        if not self.device.startswith("cuda") and (self.precision == "fp16" or self.cuda_graph):
            raise RuntimeSetupError("fp16 and CUDA graphs need --device cuda; use fp32 on the CPU")


class TorchRunner(Runner):
    """Runs ``model`` on fixed-shape inputs; :meth:`infer` returns output0 (the decoded
    predictions). :meth:`activate` copies the model to the device in the settings' precision
    and memory format, makes the fixed input buffer (seeded: the same timing input every run)
    and captures the CUDA graph if asked; ``infer(images)`` copies ``images`` into that buffer
    first, ``infer()`` reruns the buffer as it is."""

    name = "torch"

    def __init__(
        self,
        model: nn.Module,
        batch: int,
        imgsz: int,
        settings: TorchSettings,
        channels: int = 3,
    ):
        self.source = model
        self.shape = (batch, channels, imgsz, imgsz)
        self.settings = settings
        self.device = torch.device(settings.device)
        self.dtype = torch.float16 if settings.precision == "fp16" else torch.float32
        self.model = self.images = self._graph = self._static_out = None

    def activate_impl(self) -> None:
        settings = self.settings
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = settings.cudnn_benchmark
        memory = torch.channels_last if settings.channels_last else torch.contiguous_format
        self.model = (
            copy.deepcopy(self.source).eval().to(self.device, self.dtype, memory_format=memory)
        )
        seeded = torch.Generator().manual_seed(0)  # the same timing input every run
        self.images = (
            torch.rand(*self.shape, generator=seeded)
            .to(self.device, self.dtype)
            .contiguous(memory_format=memory)
        )
        if settings.cuda_graph:
            self._capture()

    def deactivate_impl(self) -> None:
        self.model = self.images = self._graph = self._static_out = None

    @torch.no_grad()
    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        return out[0] if isinstance(out, (tuple, list)) else out

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
            for _ in range(3):
                self._forward(self.images)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._static_out = self._forward(self.images)

    def infer_impl(self, images: torch.Tensor | None) -> torch.Tensor:
        if images is not None:
            self.images.copy_(images)
        if self._graph is not None:
            self._graph.replay()
            return self._static_out
        return self._forward(self.images)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def clock(self):
        return CudaEventClock() if self.device.type == "cuda" else None

    def describe(self) -> dict:
        s = self.settings
        return {
            "device": s.device,
            "precision": s.precision,
            "channels_last": s.channels_last,
            "cudnn_benchmark": s.cudnn_benchmark,
            "cuda_graph": s.cuda_graph,
        }

    def time(self, runs: int = 50, warmup: int = 10) -> Timing:
        """Time this runner alone on its fixed input (activating it for the time if inactive)."""
        with contextlib.ExitStack() as stack:
            if not self.is_active:
                stack.enter_context(self)
            return time_runners({"_": self}, None, runs=runs, warmup=warmup)["_"]


def gpu_info() -> dict:
    """GPU name, driver-visible CUDA version and cuDNN version, for every GPU number."""
    if not torch.cuda.is_available():
        return {"gpu": None}
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "torch": torch.__version__,
    }
