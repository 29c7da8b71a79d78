"""Allocation by measured sensitivity (``--allocation sensitivity``): how many channels each
group keeps, decided by what removing them does to the detection head's outputs on unlabeled
images. No labels are read.

**Measure.** For every prunable group and each kept fraction in :data:`LEVELS`, the group's
lowest-scored channels are removed from the *original* model alone (the weights reading them
are zeroed and their mean contribution is added back to those convs' outputs, as
reconstruction's bias fit would) and the head convs' relative output error is measured
(squared error over squared output, averaged over the head convs). The forward starts at the
first top-level layer the group reaches; earlier layers' outputs are cached per chunk.

**Allocate.** Starting from every group whole, ``round_to`` channels at a time are removed
from the group whose next step adds the least error per MAC saved (per channel for
``--ratio``), errors interpolated linearly between the measured fractions and assumed additive
across groups, until the target is met. No group loses more than ``max_ratio`` of its channels
(this allocation's default is 0.6 down to MACs 0.5 and grows below, at most 0.9:
compiler.options.sensitivity_max_ratio):
single-group errors miss how removals compound along a path, and without that floor the
allocation emptied some groups (a prototype on YOLOv8n at MACs 0.5: 0.021 to 0.055 mAP below
uniform without it; level with it). Measured one-shot: benchmarks/results/oneshot.md.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from yoloprune.compiler.planner import (
    Constraints,
    MacCounter,
    Target,
    _floor,
    refuse_missed_macs,
    tie_members,
)
from yoloprune.graphs.dependency import ChannelGroup, head_convs
from yoloprune.graphs.errors import PlanError

LEVELS = (0.75, 0.5, 0.25)  # kept fractions each group is measured at
CHUNK = 8  # images per forward

Curve = dict[int, float]  # kept channels -> head output error (the group alone pruned)


@dataclass(frozen=True)
class _Removal:
    """One conv reading a group: which of its input channels carry which of the group's."""

    conv: nn.Conv2d
    inputs: torch.Tensor  # the conv's input channel indices
    roots: torch.Tensor  # the group's channel index each of them carries


class GroupSensitivity:
    """``sensitivity(model, graph, groups, scores) -> {group id: {kept: error}}``, measured
    once on ``files`` letterboxed to ``imgsz`` and cached (planning at several alignments
    reuses it)."""

    def __init__(self, files: Sequence, imgsz: int, progress: bool = True):
        if not files:
            raise PlanError("--allocation sensitivity got no calibration images")
        self.files, self.imgsz, self.progress = list(files), imgsz, progress
        self.seconds = 0.0
        self._curves: dict[str, Curve] | None = None

    def __call__(self, model, graph, groups, scores) -> dict[str, Curve]:
        if self._curves is None:
            start = time.perf_counter()
            self._curves = measure(model, graph, groups, scores, self._batches(), self.progress)
            self.seconds = time.perf_counter() - start
        return self._curves

    def _batches(self) -> list[torch.Tensor]:
        from yoloprune.compiler.quantize import CalibrationRecord, calibration_batches

        read = CalibrationRecord()
        batches = list(calibration_batches(self.files, self.imgsz, read, batch=CHUNK))
        if not read.used:
            raise PlanError("--allocation sensitivity: no calibration image could be read")
        return batches

    def record(self, curves: dict[str, Curve]) -> dict:
        """The plan's record: what was measured and each group's curve (kept -> error)."""
        return {
            "images": len(self.files),
            "levels": list(LEVELS),
            "seconds": round(self.seconds, 1),
            "errors": {
                g: {str(k): float(f"{e:.4g}") for k, e in c.items()} for g, c in curves.items()
            },
        }


def removals(model: nn.Module, graph, group: ChannelGroup) -> list[_Removal]:
    """The ungrouped convs that read ``group``'s channels (depthwise members go with the group:
    their readers are listed instead)."""
    root = model.get_submodule(group.id)
    tp_group = graph.get_pruning_group(root, tp.prune_conv_out_channels, list(range(group.size)))
    found = []
    for i, (dep, idxs) in enumerate(tp_group):
        module = dep.target.module
        if dep.handler.__name__ != "prune_in_channels":
            continue
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            roots = torch.as_tensor(tp_group[i].root_idxs)
            found.append(_Removal(module, torch.as_tensor(list(idxs)), roots))
    if not found:
        raise PlanError(f"--allocation sensitivity: no conv reads group {group.id}")
    return found


