"""The baseline we beat: L1 unstructured pruning of every conv, as yolov5's torch_utils.prune does.

Zeroes the smallest-magnitude fraction of each Conv2d's weights (per layer, with
torch.nn.utils.prune) and makes the zeros permanent. The model keeps every channel, so dense
runtimes do the same work: the report shows sparsity, unchanged MACs and unchanged latency.
"""

from __future__ import annotations

import copy

from torch import nn

from yoloprune.graphs.errors import PlanError


def sparsify(model: nn.Module, amount: float) -> nn.Module:
    """A copy with ``amount`` of each conv's weights set to zero (L1, per layer)."""
    from torch.nn.utils import prune

    if not 0.0 < amount < 1.0:
        raise PlanError(
            f"--ratio {amount:g}: the unstructured sparsity must lie strictly "
            "between 0 and 1 (e.g. 0.3)"
        )
    sparse = copy.deepcopy(model)
    for module in sparse.modules():
        if isinstance(module, nn.Conv2d):
            prune.l1_unstructured(module, name="weight", amount=amount)
            prune.remove(module, "weight")
    return sparse


def sparsity(model: nn.Module) -> float:
    """Fraction of conv weights that are exactly zero."""
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / max(total, 1)
