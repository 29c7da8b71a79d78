"""``--round-to auto`` (the default): the channel alignment chosen by measuring the model itself.

Every candidate alignment (8, 16, 32) is planned at the compile's target with the same
importance scores (uniform, global or sensitivity allocation as the compile asks, the
sensitivity measured once; latency planners are planned uniformly at their MACs
equivalent). Speed: on ONNX Runtime and PyTorch the candidate plans are applied and the
whole pruned models timed, interleaved, on the latency runtime; on
TensorRT (and for ``--latency-ms``, which has no MACs equivalent before timing) the alignment
profile of conv chains (:func:`kernels.alignment.relative_latency`, measured once per machine)
stands in. Measured on the embedded YOLOv5n at MACs 0.35 on AVX-512 ONNX Runtime: round_to 16
ran 0.74x the time of 8, the chain profile had said 0.945x.

Accuracy, compared at equal speed: a coarser alignment that runs faster than the finest
plannable one by more than :data:`SPEED_TIE` is worth it when it costs no more accuracy than
the finest would have to pay to run as fast (the finest planned again at the MACs its time
scales to, timed, and interpolated to the coarser one's speed), within :data:`IMPORTANCE_TIE`.
The cost is what the allocation minimises: for sensitivity plans the head output error their
groups' measured curves add (summed, as the allocation sums it), else the importance removed.
Among the finest and those worth it the fastest is chosen, ties to the finest. The record
(every candidate's figures and the rule) goes into the plan and the report.

Latency planners plan the candidates at a MACs equivalent, which a coarse alignment can meet
where the knapsack cannot meet the budget in milliseconds (groups too small to shrink at 32):
an alignment the planner itself refuses is marked so and the choice made again among the rest
(:func:`refuse_alignment`); measured on the embedded YOLOv5n, ``--speedup 2`` chose 32 in one
of three compiles and failed there, before this.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from yoloprune.compiler.allocation import curve_error
from yoloprune.compiler.latency_planner import LatencySettings
from yoloprune.compiler.planner import Target, make_plan
from yoloprune.compiler.planners import sensitivity
from yoloprune.compiler.score import Importance
from yoloprune.graphs.errors import PlanError, TargetUnreachable
from yoloprune.graphs.plan import PruningPlan
from yoloprune.kernels.alignment import CANDIDATES, ChainTable, bands_for, relative_latency

# Speeds within this of each other are a tie, which goes to the finer alignment (interleaved
# timings of one model on two shared cores move by 1-2 %).
SPEED_TIE = 0.03
# Importance removed within this (relative) of the finest's at the same speed is a tie, which
# goes to the faster alignment: the proxy cannot tell them apart. Measured on the embedded YOLOv5n
# (2026-12-01): round_to 16 at MACs 0.35 removed 12.1 % of the importance where 8 at the same
# speed (MACs 0.27) removes 11.6 %; their mAPs: one-shot 0.5544 and 0.5521, after 2 epochs
# 0.7573 and 0.7595. A 2 % timing noise moves the finest's estimate by about 3 %; between runs
# (1 s timing budget) it read 11.7-11.9 % in three compiles and 10.8 % in a fourth (a fresh
# clone of 7eda137), which a 10 % band turned into 8: latency ratio 0.69 instead of about 0.52.
# The band is twice that spread (was 10 % until 2026-12-01). Sensitivity plans' measured error
# takes the same relative band (not calibrated on it: at make compile's MACs 0.35, 16 added
# 0.345 where 8 at its speed would add 0.461 at 0.82x, 0.345 at 0.86x; at MACs 0.5 16 added
# 0.109 against 0.130 and 32 0.317 against 0.146: the importance proxy's choices). The error
# rises faster than importance as MACs fall, so 16 stays eligible at 0.35 up to about 0.91x
# of 8's time (the importance: about 0.94x).
IMPORTANCE_TIE = 0.20
# Interleaved timed runs of each candidate model (the planners' closed loop takes 30), extended
# within ALIGNMENT_SECONDS per model (up to kernels.timing.MAX_RUNS): on the embedded YOLOv5n
# (1.5 ms a run) 20 runs put the finest's importance at 16's speed at 10.4-12.5 % in three
# tries (the choice flipped), 200 runs at 11.3-11.7 %. 20 runs of yolov8s at 640 take ~1 s.
ALIGNMENT_RUNS = 20
ALIGNMENT_SECONDS = 1.0
RULE = (
    f"the fastest of the finest plannable alignment and the coarser ones faster by more than "
    f"{SPEED_TIE:.0%} that cost no more accuracy (importance removed; for sensitivity plans the "
    f"measured head output error added) than the finest would at the same speed (within "
    f"{IMPORTANCE_TIE:.0%}); speeds within {SPEED_TIE:.0%} tie, to the finer"
)
# A candidate row's accuracy cost, by what the compile allocates by
IMPORTANCE_REMOVED = "importance_removed"
ERROR_ADDED = "error_added"


class _Scores(Importance):
    """Scores computed once, handed to the chosen alignment's planner."""

    def __init__(self, name: str, scores: dict[str, torch.Tensor]):
        self.name, self.scores = name, scores

    def __call__(self, model, graph, groups, seed: int = 0) -> dict[str, torch.Tensor]:
        return self.scores