class _Runner:
    """Top-level layers of a YOLO model (``model.model`` with ``f`` per layer, as both families
    build it), run from any layer on cached outputs of the ones before."""

    def __init__(self, model: nn.Module):
        self.layers = list(model.model)
        self.index = {id(m): i for i, layer in enumerate(self.layers) for m in layer.modules()}

    def layer_of(self, module: nn.Module) -> int:
        return self.index[id(module)]

    def run(self, images: torch.Tensor, start: int = 0, cached: list | None = None) -> list:
        outputs = list(cached[:start]) if cached else []
        x = outputs[-1] if start else images
        for layer in self.layers[start:]:
            if layer.f != -1:
                x = (
                    outputs[layer.f]
                    if isinstance(layer.f, int)
                    else [x if j == -1 else outputs[j] for j in layer.f]
                )
            x = layer(x)
            outputs.append(x)
        return outputs


class _HeadError:
    """Squared error and squared size of every head conv's output, summed over images."""

    def __init__(self, count: int):
        self.error = torch.zeros(count, dtype=torch.float64)
        self.size = torch.zeros(count, dtype=torch.float64)

    def add(self, got: list[torch.Tensor], wanted: list[torch.Tensor]) -> None:
        for k, (a, b) in enumerate(zip(got, wanted, strict=True)):
            self.error[k] += float(((a - b) ** 2).sum())
            self.size[k] += float((b**2).sum())

    def value(self) -> float:
        return float((self.error / self.size.clamp_min(1e-30)).mean())


def input_means(model: nn.Module, batches: list[torch.Tensor]) -> dict[nn.Conv2d, torch.Tensor]:
    """Every ungrouped conv's mean input per channel over ``batches``."""
    sums: dict[nn.Conv2d, torch.Tensor] = {}
    counts: dict[nn.Conv2d, int] = {}

    def collect(conv, args):
        x = args[0]
        sums[conv] = sums.get(conv, 0) + x.double().mean((2, 3)).sum(0)
        counts[conv] = counts.get(conv, 0) + len(x)

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    handles = [conv.register_forward_pre_hook(collect) for conv in convs]
    try:
        for batch in batches:
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return {conv: (sums[conv] / counts[conv]).float() for conv in sums}


@torch.no_grad()
def measure(model, graph, groups, scores, batches, progress: bool = True) -> dict[str, Curve]:
    """Each prunable group's curve: the head output error with its lowest-scored channels
    removed, at every fraction of :data:`LEVELS` (the model is restored after each)."""
    from tqdm import tqdm

    model.eval()
    prunable = [g for g in groups if not g.protected]
    means = input_means(model, batches)
    runner = _Runner(model)
    heads = head_convs(model)
    readers = {g.id: removals(model, graph, g) for g in prunable}
    plans = {g.id: _levels(g, scores[g.id], readers[g.id]) for g in prunable}
    # the first top-level layer each group reaches: the forward starts there
    starts = {g.id: min(runner.layer_of(r.conv) for r in readers[g.id]) for g in prunable}
    errors = {(g.id, kept): _HeadError(len(heads)) for g in prunable for kept in plans[g.id]}
    caught: list[torch.Tensor] = []
    hooks = [conv.register_forward_hook(lambda _, __, out: caught.append(out)) for conv in heads]
    bar = tqdm(
        total=len(batches) * len(prunable),
        desc="sensitivity",
        unit="group",
        disable=not progress,
        leave=False,
    )
    try:
        for batch in batches:
            caught.clear()
            cached = runner.run(batch)
            wanted = list(caught)
            for g in prunable:
                for kept, dropped in plans[g.id].items():
                    caught.clear()
                    with removed_channels(dropped, means):
                        runner.run(batch, starts[g.id], cached)
                    errors[g.id, kept].add(caught, wanted)
                bar.update()
    finally:
        bar.close()
        for handle in hooks:
            handle.remove()
    return {g.id: {kept: errors[g.id, kept].value() for kept in plans[g.id]} for g in prunable}


