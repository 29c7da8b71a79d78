"""Plan pass: how many channels each group keeps, and which, under a target and constraints."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import nn

from yoloprune.graphs.dependency import ChannelGroup, ConvChannels
from yoloprune.graphs.errors import PlanError, TargetUnreachable
from yoloprune.graphs.plan import GroupPlan, PruningPlan

MACS_TOLERANCE = 0.03  # relative: a MACs target is met when |kept/target - 1| <= 3%


@dataclass(frozen=True)
class Target:
    """``ratio``: fraction of channels removed per group; ``macs``: fraction of MACs kept;
    ``speedup``: measured baseline latency / pruned latency; ``latency_ms``: a budget."""

    @property
    def latency(self) -> bool:
        return self.kind in ("speedup", "latency_ms")

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in ("ratio", "macs", "speedup", "latency_ms"):
            raise PlanError(
                f"unknown target {self.kind!r}: use --ratio, --macs, --speedup or --latency-ms"
            )
        if math.isnan(self.value):
            raise PlanError(f"--{self.kind} nan is out of range: give a number")
        if self.kind == "speedup":
            if self.value <= 1.0:
                raise PlanError(
                    f"--speedup {self.value:g} must be greater than 1 (2.0 = twice as fast)"
                )
            return
        if self.kind == "latency_ms":
            if self.value <= 0:
                raise PlanError(f"--latency-ms {self.value:g} must be positive (milliseconds)")
            return
        if not (0.0 < self.value < 1.0):
            what = "channels removed per group" if self.kind == "ratio" else "MACs kept"
            raise PlanError(
                f"--{self.kind} {self.value:g} is out of range: it is the fraction of {what}, "
                "strictly between 0 and 1 (e.g. 0.5)"
            )


@dataclass(frozen=True)
class Constraints:
    round_to: int = 8  # kept channel counts are multiples of this (hardware alignment)
    max_ratio: float = 0.8  # no group loses more than this fraction of its channels
    # latency-aware plans may remove whole residual blocks past that floor (graphs.blocks)
    drop_blocks: bool = False
    # (group id, channels) no plan may keep fewer of: --steps' later steps, whose groups have
    # shrunk, keep the --max-ratio floor of the original sizes
    kept_at_least: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.round_to < 1:
            raise PlanError(f"--round-to {self.round_to} must be a positive integer (8 is typical)")
        if not (0.0 < self.max_ratio < 1.0):
            raise PlanError(f"--max-ratio {self.max_ratio:g} must be strictly between 0 and 1")


def conv_io_sizes(
    model: nn.Module, imgsz: int
) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """(input (H, W), output (H, W)) of every Conv2d at imgsz x imgsz (one forward pass)."""
    sizes, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(
                module.register_forward_hook(
                    lambda _m, inputs, out, name=name: sizes.__setitem__(
                        name, (tuple(inputs[0].shape[-2:]), tuple(out.shape[-2:]))
                    )
                )
            )
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, imgsz, imgsz))
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def spatial_sizes(model: nn.Module, imgsz: int) -> dict[str, int]:
    """Output H*W of every Conv2d at imgsz x imgsz."""
    return {name: out[0] * out[1] for name, (_, out) in conv_io_sizes(model, imgsz).items()}


def conv_macs(model: nn.Module, imgsz: int, skip: Collection[str] = ()) -> int:
    """Conv2d multiply-accumulates of ``model`` for one imgsz x imgsz image, counted on the
    model itself, the convs named in ``skip`` left out (those an export leaves out: the
    report's definition; :class:`MacCounter` predicts the same number)."""
    hw = spatial_sizes(model, imgsz)
    return sum(
        m.out_channels * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] * hw[n]
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and n not in skip
    )