def error_added(plan: PruningPlan, curves: dict[str, dict[int, float]]) -> float:
    """The head output error the plan adds by its groups' measured curves (summed: the
    sensitivity allocation's own additive model, compiler.allocation)."""
    return sum(curve_error(curves[g.id], g.size, g.kept) for g in plan.groups if g.pruned)


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
    """The MACs or ratio target the candidates are planned at (None: a budget in ms)."""
    if target.kind in ("ratio", "macs"):
        return target
    if target.kind == "speedup":
        return Target("macs", 1.0 / target.value)
    return None


class _Candidates:
    """Plans of one request at each alignment, allocated as the compile allocates (uniform,
    global or by measured sensitivity; latency planners: uniform at their MACs equivalent)."""

    def __init__(self, request, planner: str):
        self.request = request
        self.allocation = planner if planner in ("global", "sensitivity") else "uniform"
        self.target = _check_target(request.target)

    def how(self) -> str:
        if self.target is None:
            return "not checked: a --latency-ms budget has no MACs equivalent before timing"
        latency = self.request.latency is not None
        compared = (
            "compared by the head output error their measured curves add"
            if self.cost_key == ERROR_ADDED
            else "compared by the importance they remove"
        )
        return (
            f"{self.allocation} plans at {self.target.kind} {self.target.value:.3g} with the "
            "compile's importance"
            + (" (the latency planner's MACs equivalent)" if latency else "")
            + f", {compared}"
        )

    @property
    def cost_key(self) -> str:
        """What a candidate's accuracy cost is read as: the measured error for sensitivity
        plans (what they minimise), else the importance removed."""
        return ERROR_ADDED if self.allocation == "sensitivity" else IMPORTANCE_REMOVED

    def cost(self, plan: PruningPlan) -> float:
        if self.cost_key == ERROR_ADDED:
            return error_added(plan, self.request.curves())
        return removed_importance(plan, self.request.scores)

    def plan(self, round_to: int, target: Target | None = None) -> PruningPlan:
        r = self.request
        constraints = replace(r.constraints, round_to=round_to)
        if self.allocation == "sensitivity":  # the planner itself; its measurement is reused
            return sensitivity(replace(r, constraints=constraints, target=target or self.target))
        return make_plan(
            r.name,
            r.imgsz,
            r.groups,
            r.scores,
            r.counter,
            target or self.target,
            constraints,
            allocation=self.allocation,
        )

    def all(self) -> dict[int, PruningPlan | str]:
        """Each candidate's plan, or why it cannot be planned."""
        plans: dict[int, PruningPlan | str] = {}
        for a in CANDIDATES:
            try:
                plans[a] = self.plan(a)
            except PlanError as exc:
                plans[a] = str(exc)
        return plans


def _timed_speeds(plans: dict, measure) -> dict:
    """Each plan's whole-model time relative to the first's, timed interleaved."""
    ms = measure({str(k): p for k, p in plans.items()})
    first = ms[str(next(iter(plans)))]
    return {k: ms[str(k)] / first for k in plans}


def _worth_checking(plans, finest, speed) -> list[int]:
    """The coarser plannable candidates faster than the finest by more than SPEED_TIE."""
    return [
        a
        for a in CANDIDATES
        if a != finest and isinstance(plans.get(a), PruningPlan) and speed[a] < 1 - SPEED_TIE
    ]


