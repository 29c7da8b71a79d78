"""Score pass: importance of every channel of every prunable group."""

from __future__ import annotations

import hashlib

import torch
import torch_pruning as tp
from torch import nn

from yoloprune.compiler.train.recalibrate import batchnorms
from yoloprune.graphs.dependency import ChannelGroup, CoupledGraph
from yoloprune.graphs.errors import PlanError

IMPORTANCES = ("l1", "l2", "bn", "taylor", "random")
TAYLOR_BATCHES = 8  # training batches of 16 images whose loss gradients Taylor scores read


def _importance(name: str):
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "bn":
        return tp.importance.BNScaleImportance()
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise PlanError(f"unknown importance {name!r}: use one of {', '.join(IMPORTANCES)}")


def _seeded_random(group_id: str, size: int, seed: int) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{group_id}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.rand(size, generator=generator)


def loss_gradients(
    model: nn.Module, data_yaml, imgsz: int, batches: int = TAYLOR_BATCHES, batch: int = 16
) -> int:
    """Accumulate the detection loss's gradients over ``batches`` training batches (no
    augmentation, fixed order) into every weight's ``.grad``, for first-order Taylor scores
    (|weight x gradient|). BatchNorm runs on its running statistics, which stay untouched;
    weights do not change. Returns the number of images seen."""
    from yoloprune.compiler.train.data import YoloDataset, loader, read_data_yaml
    from yoloprune.compiler.train.objective import objective_for

    data = read_data_yaml(data_yaml)
    if not data.train:
        raise PlanError(f"{data_yaml}: --importance taylor needs a 'train' split")
    dataset = YoloDataset(data.train, data.nc, imgsz)
    objective = objective_for(model, imgsz, epochs=1)
    model.zero_grad(set_to_none=True)
    model.train()
    for module in batchnorms(model):
        module.eval()
    seen = 0
    try:
        for i, (images, targets, _) in enumerate(loader(dataset, batch, shuffle=True)):
            if i == batches:
                break
            loss, _ = objective(model(images), targets)
            loss.backward()
            seen += len(images)
    finally:
        model.eval()
    return seen


def score_groups(
    model: nn.Module,
    graph: CoupledGraph,
    groups: list[ChannelGroup],
    importance: str = "l2",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Per-channel importance of each unprotected group, normalised within the group (mean 1).
    ``taylor`` reads the gradients :func:`loss_gradients` left in the weights."""
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
