"""Latency-aware planning: keep the most importance under a latency budget (HALP-style).

A :class:`LatencyModel` predicts a network's latency for any assignment of kept channels per
group, from a per-layer table measured on the target runtime: each conv's time is interpolated
(bilinear in input and output channels) between measured grid points, and the sum is scaled
by the measured whole-model latency over the table's sum for the unpruned network (the time
spent outside convs, and the gap between isolated and in-network layers).

:func:`latency_counts` is a greedy knapsack: starting from every channel kept, it repeatedly
removes ``round_to`` channels from the group whose next removal costs the least per
millisecond saved, until the predicted latency fits the budget. What a removal costs is a
:data:`StepCost`: the importance of the channels removed (:func:`importance_cost`, the
default), or, with ``--allocation sensitivity``, the head output error the group's measured
curve adds (:func:`compiler.allocation.error_cost`).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from yoloprune.compiler.planner import Constraints, _floor, conv_io_sizes, tie_members
from yoloprune.graphs.blocks import droppable_blocks
from yoloprune.graphs.dependency import ChannelGroup, ConvChannels, conv_channels
from yoloprune.graphs.errors import PlanError, TargetUnreachable
from yoloprune.graphs.plan import PruningPlan
from yoloprune.kernels.latency_table import ConvShape, LatencyTable, open_table

DEFAULT_GRID = (0.25, 0.5, 0.75, 1.0)

# What a step loses: (group id, channels kept now, channels kept after) -> cost (>= 0 for
# importance; a measured error may dip below 0 where removal helped)
StepCost = Callable[[str, int, int], float]


def importance_cost(scores: dict[str, torch.Tensor]) -> StepCost:
    """A step's cost: the summed importance of the lowest-scored channels it removes."""
    ascending = {gid: torch.sort(s).values for gid, s in scores.items()}

    def cost(gid: str, now: int, after: int) -> float:
        size = len(ascending[gid])
        return float(ascending[gid][size - now : size - after].sum())

    return cost


@dataclass(frozen=True)
class ConvGeometry:
    channels: ConvChannels
    kernel: int
    stride: int
    padding: int
    height: int
    width: int


def conv_geometry(model: nn.Module, convs: list[ConvChannels], imgsz: int) -> list[ConvGeometry]:
    """Kernel, stride and input size of every conv at imgsz x imgsz (one forward pass)."""
    sizes = conv_io_sizes(model, imgsz)
    modules = dict(model.named_modules())
    geometry = []
    for conv in convs:
        module = modules[conv.name]
        square = {
            "kernel": module.kernel_size[0] == module.kernel_size[1],
            "stride": module.stride[0] == module.stride[1],
            "padding": isinstance(module.padding, tuple) and module.padding[0] == module.padding[1],
        }
        if not all(square.values()):
            raise PlanError(f"{conv.name}: latency tables cover square convs only ({square})")
        height, width = sizes[conv.name][0]
        geometry.append(
            ConvGeometry(
                conv, module.kernel_size[0], module.stride[0], module.padding[0], height, width
            )
        )
    return geometry


def _grid(full: int, fractions: tuple[float, ...], round_to: int, varies: bool) -> list[int]:
    if not varies:
        return [full]
    points = {full}
    for f in fractions:
        points.add(min(full, max(round_to, round(full * f / round_to) * round_to)))
    return sorted(points)


def _is_depthwise(c: ConvChannels, full_in: int) -> bool:
    """A depthwise conv (one filter per channel, as in YOLO11/YOLO26 heads): its inputs and
    outputs are the same channels, so pruning its group shrinks both, and its groups with them.
    """
    return c.groups > 1 and c.groups == c.out_channels == full_in


def _shape(g: ConvGeometry, cin: int, cout: int, depthwise: bool) -> ConvShape:
    """The table entry timing conv ``g`` with ``cin`` inputs and ``cout`` outputs (a depthwise
    conv with ``cout`` channels in and out)."""
    if depthwise:
        return ConvShape(cout, cout, g.kernel, g.stride, cout, g.height, g.width, g.padding)
    groups = g.channels.groups
    return ConvShape(cin, cout, g.kernel, g.stride, groups, g.height, g.width, g.padding)