def _matched_plans(candidates, base: PruningPlan, finest: int, speed: dict, coarser) -> dict:
    """For each coarser candidate: the finest alignment planned at the MACs its speed scales
    to, or the figures saying why it cannot be."""
    matched: dict[int, PruningPlan | dict] = {}
    for a in coarser:
        macs = base.macs_ratio * speed[a]
        try:
            matched[a] = candidates.plan(finest, Target("macs", macs))
        except PlanError as exc:
            why = str(exc)
            matched[a] = {"matched_macs": round(macs, 4), "finest_at_this_speed": None, "why": why}
    return matched


def _matched_speeds(base: PruningPlan, matched: dict, speed: dict, measure) -> dict[int, float]:
    """Each matched plan's speed relative to the finest's plan at the target: all timed in one
    interleaved measurement with it, or (untimed) the speed its MACs were scaled to."""
    plans = {a: p for a, p in matched.items() if isinstance(p, PruningPlan)}
    if measure is None or not plans:
        return {a: speed[a] for a in plans}
    timed = _timed_speeds({"finest": base, **plans}, measure)
    return {a: timed[a] for a in plans}


def _finest_at_speed(removed: float, matched: PruningPlan, speed: float, matched_speed, cost):
    """The accuracy cost (importance removed or error added) the finest alignment pays to run
    at ``speed`` (relative to its plan at the target, which costs ``removed``): interpolated
    between that plan and ``matched`` (the finest planned at the MACs ``speed`` scales to,
    timed at ``matched_speed``)."""
    at_macs = cost(matched)
    if 1 - matched_speed > 0.01:  # interpolate (or extrapolate) to ``speed`` along the line
        at_speed = removed + (at_macs - removed) * (1 - speed) / (1 - matched_speed)
    else:  # the cheaper plan timed no faster: its own figure is the best estimate
        at_speed = at_macs
    return {
        "matched_macs": round(matched.macs_ratio, 4),
        "matched_relative_latency": round(matched_speed, 4),
        "finest_at_this_speed": round(at_speed, 6),
    }


def _comparisons(candidates, plans, finest, removed, speed, measure) -> dict[int, dict]:
    """For each coarser candidate worth checking, the finest alignment's figures at its speed
    (``removed``: the importance the finest's plan removes at the target); every matched plan
    is timed in one measurement with the finest's plan."""
    base = plans[finest]
    matched = _matched_plans(candidates, base, finest, speed, _worth_checking(plans, finest, speed))
    matched_speed = _matched_speeds(base, matched, speed, measure)
    return {
        a: m
        if isinstance(m, dict)
        else _finest_at_speed(removed, m, speed[a], matched_speed[a], candidates.cost)
        for a, m in matched.items()
    }


def _no_costlier(removed: float, finest_at_speed: float | None) -> bool:
    """Whether a coarser alignment whose accuracy cost (importance removed or error added) is
    ``removed`` costs no more than the finest at its speed (within IMPORTANCE_TIE; None: the
    finest cannot run that fast)."""
    return finest_at_speed is None or removed <= finest_at_speed * (1 + IMPORTANCE_TIE)


def _rows(candidates, plans, speed, measure) -> list[dict]:
    """Each candidate's figures and whether it may be chosen (``eligible``)."""
    removed = {
        a: candidates.cost(plans[a]) for a in CANDIDATES if isinstance(plans.get(a), PruningPlan)
    }
    finest = next(iter(removed), None)
    checked = (
        _comparisons(candidates, plans, finest, removed[finest], speed, measure) if removed else {}
    )
    rows = []
    for a in CANDIDATES:
        row: dict = {"round_to": a, "relative_latency": round(speed.get(a, 1.0), 4)}
        plan = plans.get(a)
        if candidates.target is None:  # speed alone
            rows.append({**row, "eligible": True})
            continue
        if not isinstance(plan, PruningPlan):
            rows.append({**row, "plannable": False, "why": plan, "eligible": False})
            continue
        row.update(plannable=True, **{candidates.cost_key: round(removed[a], 6)})
        if a == finest:
            row["eligible"] = True
        elif a not in checked:
            row["eligible"] = False  # not meaningfully faster than the finest
        else:
            row.update(checked[a])
            row["eligible"] = _no_costlier(removed[a], row["finest_at_this_speed"])
        rows.append(row)
    return rows