class MacCounter:
    """MACs of Conv2d layers for any assignment of kept channels per group (no pruning needed),
    the convs named in ``skip`` left out."""

    def __init__(self, convs: list[ConvChannels], hw: dict[str, int], skip: Collection[str] = ()):
        self._convs = [(c, hw[c.name]) for c in convs if c.name not in skip]

    def macs(self, kept: dict[str, int] | None = None) -> int:
        kept = kept or {}
        total = 0
        for conv, hw in self._convs:
            out = (
                kept.get(conv.out_group, conv.out_channels) if conv.out_group else conv.out_channels
            )
            inp = sum(kept[g] * copies if g in kept else n for g, n, copies in conv.in_slices)
            total += out * (inp // conv.groups) * conv.kernel_area * hw
        return total


def aligned(count: float, size: int, round_to: int, floor: int) -> int:
    """Nearest multiple of round_to to ``count``, at least ``floor``; ``size`` means unpruned."""
    if size <= round_to:
        return size
    keep = max(round_to, round(count / round_to) * round_to, floor)
    return size if keep >= size else keep


def _floor(size: int, c: Constraints, gid: str | None = None) -> int:
    """The fewest channels a group of ``size`` may keep: --max-ratio of its size, and of its
    original size where ``kept_at_least`` names it (aligned up to round_to, at most its size)."""
    floor = math.ceil(size * (1 - c.max_ratio) / c.round_to) * c.round_to
    least = dict(c.kept_at_least).get(gid, 0)
    return min(size, max(floor, math.ceil(least / c.round_to) * c.round_to))


def tie_members(groups) -> dict[str, list[str]]:
    """For each group id, the ids of its tie (the groups sharing its ``tie`` label: the halves
    of a split block, which keep equal counts), first member first; an untied group is its own
    tie."""
    ties: dict[str, list[str]] = {}
    for g in groups:
        if g.tie:
            ties.setdefault(g.tie, []).append(g.id)
    return {g.id: ties[g.tie] if g.tie else [g.id] for g in groups}


def tied(groups) -> Callable[[dict[str, int]], dict[str, int]]:
    """A function raising every tied group to the largest count of its tie."""
    sets = [ids for gid, ids in tie_members(groups).items() if len(ids) > 1 and ids[0] == gid]

    def apply(counts: dict[str, int]) -> dict[str, int]:
        if not sets:
            return counts
        counts = dict(counts)
        for ids in sets:
            top = max(counts[i] for i in ids)
            for i in ids:
                counts[i] = top
        return counts

    return apply


def _uniform_counts(groups, ratio: float, c: Constraints) -> dict[str, int]:
    ratio = min(ratio, c.max_ratio)
    return {
        g.id: aligned(g.size * (1 - ratio), g.size, c.round_to, _floor(g.size, c, g.id))
        for g in groups
    }


def _closest_rounding(groups, ratio: float, c: Constraints, objective, goal: float):
    """Same fraction kept everywhere; each group rounds down or up to round_to, chosen in order
    of largest remainder so that the objective lands closest to the goal."""
    ratio = min(ratio, c.max_ratio)
    tie = tied(groups)
    exact = {g.id: g.size * (1 - ratio) for g in groups}
    floors = {
        g.id: aligned(
            math.floor(exact[g.id] / c.round_to) * c.round_to,
            g.size,
            c.round_to,
            _floor(g.size, c, g.id),
        )
        for g in groups
    }
    counts = tie(floors)
    best = (dict(counts), objective(counts))
    by_remainder = sorted(groups, key=lambda g: (-(exact[g.id] - floors[g.id]), g.id))
    for g in by_remainder:
        if counts[g.id] >= g.size:
            continue
        counts[g.id] = min(g.size, counts[g.id] + c.round_to)
        counts = tie(counts)
        value = objective(counts)
        if abs(value - goal) < abs(best[1] - goal):
            best = (dict(counts), value)
        if value > goal:
            break
    return best


def _global_counts(groups, scores, threshold: float, c: Constraints) -> dict[str, int]:
    return {
        g.id: aligned(
            int((scores[g.id] > threshold).sum()), g.size, c.round_to, _floor(g.size, c, g.id)
        )
        for g in groups
    }


def _solve(count_fn, lo: float, hi: float, objective, goal: float, steps: int = 60):
    """Bisect a monotone (non-increasing in x) objective for ``goal``; return the closest counts."""
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        counts = count_fn(mid)
        value = objective(counts)
        if best is None or abs(value - goal) < abs(best[1] - goal):
            best = (counts, value)
        if value > goal:
            lo = mid
        else:
            hi = mid
    return best


def make_plan(
    model_name: str,
    imgsz: int,
    groups: list[ChannelGroup],
    scores: dict[str, torch.Tensor],
    counter: MacCounter,
    target: Target,
    constraints: Constraints | None = None,
    allocation: str = "uniform",
    importance: str = "l2",
    seed: int = 0,
) -> PruningPlan:
    """Decide kept channels per group so the target is met; raise PlanError when it cannot be."""
    c = constraints or Constraints()
    if target.latency:
        raise PlanError("latency targets are planned by compiler.latency_planner.plan_latency")
    prunable = [g for g in groups if not g.protected]
    if allocation not in ("uniform", "global"):
        raise PlanError(f"unknown allocation {allocation!r}: use uniform (default) or --global")
    if not prunable:
        raise PlanError("the model has no prunable channel groups (every group is protected)")
    macs_before = counter.macs()
    total_channels = sum(g.size for g in prunable)

    def kept_fraction(counts):
        return sum(counts.values()) / total_channels

    def macs_fraction(counts):
        return counter.macs(counts) / macs_before

    tie = tied(prunable)
    if allocation == "uniform":
        if target.kind == "ratio":
            counts = tie(_uniform_counts(prunable, target.value, c))
        else:
            counts, value = _solve(
                lambda r: tie(_uniform_counts(prunable, r, c)),
                0.0,
                c.max_ratio,
                macs_fraction,
                target.value,
            )
            ratio = 1 - sum(counts.values()) / total_channels
            refined, refined_value = _closest_rounding(
                prunable, ratio, c, macs_fraction, target.value
            )
            if abs(refined_value - target.value) < abs(value - target.value):
                counts = refined
    else:
        all_scores = torch.cat([scores[g.id] for g in prunable])
        lo, hi = float(all_scores.min()) - 1.0, float(all_scores.max())
        count_fn = lambda t: tie(_global_counts(prunable, scores, t, c))  # noqa: E731
        if target.kind == "ratio":
            counts, _ = _solve(count_fn, lo, hi, kept_fraction, 1 - target.value)
        else:
            counts, _ = _solve(count_fn, lo, hi, macs_fraction, target.value)

    refuse_missed_macs(target, counter.macs(counts) / macs_before, c)
    return plan_from_counts(
        model_name,
        imgsz,
        prunable,
        scores,
        counts,
        counter,
        target,
        c,
        allocation=allocation,
        importance=importance,
        seed=seed,
    )


def refuse_missed_macs(target: Target, reached: float, c: Constraints, how: str = "") -> None:
    """A ``--macs`` target is met within :data:`MACS_TOLERANCE` of MACs kept ``reached``, or
    refused naming the limits that bind (``how``: the allocation, where it matters)."""
    if target.kind == "macs" and abs(reached / target.value - 1) > MACS_TOLERANCE:
        raise TargetUnreachable(
            f"--macs {target.value:g} cannot be met within ±{MACS_TOLERANCE:.0%} (best: "
            f"{reached:.3f}) with {how}--round-to {c.round_to} and --max-ratio "
            f"{c.max_ratio:g}; raise --max-ratio, lower --round-to or ask for more MACs"
        )


def plan_from_counts(
    model_name: str,
    imgsz: int,
    prunable: list[ChannelGroup],
    scores: dict[str, torch.Tensor],
    counts: dict[str, int],
    counter: MacCounter,
    target: Target,
    c: Constraints,
    *,
    allocation: str,
    importance: str,
    seed: int = 0,
    latency: dict | None = None,
) -> PruningPlan:
    """The plan keeping, in each group, its ``counts[id]`` highest-scored channels (the
    planners hand in counts whose tied groups are already equal)."""
    plans = []
    for g in prunable:
        order = torch.argsort(scores[g.id], descending=True, stable=True)
        keep = tuple(sorted(int(i) for i in order[: counts[g.id]]))
        plans.append(GroupPlan(g.id, g.size, keep))
    return PruningPlan(
        model=model_name,
        imgsz=imgsz,
        importance=importance,
        allocation=allocation,
        target={"kind": target.kind, "value": target.value},
        round_to=c.round_to,
        max_ratio=c.max_ratio,
        macs_before=counter.macs(),
        macs_after=counter.macs(counts),
        groups=tuple(plans),
        seed=seed,
        latency=latency,
    )
