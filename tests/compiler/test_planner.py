import copy
import math

import pytest
import torch

from yoloprune.compiler.apply import apply_plan
from yoloprune.compiler.pipeline import CompileOptions, Prepared, plan_for
from yoloprune.compiler.planner import Constraints, Target, conv_macs
from yoloprune.graphs.checkpoint import describe, load_model
from yoloprune.graphs.dependency import build_graph, channel_groups
from yoloprune.graphs.errors import PlanError
from yoloprune.graphs.plan import PruningPlan


def prepared_for(model, imgsz: int) -> Prepared:
    graph = build_graph(model)
    info = describe(model, "m.yaml", pretrained=False, imgsz=imgsz)
    return Prepared(model, info, imgsz, channel_groups(model, graph), graph)


@pytest.fixture(scope="module")
def yolov5s():
    model, _ = load_model("yolov5s.yaml")
    return prepared_for(model, 640)


@pytest.mark.parametrize(
    "kind,value",
    [
        ("ratio", 1.5),
        ("ratio", 0.0),
        ("macs", 0.0),
        ("macs", 1.0),
        ("macs", -0.2),
        ("macs", math.nan),
    ],
)
def test_targets_out_of_range_are_refused(kind, value):
    with pytest.raises(PlanError, match="out of range"):
        Target(kind, value)


def test_constraints_are_validated():
    with pytest.raises(PlanError, match="round-to"):
        Constraints(round_to=0)
    with pytest.raises(PlanError, match="max-ratio"):
        Constraints(max_ratio=1.0)


@pytest.mark.parametrize("macs", [0.75, 0.5, 0.3])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_macs_target_is_met_and_predicted_macs_are_exact(yolov5s, macs, allocation):
    options = CompileOptions("yolov5s.yaml", macs=macs, global_allocation=allocation == "global")
    plan = plan_for(yolov5s, options)
    assert abs(plan.macs_ratio / macs - 1) <= 0.03
    assert plan.macs_before == conv_macs(yolov5s.model, 640)
    pruned = apply_plan(yolov5s.model, plan)
    assert plan.macs_after == conv_macs(pruned, 640)


@pytest.mark.parametrize("round_to", [8, 16, 32])
def test_every_pruned_group_keeps_a_multiple_of_round_to(yolov5s, round_to):
    plan = plan_for(yolov5s, CompileOptions("yolov5s.yaml", ratio=0.35, round_to=round_to))
    pruned = [g for g in plan.groups if g.pruned]
    assert pruned
    assert all(g.kept % round_to == 0 and g.kept >= round_to for g in pruned)
    model = apply_plan(yolov5s.model, plan)
    for g in pruned:  # the physical conv agrees with the plan
        assert model.get_submodule(g.id).out_channels == g.kept


def test_uniform_ratio_removes_that_fraction_per_group(yolov5s):
    plan = plan_for(yolov5s, CompileOptions("yolov5s.yaml", ratio=0.25))
    for g in plan.groups:
        if g.size > 8:
            assert abs(g.kept - 0.75 * g.size) <= 4  # nearest multiple of 8


def test_global_allocation_respects_max_ratio(yolov5s):
    plan = plan_for(
        yolov5s, CompileOptions("yolov5s.yaml", macs=0.3, global_allocation=True, max_ratio=0.6)
    )
    for g in plan.groups:
        assert g.kept >= math.ceil(g.size * 0.4 / 8) * 8 or g.kept == g.size


def test_unreachable_target_is_a_clear_error(yolov5s):
    with pytest.raises(PlanError, match="cannot be met"):
        plan_for(yolov5s, CompileOptions("yolov5s.yaml", macs=0.05, max_ratio=0.5))


@pytest.mark.parametrize("importance", ["l1", "l2", "bn", "random"])
def test_plan_is_deterministic_and_round_trips(tiny_model, importance):
    def make():
        return plan_for(
            prepared_for(tiny_model, 64),
            CompileOptions("t.yaml", macs=0.5, importance=importance),
        )

    first, second = make().to_json(), make().to_json()
    assert first == second
    assert PruningPlan.from_json(first).to_json() == first


def test_bn_importance_keeps_the_largest_scales(tiny_model):
    model = copy.deepcopy(tiny_model)
    bn = model.get_submodule("model.9.cv2.bn")  # SPPF's output: a conv + BN group of its own
    n = bn.num_features
    scales = torch.randperm(n, generator=torch.Generator().manual_seed(3)).float() + 1
    bn.weight.data = scales.clone()
    plan = plan_for(prepared_for(model, 64), CompileOptions("t", ratio=0.5, importance="bn"))
    group = next(g for g in plan.groups if g.id == "model.9.cv2.conv")
    assert group.keep == tuple(sorted(torch.topk(scales, group.kept).indices.tolist()))
    assert group.kept == n // 2


def test_malformed_plan_json():
    with pytest.raises(PlanError, match="not a yoloprune plan"):
        PruningPlan.from_json('{"format": "other"}', "p.json")
    with pytest.raises(PlanError, match="malformed plan JSON"):
        PruningPlan.from_json("{", "p.json")
