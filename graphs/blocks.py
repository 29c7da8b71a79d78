"""Residual blocks that can be removed whole (depth pruning), keeping their shortcut.

A residual bottleneck computes ``x + cv2(cv1(x))``; removing it leaves ``x``. Its hidden channels
(cv1's outputs, cv2's inputs) form a group of their own, and dropping the block is what pruning
that group to zero channels would be, minus the constant the emptied cv2 would still add. So a
plan drops a block by keeping 0 channels of its hidden group, and lists the block in
``PruningPlan.drop_blocks``. Shapes are unchanged everywhere else: a C2f/C3k2 concat that took
the block's output takes its input instead; a C3 sequence just gets shorter.

Small layers pay fixed costs (a kernel launch, a reorder, the add and activations) that width
pruning cannot remove; a dropped block pays none of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # graphs.dependency imports torch-pruning; checkpoints load without it
    from yoloprune.graphs.dependency import ChannelGroup

DROPPED_ATTR = "yoloprune_dropped_blocks"  # on a model: the blocks already replaced by Identity


def is_residual_block(module: nn.Module) -> bool:
    """A bottleneck adding its input to cv2(cv1(x)) (yolov5's and ultralytics' Bottleneck)."""
    return (
        getattr(module, "add", False) is True
        and isinstance(getattr(module, "cv1", None), nn.Module)
        and isinstance(getattr(module, "cv2", None), nn.Module)
        and isinstance(getattr(module.cv1, "conv", None), nn.Conv2d)
        and isinstance(getattr(module.cv2, "conv", None), nn.Conv2d)
    )


def hidden_group(block: str) -> str:
    """The id of a residual block's hidden group (rooted at its cv1's conv)."""
    return f"{block}.cv1.conv"


def droppable_blocks(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, str]:
    """{hidden group id: block name} for every residual block whose hidden channels form an
    unprotected group touching only the block's own layers."""
    by_id = {g.id: g for g in groups}
    found = {}
    for name, module in model.named_modules():
        if not name or not is_residual_block(module):
            continue
        group = by_id.get(hidden_group(name))
        if group is None or group.protected:
            continue
        if all(m.layer.startswith(f"{name}.") for m in group.members):
            found[group.id] = name
    return found


def drop_blocks(model: nn.Module, names: tuple[str, ...] | list[str]) -> nn.Module:
    """Replace each named residual block by its shortcut (``nn.Identity``), in place; the model
    remembers what it dropped (saved with it, so a checkpoint reloads). Returns ``model``."""
    for name in names:
        if not is_residual_block(model.get_submodule(name)):
            raise ValueError(f"{name}: not a residual block of this model; cannot drop it")
        model.set_submodule(name, nn.Identity())
    dropped = (*dropped_blocks(model), *names)
    setattr(model, DROPPED_ATTR, tuple(sorted(set(dropped))))
    return model


def dropped_blocks(model: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(model, DROPPED_ATTR, ()))