def _interp(xs: list[int], x: float) -> tuple[int, int, float]:
    """Indices (i, j) and weight t with x ~ xs[i] + t (xs[j] - xs[i]); extrapolates linearly."""
    if len(xs) == 1:
        return 0, 0, 0.0
    j = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    i = j - 1
    return i, j, (x - xs[i]) / (xs[j] - xs[i])


class LatencyModel:
    """Predicted latency (ms) of the network for kept channel counts per group."""

    def __init__(
        self,
        geometry: list[ConvGeometry],
        table: LatencyTable,
        round_to: int = 8,
        grid: tuple[float, ...] = DEFAULT_GRID,
        progress: bool = True,
    ):
        self.table = table
        layers, shapes = [], []
        for g in geometry:
            c = g.channels
            cin_varies = any(gid is not None for gid, _, _ in c.in_slices)
            full_in = sum(n for _, n, _ in c.in_slices)  # n spans every copy of a group
            depthwise = _is_depthwise(c, full_in)
            if c.groups != 1:
                cin_varies = False  # other grouped convs: timed at full size
            xs = _grid(full_in, grid, round_to, cin_varies)
            ys = _grid(
                c.out_channels,
                grid,
                round_to,
                c.out_group is not None and (c.groups == 1 or depthwise),
            )
            layer_shapes = [[_shape(g, x, y, depthwise) for y in ys] for x in xs]
            shapes += [s for row in layer_shapes for s in row]
            layers.append((c, xs, ys, layer_shapes))
        table.ensure(shapes, progress=progress)
        self._times = [
            (c, xs, ys, [[table[s] for s in row] for row in rows]) for c, xs, ys, rows in layers
        ]
        self.scale = 1.0
        self.by_group: dict[str, list[int]] = {}
        for index, (c, *_rest) in enumerate(self._times):
            touched = {c.out_group} | {gid for gid, _, _ in c.in_slices}
            for gid in touched - {None}:
                self.by_group.setdefault(gid, []).append(index)

    def conv_ms(self, index: int, kept: dict[str, int]) -> float:
        c, xs, ys, times = self._times[index]
        cin = sum(kept[gid] * copies if gid in kept else n for gid, n, copies in c.in_slices)
        cout = kept.get(c.out_group, c.out_channels) if c.out_group else c.out_channels
        if cin == 0 or cout == 0:  # inside a dropped block (graphs.blocks): no conv left
            return 0.0
        i0, i1, tx = _interp(xs, cin)
        j0, j1, ty = _interp(ys, cout)
        low = times[i0][j0] + (times[i0][j1] - times[i0][j0]) * ty
        high = times[i1][j0] + (times[i1][j1] - times[i1][j0]) * ty
        return max(0.0, low + (high - low) * tx)

    def layers_ms(self, kept: dict[str, int] | None = None) -> float:
        kept = kept or {}
        return sum(self.conv_ms(i, kept) for i in range(len(self._times)))

    def predict(self, kept: dict[str, int] | None = None) -> float:
        return self.scale * self.layers_ms(kept)

    def calibrate(self, measured_full_ms: float) -> None:
        """Scale predictions so the unpruned network predicts its measured latency."""
        self.scale = measured_full_ms / self.layers_ms()

    def group_ms(self, gid: str, kept: dict[str, int]) -> float:
        return self.scale * sum(self.conv_ms(i, kept) for i in self.by_group.get(gid, ()))


def _next_count(size: int, current: int, round_to: int, floor: int) -> int | None:
    """The next smaller aligned count, or None when the group cannot shrink further."""
    if size <= round_to:
        return None
    step = (current - 1) // round_to * round_to
    return step if step >= max(floor, round_to) else None


