"""Shared test helpers: tiny models, BN randomisation, and zeroing the channels a plan removes."""

from __future__ import annotations

import copy
import functools
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
import yaml
from torch import nn

from yoloprune.graphs.checkpoint import CFG_DIR
from yoloprune.graphs.dependency import build_graph
from yoloprune.graphs.plan import PruningPlan
from yoloprune.graphs.ultralytics_family import UltralyticsMissing, require_ultralytics
from yoloprune.graphs.yolov5 import DetectionModel
from yoloprune.kernels.profile import ConvTime, OrtProfile

IMGSZ = 64

# v5.0-era blocks: Focus stem, BottleneckCSP, SPP, LeakyReLU through the `activation:` key.
V50_TINY = {
    "nc": 3,
    "depth_multiple": 0.33,
    "width_multiple": 0.125,
    "activation": "nn.LeakyReLU(0.1)",
    "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
    "backbone": [
        [-1, 1, "Focus", [64, 3]],
        [-1, 1, "Conv", [128, 3, 2]],
        [-1, 3, "BottleneckCSP", [128]],
        [-1, 1, "Conv", [256, 3, 2]],
        [-1, 9, "BottleneckCSP", [256]],
        [-1, 1, "Conv", [512, 3, 2]],
        [-1, 9, "BottleneckCSP", [512]],
        [-1, 1, "Conv", [1024, 3, 2]],
        [-1, 1, "SPP", [1024, [5, 9, 13]]],
        [-1, 3, "BottleneckCSP", [1024, False]],
    ],
    "head": [
        [-1, 1, "Conv", [512, 1, 1]],
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 6], 1, "Concat", [1]],
        [-1, 3, "BottleneckCSP", [512, False]],
        [-1, 1, "Conv", [256, 1, 1]],
        [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
        [[-1, 4], 1, "Concat", [1]],
        [-1, 3, "BottleneckCSP", [256, False]],
        [-1, 1, "Conv", [256, 3, 2]],
        [[-1, 14], 1, "Concat", [1]],
        [-1, 3, "BottleneckCSP", [512, False]],
        [-1, 1, "Conv", [512, 3, 2]],
        [[-1, 10], 1, "Concat", [1]],
        [-1, 3, "BottleneckCSP", [1024, False]],
        [[17, 20, 23], 1, "Detect", ["nc", "anchors"]],
    ],
}


def shipped_cfg(name: str) -> dict:
    return yaml.safe_load((CFG_DIR / name).read_text())


def tiny_cfg() -> dict:
    """yolov5s's v6/v7 architecture at width 0.25 (8..128 channels... x2) and 3 classes."""
    cfg = shipped_cfg("yolov5s.yaml")
    cfg.update(nc=3, width_multiple=0.25)
    return cfg


def randomized(model: DetectionModel, seed: int = 0, batches: int = 3) -> DetectionModel:
    """Random BN affine parameters, then BN statistics calibrated on noise, so that outputs
    vary with the input (random init alone gives near-constant outputs)."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.rand(n, generator=generator) + 0.5
            module.bias.data = torch.randn(n, generator=generator) * 0.3
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand(4, 3, IMGSZ, IMGSZ, generator=generator))
    return model.eval()


def zero_removed_channels(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """A copy whose producers of every channel the plan removes output exactly zero:
    conv rows and BN weight, bias and running mean are zeroed (producer side only)."""
    model = copy.deepcopy(model).eval()
    graph = build_graph(model)
    for group in plan.groups:
        if not group.pruned:
            continue
        drop = sorted(set(range(group.size)) - set(group.keep))
        root = model.get_submodule(group.id)
        for dep, idxs in graph.get_pruning_group(root, tp.prune_conv_out_channels, drop):
            layer = dep.target.module
            if not graph.is_out_channel_pruning_fn(dep.handler):
                continue
            with torch.no_grad():
                if isinstance(layer, nn.Conv2d):
                    layer.weight[idxs] = 0
                    if layer.bias is not None:
                        layer.bias[idxs] = 0
                elif isinstance(layer, nn.BatchNorm2d):
                    layer.weight[idxs] = 0
                    layer.bias[idxs] = 0
                    layer.running_mean[idxs] = 0
    return model


def outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Raw head outputs (logits), flattened: the quantity exactness is asserted on in fp32."""
    return head_outputs(model, images)[1]


def head_outputs(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoded, raw): decoded boxes are in pixels (wh up to ~4x the anchor), so fp32 agreement
    there is relative; the raw logits are O(1-10) and are compared absolutely."""
    with torch.no_grad():
        decoded, raw = model.eval()(images)
    return decoded, torch.cat([r.flatten() for r in raw])


def images(batch: int = 2, imgsz: int = IMGSZ, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(seed))


def _ultralytics_missing() -> str | None:
    try:
        require_ultralytics()
    except UltralyticsMissing as exc:
        return str(exc)
    return None


ULTRALYTICS_MISSING = _ultralytics_missing()
# Tests that need the optional ultralytics extra skip, with the reason, where it is absent.
needs_ultralytics = pytest.mark.skipif(
    ULTRALYTICS_MISSING is not None, reason=f"ultralytics extra: {ULTRALYTICS_MISSING}"
)


@functools.cache
def torchvision_imports() -> bool:
    """Whether ``import torchvision`` works in a fresh interpreter. Where it does (a CUDA
    machine), ultralytics uses it; where it does not (the development machines and CI: the only
    wheel is a CUDA build beside the CPU torch), nothing of ours may import it."""
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True)
    return probe.returncode == 0


def assert_no_broken_torchvision() -> None:
    assert torchvision_imports() or "torchvision" not in sys.modules


def ort_profile(convs: list[tuple[float, int]], other_ms: float) -> OrtProfile:
    """A stand-in ONNX Runtime profile: convolutions as (ms, MACs), one other operator."""
    conv_ms = sum(ms for ms, _ in convs)
    return OrtProfile(
        runs=1,
        run_ms=conv_ms + other_ms + 1.0,
        op_ms={"Conv": conv_ms, "QuickGelu": other_ms},
        convs=[ConvTime(f"c{i}", ms, macs) for i, (ms, macs) in enumerate(convs)],
    )


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_module(name: str):
    """``benchmarks/<name>.py`` loaded as a module (scripts, not a package; those that import
    each other find one another on the path while loading)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module
