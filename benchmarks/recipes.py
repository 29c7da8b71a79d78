"""Shared by the benchmarks: MAC counting and torch-pruning's default recipe as the reference."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from yoloprune.compiler.export import export_mode
from yoloprune.compiler.pipeline import deployed_skip
from yoloprune.compiler.planner import conv_macs as all_conv_macs
from yoloprune.graphs.dependency import protected_convs


def conv_macs(model: nn.Module, imgsz: int) -> int:
    """Conv MACs as the compile counts them: the convs of the model's default export (YOLO26's
    training-only head branch left out)."""
    return all_conv_macs(model, imgsz, deployed_skip(model, export_mode(model)))


def torch_pruning_default(model: nn.Module, macs_target: float, imgsz: int):
    """torch-pruning's default recipe (MetaPruner, GroupMagnitudeImportance(p=2), one uniform
    ratio, head convs ignored), its ratio bisected so MACs kept ~ macs_target.
    Returns (pruned model, ratio, MACs kept)."""
    import torch_pruning as tp

    macs_before = conv_macs(model, imgsz)

    def prune(ratio: float) -> nn.Module:
        candidate = copy.deepcopy(model).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(
                candidate,
                torch.zeros(1, 3, 64, 64),
                importance=tp.importance.GroupMagnitudeImportance(p=2),
                pruning_ratio=ratio,
                ignored_layers=list(protected_convs(candidate)),
            )
            pruner.step()
        return candidate

    lo, hi, best = 0.0, 0.9, None
    for _ in range(8):
        ratio = (lo + hi) / 2
        candidate = prune(ratio)
        kept = conv_macs(candidate, imgsz) / macs_before
        if best is None or abs(kept - macs_target) < abs(best[2] - macs_target):
            best = (candidate, ratio, kept)
        lo, hi = (ratio, hi) if kept > macs_target else (lo, ratio)
    return best