def _levels(group: ChannelGroup, scores: torch.Tensor, readers: list[_Removal]) -> dict:
    """kept -> the readers' (conv, input channels to zero) with that many channels kept."""
    order = torch.argsort(scores, descending=True, stable=True)
    plans = {}
    for fraction in LEVELS:
        kept = max(1, round(group.size * fraction))
        if kept >= group.size or kept in plans:
            continue
        gone = torch.zeros(group.size, dtype=torch.bool)
        gone[order[kept:]] = True
        plans[kept] = [(r.conv, r.inputs[gone[r.roots]]) for r in readers]
    return plans


@contextlib.contextmanager
def removed_channels(dropped, means):
    """Within the block, each ``(conv, input channels)`` of ``dropped`` has those input
    channels' weights zeroed and their mean contribution (``means[conv]``, per input channel)
    added to the conv's output; restored after."""
    saved = []
    try:
        for conv, channels in dropped:
            weights = conv.weight.data[:, channels].clone()
            shift = weights.sum((2, 3)) @ means[conv][channels]
            handle = conv.register_forward_hook(lambda _, __, out, s=shift: out + s[:, None, None])
            saved.append((conv, channels, weights, handle))
            conv.weight.data[:, channels] = 0
        yield
    finally:
        for conv, channels, weights, handle in reversed(saved):
            conv.weight.data[:, channels] = weights
            handle.remove()


def curve_error(curve: Curve, size: int, kept: int) -> float:
    """The measured error at ``kept`` channels, linear between measured points (and beyond
    the lowest, along its last segment); 0 when whole."""
    points = sorted({size: 0.0, **curve}.items())
    for (k0, e0), (k1, e1) in itertools.pairwise(points):
        if k0 <= kept <= k1:
            return e0 + (e1 - e0) * (kept - k0) / (k1 - k0)
    (k0, e0), (k1, e1) = points[0], points[1]
    return max(0.0, e0 + (e1 - e0) * (kept - k0) / (k1 - k0))


def error_cost(curves: dict[str, Curve], sizes: dict[str, int]):
    """The latency knapsack's step cost (compiler.latency_planner.StepCost) under
    ``--allocation sensitivity``: the head output error a group's curve adds from ``now``
    channels kept to ``after``."""

    def cost(gid: str, now: int, after: int) -> float:
        curve, size = curves[gid], sizes[gid]
        return curve_error(curve, size, after) - curve_error(curve, size, now)

    return cost


def allocate(
    groups: list[ChannelGroup],
    curves: dict[str, Curve],
    counter: MacCounter,
    target: Target,
    c: Constraints,
) -> dict[str, int]:
    """Kept channels per prunable group meeting ``target`` (macs or ratio): greedy, the step
    adding the least error per MAC (or channel) removed first."""
    prunable = [g for g in groups if not g.protected]
    units = [ids for gid, ids in tie_members(prunable).items() if ids[0] == gid]
    sizes = {g.id: g.size for g in prunable}
    lowest = {g.id: _floor(g.size, c, g.id) for g in prunable}
    macs_before = counter.macs()
    total = sum(sizes.values())

    def objective(counts):
        if target.kind == "macs":
            return counter.macs(counts) / macs_before
        return sum(counts.values()) / total

    goal = target.value if target.kind == "macs" else 1 - target.value
    counts = {g.id: g.size for g in prunable}
    previous = counts
    while objective(counts) > goal:
        step = _cheapest_step(counts, units, curves, sizes, lowest, objective, c.round_to)
        if step is None:
            break
        previous, counts = counts, step
    if abs(objective(previous) - goal) < abs(objective(counts) - goal):
        counts = previous
    refuse_missed_macs(target, objective(counts), c, "--allocation sensitivity, ")
    return counts


def _cheapest_step(counts, units, curves, sizes, lowest, objective, round_to):
    """The counts after the step adding the least error per objective removed: one unit (a
    group, or a tie's groups together) down to the next multiple of ``round_to``."""
    now = objective(counts)
    best = None
    for unit in units:
        below = {i: (counts[i] - 1) // round_to * round_to for i in unit}
        if any(sizes[i] <= round_to or below[i] < lowest[i] for i in unit):
            continue
        trial = {**counts, **below}
        saved = now - objective(trial)
        if saved <= 0:
            continue
        added = sum(
            curve_error(curves[i], sizes[i], below[i]) - curve_error(curves[i], sizes[i], counts[i])
            for i in unit
        )
        if best is None or added / saved < best[0]:
            best = (added / saved, trial)
    return None if best is None else best[1]
