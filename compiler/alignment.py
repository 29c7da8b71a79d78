"""``--round-to auto`` (the default): the channel alignment chosen by measurement, its accuracy
cost checked.

Speed: :func:`kernels.alignment.relative_latency` on the latency runtime's table (measured once
per machine, about 2 s on ONNX Runtime CPU, then cached). Accuracy: every candidate is
planned with the same importance scores (uniform or global allocation as the compile asks;
latency planners are checked with the uniform plan at their MACs equivalent), and its cost is
the importance it removes over what alignment 8 removes. The choice: among candidates whose
cost is within :data:`ACCURACY_LIMIT`, the finest whose relative latency is within
:data:`SPEED_TIE` of the fastest. The record (every candidate's figures and the rule) goes into
the plan and the report.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from yoloprune.compiler.latency_planner import LatencySettings
from yoloprune.compiler.planner import Target, make_plan
from yoloprune.compiler.score import Importance
from yoloprune.graphs.errors import PlanError
from yoloprune.graphs.plan import PruningPlan
from yoloprune.kernels.alignment import CANDIDATES, ChainTable, relative_latency
from yoloprune.kernels.latency_table import open_table

# A coarser alignment is taken only where it is faster than every finer one by more than this
# (the profile's repeat-to-repeat noise on two shared cores is 1-2 %).
SPEED_TIE = 0.03
# ... and removes at most this much more importance than alignment 8 (relative). Measured on
# the embedded YOLOv5n, MACs 0.5, one-shot: the mAP lost grew with the importance removed
# (round_to 16: 1.38x the importance, 1.42x the mAP drop; 32: 2.46x and 2.4x); 16 cut the ORT
# latency ratio from 0.80 to 0.62 for 0.039 mAP, 32 gained nothing more for 0.133.
ACCURACY_LIMIT = 0.5


class _Scores(Importance):
    """Scores computed once, handed to the chosen alignment's planner."""

    def __init__(self, name: str, scores: dict[str, torch.Tensor]):
        self.name, self.scores = name, scores

    def __call__(self, model, graph, groups, seed: int = 0) -> dict[str, torch.Tensor]:
        return self.scores


def removed_importance(plan: PruningPlan, scores: dict[str, torch.Tensor]) -> float:
    """The fraction of all prunable channels' importance the plan removes."""
    removed = total = 0.0
    for group in plan.groups:
        values = scores[group.id].double()
        total += float(values.sum())
        kept = float(values[list(group.keep)].sum()) if group.keep else 0.0
        removed += float(values.sum()) - kept
    return removed / total if total else 0.0


def _check_target(target: Target) -> Target | None:
    """The MACs or ratio target the accuracy check plans (None: a latency budget in ms)."""
    if target.kind in ("ratio", "macs"):
        return target
    if target.kind == "speedup":
        return Target("macs", 1.0 / target.value)
    return None


def _accuracy_costs(request, planner: str) -> tuple[dict[int, dict], str]:
    """Each candidate's removed importance (or why it could not be planned)."""
    allocation = "global" if planner == "global" else "uniform"
    target = _check_target(request.target)
    if target is None:
        return {}, "not checked: a --latency-ms budget has no MACs equivalent before timing"
    how = (
        f"{allocation} plans at {target.kind} {target.value:.3g} with the compile's importance"
        + (
            " (the latency planner's MACs equivalent)"
            if planner in ("latency", "latency-aware")
            else ""
        )
    )
    rows = {}
    for a in CANDIDATES:
        constraints = replace(request.constraints, round_to=a)
        try:
            plan = make_plan(
                request.name,
                request.imgsz,
                request.groups,
                request.scores,
                request.counter,
                target,
                constraints,
                allocation=allocation,
            )
        except PlanError as exc:
            rows[a] = {"plannable": False, "why": str(exc)}
            continue
        rows[a] = {
            "plannable": True,
            "importance_removed": removed_importance(plan, request.scores),
        }
    return rows, how


def choose_alignment(request, planner: str, settings: LatencySettings):
    """``request`` with ``round_to`` chosen (see the module docstring) and the record of why."""
    table = open_table(
        settings.runtime,
        settings.batch,
        settings.threads,
        settings.precision,
        settings.device,
        kind=ChainTable,  # its own cache file (--latency-table names the per-layer table)
    )
    speed = relative_latency(table)
    costs, how = _accuracy_costs(request, planner)
    base = costs.get(CANDIDATES[0], {}).get("importance_removed")
    candidates = []
    for a in CANDIDATES:
        row = {"round_to": a, "relative_latency": round(speed[a], 4), **costs.get(a, {})}
        if base and row.get("plannable"):
            row["accuracy_cost"] = round(row["importance_removed"] / base - 1, 4)
        row["eligible"] = (
            row.get("plannable", True) and row.get("accuracy_cost", 0) <= ACCURACY_LIMIT
        )
        candidates.append(row)
    eligible = [r for r in candidates if r["eligible"]] or candidates[:1]
    fastest = min(r["relative_latency"] for r in eligible)
    chosen = min(
        r["round_to"] for r in eligible if r["relative_latency"] <= fastest * (1 + SPEED_TIE)
    )
    record = {
        "chosen": chosen,
        "rule": (
            f"the finest alignment within {SPEED_TIE:.0%} of the fastest, among those removing "
            f"at most {ACCURACY_LIMIT:.0%} more importance than round_to {CANDIDATES[0]}"
        ),
        "accuracy_check": how,
        "candidates": candidates,
        "runtime": settings.runtime,
        "table": str(table.path),
        "table_key": table.key.__dict__,
        "measured_now": table.measured,
    }
    scored = replace(request, importance=_Scores(request.importance.name, request.scores))
    return replace(scored, constraints=replace(request.constraints, round_to=chosen)), record
