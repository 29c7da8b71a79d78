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

import math
from dataclasses import replace

import torch

from yoloprune.compiler.latency_planner import LatencySettings
from yoloprune.compiler.planner import Target, make_plan
from yoloprune.compiler.score import Importance
from yoloprune.graphs.errors import PlanError
from yoloprune.graphs.plan import PruningPlan
from yoloprune.kernels.alignment import CANDIDATES, ChainTable, bands_for, relative_latency

# The finest candidate whose relative latency is within this of the fastest eligible one is
# chosen (the profile's repeat-to-repeat noise on two shared cores is 1-2 %).
SPEED_TIE = 0.03
# Eligible: removes at most this much more importance than the finest plannable candidate.
# Measured on the embedded YOLOv5n, MACs 0.5, one-shot: the mAP lost grew with the importance
# removed (round_to 16: 1.38x the importance, 1.42x the mAP drop; 32: 2.46x and 2.4x); 16 cut
# the ORT latency ratio from 0.80 to 0.62 for 0.039 mAP, 32 gained nothing more for 0.133.
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
        everything = float(values.sum())
        total += everything
        removed += everything - (float(values[list(group.keep)].sum()) if group.keep else 0.0)
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


def _checked_candidates(speed: dict[int, float], costs: dict[int, dict]) -> list[dict]:
    """Each candidate's row: relative latency, and where the check ran its importance removed,
    its cost against the finest plannable candidate and whether it is within the limit. A
    candidate that cannot be planned is not eligible; without a check every one is."""
    base = next((costs[a] for a in CANDIDATES if costs.get(a, {}).get("plannable")), None)
    rows = []
    for a in CANDIDATES:
        row = {"round_to": a, "relative_latency": round(speed[a], 4), **costs.get(a, {})}
        if not costs:
            row["eligible"] = True
        elif not row["plannable"]:
            row["eligible"] = False
        else:
            removed, least = row["importance_removed"], base["importance_removed"]
            cost = removed / least - 1 if least > 0 else (0.0 if removed == 0 else math.inf)
            row["accuracy_cost"] = round(cost, 4) if math.isfinite(cost) else None
            row["eligible"] = cost <= ACCURACY_LIMIT
        rows.append(row)
    return rows


# What TensorRT's kernels of each precision want (the note's advice where none was measured).
TENSORRT_BLOCKS = {"int8": 32, "int8-fp32": 32, "fp16": 8}


def precision_note(record: dict, deployed: str, plans_latency: bool) -> str | None:
    """Why ``--round-to auto``'s choice (``record``) may not hold for a file deployed at
    ``deployed``: None where the profile timed that precision. ``plans_latency``: the plan came
    from a latency planner, which cannot profile on TensorRT."""
    profiled = record["table_key"]["precision"]
    if profiled == deployed:
        return None
    block = TENSORRT_BLOCKS.get(deployed)
    text = f"the profile timed {profiled} convolutions, the deployed file is {deployed}"
    if block is None:
        return text
    text += f" (TensorRT's {deployed} kernels want multiples of {block})"
    if plans_latency:
        return text + f": pass --round-to {block} to follow that rule unmeasured"
    return text + (
        ": measure on the deployment GPU with --latency-runtime tensorrt, or pass "
        f"--round-to {block}"
    )


def choose_alignment(request, planner: str, settings: LatencySettings):
    """``request`` with ``round_to`` chosen (see the module docstring) and the record of why."""
    table = settings.open(ChainTable)
    speed = relative_latency(table, bands_for(settings.runtime))
    costs, how = _accuracy_costs(request, planner)
    candidates = _checked_candidates(speed, costs)
    eligible = [r for r in candidates if r["eligible"]] or candidates[:1]
    fastest = min(r["relative_latency"] for r in eligible)
    chosen = min(
        r["round_to"] for r in eligible if r["relative_latency"] <= fastest * (1 + SPEED_TIE)
    )
    record = {  # what the plan file keeps: no path and nothing that differs between runs
        "chosen": chosen,
        "rule": (
            f"the finest alignment within {SPEED_TIE:.0%} of the fastest, among those removing "
            f"at most {ACCURACY_LIMIT:.0%} more importance than the finest plannable one"
        ),
        "accuracy_check": how,
        "candidates": candidates,
        "runtime": settings.runtime,
        "table_key": table.key.__dict__,
    }
    scored = replace(request, importance=_Scores(request.importance.name, request.scores))
    return replace(scored, constraints=replace(request.constraints, round_to=chosen)), record