def latency_counts(
    groups: list[ChannelGroup],
    cost: StepCost,
    model: LatencyModel,
    budget_ms: float,
    round_to: int,
    max_ratio: float,
    macs_goal: tuple | None = None,
    droppable: dict[str, str] | None = None,
    blocks_allowed: bool = True,
    kept_at_least: dict[str, int] | None = None,
) -> tuple[dict[str, int], float]:
    """Greedy knapsack: counts per prunable group with predicted latency <= budget_ms, or,
    with ``macs_goal`` = (MacCounter, MACs to reach), until the plan's MACs reach that goal
    (latency-aware allocation under a MACs target). Groups in ``droppable`` (hidden groups of
    residual blocks, :func:`graphs.blocks.droppable_blocks`) have one more step past their
    floor: 0 channels, the block removed (its remaining importance lost, its convs' time
    saved). Tied groups (a split block's halves, equal counts) step together, as one.
    ``cost`` prices each step (:data:`StepCost`); ``blocks_allowed``: whether --drop-blocks
    may be suggested when the target is missed (not with measured-error pricing)."""
    droppable = droppable or {}
    prunable = [g for g in groups if not g.protected]
    counts = {g.id: g.size for g in prunable}
    sizes = {g.id: g.size for g in prunable}
    members = tie_members(prunable)  # each group's tie (itself alone when untied)
    least = tuple((kept_at_least or {}).items())  # --steps: the original sizes' floor
    bounds = Constraints(round_to=round_to, max_ratio=max_ratio, kept_at_least=least)
    floors = {g.id: _floor(g.size, bounds, g.id) for g in prunable}
    total = model.predict(counts)
    version = dict.fromkeys(counts, 0)
    convs_of = {gid: set(indices) for gid, indices in model.by_group.items()}
    neighbours = {  # groups sharing a conv: their next step's saving changes with ours
        g.id: {other for other, c in convs_of.items() if c & convs_of.get(g.id, set())}
        for g in prunable
    }

    def candidate(gid: str):
        """(priority, next count, ms saved). Steps saving predicted time rank first, by
        cost per ms; under a MACs goal, steps the table says save nothing (flat or noisy
        measurements) still rank after them, by cost per MAC saved."""
        nxt = _next_count(sizes[gid], counts[gid], round_to, floors[gid])
        if nxt is None and gid in droppable and counts[gid] > 0:
            nxt = 0
        if nxt is None:
            return None
        tie = members[gid]
        lost = sum(cost(m, counts[m], nxt) for m in tie)
        smaller = {**counts, **dict.fromkeys(tie, nxt)}
        if len(tie) == 1:
            saved = model.group_ms(gid, counts) - model.group_ms(gid, smaller)
        else:  # members share convs (the block's cv2 reads both halves): count them once
            saved = model.predict(counts) - model.predict(smaller)
        if saved > 1e-9:
            return ((0, lost / saved), nxt, saved)
        if macs_goal is None:
            return ((1, math.inf), nxt, saved)
        macs_saved = macs_goal[0].macs(counts) - macs_goal[0].macs(smaller)
        return ((1, lost / macs_saved if macs_saved > 0 else math.inf), nxt, saved)

    heap = []

    def push(gid: str) -> None:
        item = candidate(gid)
        if item is not None:
            heapq.heappush(heap, (item[0], version[gid], gid, item[1], item[2]))

    for gid in counts:
        if members[gid][0] == gid:  # a tie is stepped through its first member
            push(gid)

    def done() -> bool:
        if macs_goal is not None:
            return macs_goal[0].macs(counts) <= macs_goal[1]
        return total <= budget_ms

    while not done() and heap:
        priority, ver, gid, nxt, saved = heapq.heappop(heap)
        if ver != version[gid]:
            continue
        if math.isinf(priority[1]):
            break
        for member in members[gid]:
            counts[member] = nxt
        total -= saved
        touched = set().union(*(neighbours[m] | {m} for m in members[gid]))
        for leader in {members[other][0] for other in touched if other in counts}:
            version[leader] += 1
            push(leader)
    total = model.predict(counts)
    if macs_goal is not None and not done():
        raise TargetUnreachable(
            f"--macs {macs_goal[1] / macs_goal[0].macs():.3g} cannot be reached latency-aware "
            f"with --round-to {round_to} and --max-ratio {max_ratio:g}; raise --max-ratio"
            + ("" if droppable or not blocks_allowed else " or allow --drop-blocks")
        )
    if macs_goal is None and total > budget_ms * 1.0001:
        raise TargetUnreachable(
            f"latency budget {budget_ms:.2f} ms cannot be met (best predicted {total:.2f} ms) "
            f"with --round-to {round_to} and --max-ratio {max_ratio:g}; ask for less speed-up "
            "or raise --max-ratio"
        )
    return counts, total