def _choose(rows: list[dict]) -> int:
    eligible = [r for r in rows if r["eligible"]] or rows[:1]
    fastest = min(r["relative_latency"] for r in eligible)
    tied = [r for r in eligible if r["relative_latency"] <= fastest * (1 + SPEED_TIE)]
    return min(r["round_to"] for r in tied)


def refuse_alignment(request, record: dict, why: str):
    """``request`` and ``record`` after the planner refused the chosen alignment (``why``, its
    :class:`TargetUnreachable`): that candidate is marked so and the choice is made again among
    the eligible rest, or, with none left, the fastest plannable candidate not yet refused
    (marked ``fallback``: the target is reachable only there). Every candidate refused: the
    finest's error, naming the others refused too."""
    rows = [
        {**row, "eligible": False, "planner_refused": why}
        if row["round_to"] == record["chosen"]
        else row
        for row in record["candidates"]
    ]
    if any(row["eligible"] for row in rows):
        chosen = _choose(rows)
    else:
        left = [r for r in rows if r.get("plannable", True) and "planner_refused" not in r]
        if not left:
            refused = [r for r in rows if "planner_refused" in r]
            others = " and ".join(str(r["round_to"]) for r in refused[1:])
            raise TargetUnreachable(
                refused[0]["planner_refused"] + (f" (nor at --round-to {others})" if others else "")
            )
        chosen = min(left, key=lambda r: (r["relative_latency"], r["round_to"]))["round_to"]
        rows = [
            {**r, "eligible": True, "fallback": True} if r["round_to"] == chosen else r
            for r in rows
        ]
    constraints = replace(request.constraints, round_to=chosen)
    return replace(request, constraints=constraints), {
        **record,
        "chosen": chosen,
        "candidates": rows,
    }


# What TensorRT's kernels of each precision want (the note's advice where none was measured).
TENSORRT_BLOCKS = {"int8": 32, "int8-fp32": 32, "fp16": 8}


def precision_note(record: dict, deployed: str, plans_latency: bool) -> str | None:
    """Why ``--round-to auto``'s choice (``record``) may not hold for a file deployed at
    ``deployed``: None where the timing ran at that precision. ``plans_latency``: the plan came
    from a latency planner, which cannot time on TensorRT."""
    profiled = record["table_key"]["precision"]
    if profiled == deployed:
        return None
    block = TENSORRT_BLOCKS.get(deployed)
    text = f"the alignment was timed in {profiled}, the deployed file is {deployed}"
    if block is None:
        return text
    text += f" (TensorRT's {deployed} kernels want multiples of {block})"
    if plans_latency:
        return text + f": pass --round-to {block} to follow that rule unmeasured"
    return text + (
        ": measure on the deployment GPU with --latency-runtime tensorrt, or pass "
        f"--round-to {block}"
    )


def choose_alignment(request, planner: str, settings: LatencySettings, measure=None):
    """``request`` with ``round_to`` chosen (see the module docstring) and the record of why.
    ``measure`` times plans applied to the model (ort and torch); without it, or without a MACs
    equivalent of the target, the alignment profile gives the speeds."""
    table = settings.open(ChainTable)
    # every candidate request reuses these scores (a replaced request would compute its own)
    scored = replace(request, importance=_Scores(request.importance.name, request.scores))
    candidates = _Candidates(scored, planner)
    plans = candidates.all() if candidates.target is not None else {}
    planned = {a: p for a, p in plans.items() if isinstance(p, PruningPlan)}
    timed = measure is not None and len(planned) > 1
    if timed:
        speed = _timed_speeds(planned, measure)
        how = (
            f"whole pruned models timed, interleaved (at least {ALIGNMENT_RUNS} runs each, more "
            f"within {ALIGNMENT_SECONDS:g} s)"
        )
    else:
        speed = relative_latency(table, bands_for(settings.runtime))
        how = "the alignment profile (conv chains at equal MACs)"
    rows = _rows(candidates, plans, speed, measure if timed else None)
    chosen = _choose(rows)
    record = {  # what the plan file keeps: no path
        "chosen": chosen,
        "rule": f"{RULE}; speed: {how}",
        "accuracy_check": candidates.how(),
        "candidates": rows,
        "runtime": settings.runtime,
        "table_key": table.key.__dict__,
    }
    return replace(scored, constraints=replace(request.constraints, round_to=chosen)), record
