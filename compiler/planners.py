"""The planner registry: every planner takes one :class:`PlanRequest` and returns a
:class:`~graphs.plan.PruningPlan`. The flags select a planner by name
(:func:`compiler.options.planner_name`); a new planner is one function and one
:func:`register_planner` call.

A request carries the traced model, the target and constraints, the importance criterion as a
callable (scores are computed once, on first use) and, for latency planners, their settings
and a ``measure`` callable that times plans on the target runtime (so planners never import
the surgery or the benchmark themselves).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property

import torch
from torch import nn

from yoloprune.compiler.allocation import GroupSensitivity, allocate, error_cost
from yoloprune.compiler.latency_planner import (
    LatencySettings,
    StepCost,
    importance_cost,
    plan_latency,
    plan_macs_latency_aware,
)
from yoloprune.compiler.planner import (
    Constraints,
    MacCounter,
    Target,
    make_plan,
    plan_from_counts,
)
from yoloprune.compiler.score import Importance
from yoloprune.graphs.dependency import ChannelGroup, CoupledGraph
from yoloprune.graphs.errors import PlanError
from yoloprune.graphs.plan import GroupPlan, PruningPlan

# Times plans on the target runtime, interleaved: {name: plan} -> {name: median ms}; a plan of
# None is the unpruned model.
Measure = Callable[[dict[str, PruningPlan | None]], dict[str, float]]


@dataclass(frozen=True)
class PlanRequest:
    name: str  # the model's name, recorded in the plan
    model: nn.Module
    graph: CoupledGraph
    groups: list[ChannelGroup]
    imgsz: int
    counter: MacCounter
    target: Target
    constraints: Constraints
    importance: Importance
    seed: int = 0
    latency: LatencySettings | None = None
    measure: Measure | None = None
    # --allocation sensitivity: the measurement (cached in it, so replanning reuses it)
    sensitivity: GroupSensitivity | None = None

    @cached_property
    def scores(self) -> dict[str, torch.Tensor]:
        """The importance of every prunable group's channels (computed once)."""
        return self.importance(self.model, self.graph, self.groups, self.seed)

    def curves(self) -> dict[str, dict[int, float]]:
        """--allocation sensitivity's measured curves (measured once: compiler.allocation)."""
        if self.sensitivity is None:
            raise PlanError("--allocation sensitivity needs calibration images (--calib-images)")
        return self.sensitivity(self.model, self.graph, self.groups, self.scores)

    def step_cost(self) -> StepCost:
        """What a latency planner's step loses: the channels' importance, or, with
        --allocation sensitivity, the head output error their groups' curves add."""
        if self.sensitivity is None:
            return importance_cost(self.scores)
        return error_cost(self.curves(), {g.id: g.size for g in self.groups})

    def with_sensitivity(self, plan: PruningPlan) -> PruningPlan:
        """``plan`` with the sensitivity measurement it was allocated by, if any."""
        if self.sensitivity is None:
            return plan
        return replace(plan, sensitivity=self.sensitivity.record(self.curves()))

    def plan_keeping(self, counts: dict[str, int], allocation: str) -> PruningPlan:
        """The plan keeping ``counts[id]`` highest-scored channels in each prunable group."""
        return plan_from_counts(
            self.name,
            self.imgsz,
            [g for g in self.groups if not g.protected],
            self.scores,
            counts,
            self.counter,
            self.target,
            self.constraints,
            allocation=allocation,
            importance=self.importance.name,
            seed=self.seed,
        )

    def latency_settings(self) -> LatencySettings:
        if self.latency is None:
            raise PlanError("a latency planner needs latency settings (--latency-runtime ...)")
        return self.latency


Planner = Callable[[PlanRequest], PruningPlan]
PLANNERS: dict[str, Planner] = {}


def register_planner(name: str) -> Callable[[Planner], Planner]:
    def add(planner: Planner) -> Planner:
        if name in PLANNERS:
            raise ValueError(f"planner {name!r} is already registered")
        PLANNERS[name] = planner
        return planner

    return add


def run_planner(request: PlanRequest, planner: str) -> PruningPlan:
    if planner not in PLANNERS:
        raise PlanError(f"unknown planner {planner!r}: use one of {', '.join(PLANNERS)}")
    return PLANNERS[planner](request)


def _allocated(request: PlanRequest, allocation: str) -> PruningPlan:
    return make_plan(
        request.name,
        request.imgsz,
        request.groups,
        request.scores,
        request.counter,
        request.target,
        request.constraints,
        allocation=allocation,
        importance=request.importance.name,
        seed=request.seed,
    )


@register_planner("uniform")
def uniform(request: PlanRequest) -> PruningPlan:
    """The same fraction of every group kept (aligned), lowest-scored channels removed."""
    return _allocated(request, "uniform")


@register_planner("global")
def global_threshold(request: PlanRequest) -> PruningPlan:
    """One score threshold across all groups: groups keep different fractions."""
    return _allocated(request, "global")


@register_planner("sensitivity")
def sensitivity(request: PlanRequest) -> PruningPlan:
    """``--allocation sensitivity``: each group's error on the head measured alone, channels
    removed where they add the least error per MAC (compiler.allocation)."""
    if request.target.kind not in ("macs", "ratio"):
        raise PlanError("--allocation sensitivity plans a --macs or --ratio target")
    curves = request.curves()
    counts = allocate(request.groups, curves, request.counter, request.target, request.constraints)
    return request.with_sensitivity(request.plan_keeping(counts, "sensitivity"))


@register_planner("latency")
def latency(request: PlanRequest) -> PruningPlan:
    """``--speedup`` / ``--latency-ms``: the table-driven knapsack, checked on the runtime
    (its steps priced by importance, or by measured error with --allocation sensitivity)."""
    if request.measure is None:
        raise PlanError("the latency planner needs a measure callable (the target runtime)")
    return request.with_sensitivity(
        plan_latency(request, request.latency_settings(), request.measure)
    )


@register_planner("latency-aware")
def latency_aware(request: PlanRequest) -> PruningPlan:
    """``--macs`` with ``--latency-aware``: MACs removed where they cost the most time (and,
    with --allocation sensitivity, the least measured error)."""
    return request.with_sensitivity(plan_macs_latency_aware(request, request.latency_settings()))


@register_planner("unstructured")
def unstructured(request: PlanRequest) -> PruningPlan:
    """The baseline: every channel kept, ``--ratio`` of each conv's weights zeroed."""
    if request.target.kind != "ratio":
        raise PlanError("--method unstructured takes --ratio (the fraction of weights zeroed)")
    macs = request.counter.macs()
    groups = tuple(
        GroupPlan(g.id, g.size, tuple(range(g.size))) for g in request.groups if not g.protected
    )
    return PruningPlan(
        model=request.name,
        imgsz=request.imgsz,
        importance="l1 (per weight)",
        allocation="per-layer",
        target={"kind": "sparsity", "value": request.target.value},
        round_to=1,
        max_ratio=request.target.value,
        macs_before=macs,
        macs_after=macs,
        groups=groups,
        seed=request.seed,
        method="unstructured",
    )