@dataclass(frozen=True)
class LatencySettings:
    runtime: str = "ort"  # the runtime the table is measured on and the plan is checked on
    batch: int = 1
    threads: int | None = None
    spinning: bool = False  # ort: intra-op spinning of the closed-loop timing (not the table)
    device: str | None = None  # torch: cuda (default) or cpu
    precision: str | None = None
    table: Path | None = None  # None: the per-device cache
    grid: tuple[float, ...] = DEFAULT_GRID
    runs: int = 30
    rounds: int = 3  # closed-loop re-plans when measured latency misses the goal
    tolerance: float = 0.03  # relative; the loop stops once measured is this close

    def open(self, kind: type[LatencyTable] = LatencyTable) -> LatencyTable:
        """This runtime's cached table of ``kind`` (``table``, when given, names the
        per-layer one; other kinds, as the alignment profile, keep their cache file)."""
        path = self.table if kind is LatencyTable else None
        return open_table(
            self.runtime, self.batch, self.threads, self.precision, self.device, path, kind=kind
        )


def _latency_model(request, constraints, settings) -> tuple:
    """The latency table of ``settings`` (ORT: measured with spinning on, see
    :func:`kernels.latency_table.open_table`) and the model predicting this network's convs."""
    table = settings.open()
    geometry = conv_geometry(
        request.model, conv_channels(request.model, request.groups), request.imgsz
    )
    return table, LatencyModel(geometry, table, constraints.round_to, settings.grid)


def _table_record(table, settings) -> dict:
    """Which table a plan came from, for ``plan.latency``."""
    return {
        "runtime": settings.runtime,
        "table": str(table.path),
        "table_key": table.key.__dict__,
        "table_entries": len(table.entries),
        "measured_now": table.measured,
    }


def _droppable(request, constraints) -> dict[str, str]:
    """{hidden group: residual block} the knapsack may empty, where --drop-blocks allows."""
    if not constraints.drop_blocks:
        return {}
    return droppable_blocks(request.model, request.groups)


def _counts_plan(request, counts, droppable):
    """The plan keeping ``counts`` channels per prunable group (allocation ``latency``); groups
    at 0 channels are the hidden groups of residual blocks removed whole (``droppable`` maps
    them to their blocks, listed as ``drop_blocks``)."""
    plan = request.plan_keeping(counts, "latency")
    emptied = [gid for gid, n in counts.items() if n == 0]
    return replace(plan, drop_blocks=tuple(sorted(droppable[gid] for gid in emptied)))


def plan_macs_latency_aware(request, settings: LatencySettings) -> PruningPlan:
    """Plan under ``--macs`` with ``--latency-aware``: the same knapsack as :func:`plan_latency`
    (importance lost per predicted millisecond saved, from the per-layer latency table) removes
    channels until the MACs target is met, so the MACs go where they cost the most time."""
    constraints = request.constraints
    table, model = _latency_model(request, constraints, settings)
    droppable = _droppable(request, constraints)
    counter = request.counter
    goal = counter.macs() * request.target.value
    counts, predicted = latency_counts(
        request.groups,
        request.step_cost(),
        model,
        0.0,
        constraints.round_to,
        constraints.max_ratio,
        macs_goal=(counter, goal),
        droppable=droppable,
        blocks_allowed=request.sensitivity is None,
        kept_at_least=dict(constraints.kept_at_least),
    )
    plan = _counts_plan(request, counts, droppable)
    latency = {
        **_table_record(table, settings),
        "predicted_ms_uncalibrated": predicted,
        "baseline_ms_uncalibrated": model.predict(),
    }
    return replace(plan, latency=latency)


