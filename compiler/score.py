"""Score pass: importance of every channel of every prunable group."""

from __future__ import annotations

import hashlib

import torch
import torch_pruning as tp
from torch import nn

from graphs.dependency import ChannelGroup, CoupledGraph
from graphs.errors import PlanError

IMPORTANCES = ("l1", "l2", "bn", "random")


def _importance(name: str):
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "bn":
        return tp.importance.BNScaleImportance()
    raise PlanError(f"unknown importance {name!r}: use one of {', '.join(IMPORTANCES)}")


def _seeded_random(group_id: str, size: int, seed: int) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{group_id}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.rand(size, generator=generator)


def score_groups(
    model: nn.Module,
    graph: CoupledGraph,
    groups: list[ChannelGroup],
    importance: str = "l2",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Per-channel importance of each unprotected group, normalised within the group (mean 1)."""
    scorer = None if importance == "random" else _importance(importance)
    scores = {}
    for group in groups:
        if group.protected:
            continue
        if scorer is None:
            scores[group.id] = _seeded_random(group.id, group.size, seed)
            continue
        root = model.get_submodule(group.id)
        tp_group = graph.get_pruning_group(
            root, tp.prune_conv_out_channels, list(range(group.size))
        )
        with torch.no_grad():
            value = scorer(tp_group)
        if value is None or value.numel() != group.size:
            raise PlanError(f"importance {importance!r} is undefined for group {group.id}")
        scores[group.id] = value.detach().float().cpu()
    return scores
