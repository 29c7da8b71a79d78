"""Apply pass: physically remove the channels a plan drops; the result is a plain dense model."""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from yoloprune.graphs.blocks import drop_blocks, hidden_group
from yoloprune.graphs.dependency import build_graph, head_convs
from yoloprune.graphs.errors import PlanError
from yoloprune.graphs.plan import PruningPlan


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Return a pruned copy of ``model``; the input model is left untouched."""
    pruned = copy.deepcopy(model).eval()
    head_before = [conv.out_channels for conv in head_convs(pruned)]
    _drop(pruned, plan)
    graph = build_graph(pruned)
    modules = dict(pruned.named_modules())
    for group in plan.groups:
        if group.kept == 0:  # a dropped block's hidden group: gone with its block
            continue
        root = modules.get(group.id)
        if not isinstance(root, nn.Conv2d) or root.out_channels != group.size:
            found = getattr(root, "out_channels", "no such conv")
            raise PlanError(
                f"plan does not match the model: group {group.id} has {found} channels, the plan "
                f"says {group.size}; make the plan for this model (same MODEL, unpruned)"
            )
        if any(i < 0 or i >= group.size for i in group.keep) or len(set(group.keep)) != group.kept:
            raise PlanError(
                f"plan group {group.id}: kept indices must be distinct, in [0, {group.size})"
            )
        if not group.pruned:
            continue
        drop = sorted(set(range(group.size)) - set(group.keep))
        graph.get_pruning_group(root, tp.prune_conv_out_channels, drop).prune()
    _check_invariants(pruned, plan, head_before)
    return pruned


def _drop(model: nn.Module, plan: PruningPlan) -> None:
    """Remove the plan's dropped blocks (before tracing the rest); each must be the block whose
    hidden group the plan empties, and every emptied group must belong to a dropped block."""
    emptied = {g.id for g in plan.groups if g.kept == 0}
    expected = {hidden_group(block) for block in plan.drop_blocks}
    if emptied != expected:
        raise PlanError(
            "plan does not match the model: groups kept at 0 channels "
            f"({sorted(emptied)}) must be exactly the hidden groups of drop_blocks "
            f"({sorted(plan.drop_blocks)}); regenerate the plan with `plan`"
        )
    try:
        drop_blocks(model, plan.drop_blocks)
    except (AttributeError, ValueError) as exc:
        raise PlanError(f"plan does not match the model: {exc}") from exc


def _check_invariants(model: nn.Module, plan: PruningPlan, head_before: list[int]) -> None:
    for group in plan.groups:
        if group.kept == 0:
            continue
        kept = model.get_submodule(group.id).out_channels
        if kept != group.kept:
            raise PlanError(
                f"internal error: {group.id} kept {kept} channels, plan says {group.kept}"
            )
    if [conv.out_channels for conv in head_convs(model)] != head_before:
        raise PlanError("internal error: the detection head's outputs changed")
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d) and module.weight.shape[0] != module.num_features:
            raise PlanError(f"internal error: {name} num_features disagrees with its weights")
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