def plan_latency(request, settings: LatencySettings, measure) -> PruningPlan:
    """Plan under ``--speedup`` / ``--latency-ms``: predict with the table, then check on the
    runtime itself (baseline and candidate interleaved) and re-plan with a corrected budget
    until the measured latency is within ``settings.tolerance`` of the goal (at most
    ``settings.rounds`` rounds). The corrected budget stays between the budgets measured too
    fast and too slow so far (their geometric mean where the correction leaves that bracket: a
    plan's time moves in steps as aligned counts cross kernel boundaries). The plan kept is the
    slowest one measured to meet the goal (within the tolerance), or, if none did, the fastest
    (:func:`_preferred`). Every round is recorded in ``plan.latency``. ``measure`` times plans
    on the runtime ({name: plan or None for the unpruned model} -> {name: median ms})."""
    constraints, target = request.constraints, request.target
    table, model = _latency_model(request, constraints, settings)
    base_ms = measure({"base": None})["base"]
    model.calibrate(base_ms)
    goal = base_ms / target.value if target.kind == "speedup" else target.value
    prunable = [g for g in request.groups if not g.protected]
    droppable = _droppable(request, constraints)
    budget, rounds, best, bracket = goal, [], None, Bracket()
    cost = request.step_cost()
    for _ in range(settings.rounds):
        try:
            counts, predicted = latency_counts(
                request.groups,
                cost,
                model,
                budget,
                constraints.round_to,
                constraints.max_ratio,
                droppable=droppable,
                kept_at_least=dict(constraints.kept_at_least),
            )
        except TargetUnreachable:
            if best is None:
                raise
            break  # a corrected budget the table cannot meet: keep the best plan so far
        if best is not None and all(counts[g.id] == g.size for g in prunable):
            break  # a corrected budget that prunes nothing: any speed-up it measured is noise
        plan = _counts_plan(request, counts, droppable)
        timings = measure({"base": None, "pruned": plan})
        ratio = timings["pruned"] / timings["base"]
        measured = base_ms * ratio  # against the calibrated baseline, noise-cancelled by A/B
        rounds.append(
            {
                "budget_ms": budget,
                "predicted_ms": predicted,
                "measured_ms": measured,
                "measured_speedup": 1 / ratio,
                "baseline_ms_this_round": timings["base"],
            }
        )
        if best is None or _preferred(measured, best[1], goal, settings.tolerance):
            best = (plan, measured, predicted, counts)
        if abs(measured / goal - 1) <= settings.tolerance:
            break
        budget = bracket.next_budget(budget, measured, goal)
    plan, measured, predicted, counts = best
    latency = {
        **_table_record(table, settings),
        "baseline_ms": base_ms,
        "goal_ms": goal,
        "predicted_ms": predicted,
        "measured_ms": measured,
        "measured_speedup": base_ms / measured,
        "rounds": rounds,
        "scale": model.scale,
    }
    return replace(plan, latency=latency)


def _preferred(measured: float, kept: float, goal: float, tolerance: float) -> bool:
    """Whether a plan measured at ``measured`` ms beats the one kept (``kept`` ms): meeting the
    goal (within ``tolerance``) beats missing it; among plans meeting it the slower one (the
    least pruned), among plans missing it the faster one."""
    limit = goal * (1 + tolerance)
    meets, kept_meets = measured <= limit, kept <= limit
    if meets != kept_meets:
        return meets
    return measured > kept if meets else measured < kept


@dataclass
class Bracket:
    """The closed loop's budgets so far: the largest measured too fast, the smallest too slow."""

    too_fast: float | None = None
    too_slow: float | None = None

    def next_budget(self, budget: float, measured: float, goal: float) -> float:
        """The budget corrected by the miss, kept strictly inside the bracket."""
        if measured > goal:
            self.too_slow = min(budget, self.too_slow or math.inf)
        else:
            self.too_fast = max(budget, self.too_fast or 0.0)
        corrected = budget * goal / measured
        if self.too_fast is None or self.too_slow is None:  # one side seen: no bracket yet
            return corrected
        if self.too_fast < corrected < self.too_slow:
            return corrected
        return math.sqrt(self.too_fast * self.too_slow)
