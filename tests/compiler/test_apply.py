"""Exact surgery: removing channels that carry zeros leaves outputs unchanged."""

import pytest
import torch
from torch import nn

from tests.compiler.test_planner import prepared_for
from tests.helpers import head_outputs, images, outputs, randomized, zero_removed_channels
from yoloprune.compiler.apply import apply_plan
from yoloprune.compiler.pipeline import CompileOptions, plan_for
from yoloprune.graphs.checkpoint import load_model
from yoloprune.graphs.errors import PlanError
from yoloprune.graphs.plan import GroupPlan, PruningPlan


def check_exact_surgery(model, options, imgsz=64, batch=2):
    plan = plan_for(prepared_for(model, imgsz), options)
    assert any(g.pruned for g in plan.groups)
    zeroed = zero_removed_channels(model, plan)
    pruned = apply_plan(zeroed, plan)
    x = images(batch, imgsz)
    (decoded_expected, expected), (decoded_actual, actual) = (
        head_outputs(zeroed, x),
        head_outputs(pruned, x),
    )
    assert torch.allclose(actual, expected, atol=1e-5, rtol=0), (actual - expected).abs().max()
    assert torch.allclose(decoded_actual, decoded_expected, atol=1e-5, rtol=1e-5)
    # Negative control: the same surgery on live channels must change the outputs, or this
    # test could not fail.
    live = outputs(apply_plan(model, plan), x)
    assert (live - outputs(model, x)).abs().max() > 1e-2
    # The zeroing itself changed the model: the channels were live before.
    assert (expected - outputs(model, x)).abs().max() > 1e-2
    return plan, pruned


@pytest.mark.parametrize(
    "options",
    [
        CompileOptions("t", macs=0.5),
        CompileOptions("t", ratio=0.5, importance="random", global_allocation=True, round_to=8),
        CompileOptions("t", macs=0.3, importance="bn", global_allocation=True),
    ],
    ids=["uniform-macs", "global-random", "global-bn"],
)
def test_exact_surgery_tiny(tiny_model, options):
    check_exact_surgery(tiny_model, options)


def test_exact_surgery_v50_blocks(tiny_v50_model):
    """Focus, BottleneckCSP (shared BN over a concat of plain convs), SPP, LeakyReLU."""
    check_exact_surgery(tiny_v50_model, CompileOptions("t", ratio=0.5, importance="random"))


@pytest.mark.slow
def test_exact_surgery_yolov5s():
    model, _ = load_model("yolov5s.yaml")
    check_exact_surgery(randomized(model), CompileOptions("yolov5s.yaml", macs=0.5), batch=1)


def test_interface_is_unchanged(tiny_model):
    plan = plan_for(prepared_for(tiny_model, 64), CompileOptions("t", macs=0.4))
    pruned = apply_plan(tiny_model, plan)
    x = images()
    with torch.no_grad():
        (d0, r0), (d1, r1) = tiny_model(x), pruned(x)
    assert d0.shape == d1.shape and [r.shape for r in r0] == [r.shape for r in r1]
    assert torch.equal(pruned.detect.stride, tiny_model.detect.stride)
    assert torch.equal(pruned.detect.anchors, tiny_model.detect.anchors)
    assert pruned.names == tiny_model.names
    # A plain dense model: ordinary modules, no masks, hooks or torch-pruning objects left.
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in pruned.modules())
    assert {type(m).__module__.split(".")[0] for m in pruned.modules()} <= {"yoloprune", "torch"}
    assert sum(p.numel() for p in pruned.parameters()) < sum(
        p.numel() for p in tiny_model.parameters()
    )


def test_apply_leaves_the_input_model_untouched(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    apply_plan(tiny_model, plan_for(prepared_for(tiny_model, 64), CompileOptions("t", macs=0.5)))
    after = tiny_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_replayed_plan_gives_the_same_model(tiny_model):
    plan = plan_for(prepared_for(tiny_model, 64), CompileOptions("t", macs=0.5))
    replayed = PruningPlan.from_json(plan.to_json())
    x = images()
    assert torch.equal(
        outputs(apply_plan(tiny_model, plan), x), outputs(apply_plan(tiny_model, replayed), x)
    )


def test_plan_for_another_model_is_refused(tiny_model, tiny_v50_model):
    plan = plan_for(prepared_for(tiny_model, 64), CompileOptions("t", macs=0.5))
    with pytest.raises(PlanError, match="plan does not match the model"):
        apply_plan(tiny_v50_model, plan)


def test_bad_indices_are_refused(tiny_model):
    plan = plan_for(prepared_for(tiny_model, 64), CompileOptions("t", macs=0.5))
    g = plan.groups[0]
    broken = PruningPlan(**{**plan.__dict__, "groups": (GroupPlan(g.id, g.size, (0, 0, g.size)),)})
    with pytest.raises(PlanError, match="distinct"):
        apply_plan(tiny_model, broken)


def test_pruned_convs_are_plain_conv2d(tiny_model):
    pruned = apply_plan(
        tiny_model, plan_for(prepared_for(tiny_model, 64), CompileOptions("t", macs=0.5))
    )
    for m in pruned.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape == (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean.shape == (m.num_features,)


def test_composed_plans_equal_sequential_application(tiny_model):
    first = plan_for(prepared_for(tiny_model, 64), CompileOptions("t", ratio=0.25))
    once = apply_plan(tiny_model, first)
    second = plan_for(prepared_for(once, 64), CompileOptions("t", ratio=0.25, importance="random"))
    twice = apply_plan(once, second)
    composed = first.then(second)
    direct = apply_plan(tiny_model, composed)
    x = images()
    assert torch.equal(outputs(direct, x), outputs(twice, x))  # same channels, same weights
    assert composed.macs_after == second.macs_after
    with pytest.raises(PlanError, match="expects"):
        second.then(first)
