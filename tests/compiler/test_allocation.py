"""--allocation sensitivity: the measurement equals real pruning, the allocation spends it."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json

import pytest
import torch
from torch import nn

from tests.helpers import images
from yoloprune.compiler.allocation import (
    LEVELS,
    GroupSensitivity,
    _Runner,
    allocate,
    curve_error,
    measure,
    removals,
    removed_channels,
)
from yoloprune.compiler.apply import apply_plan
from yoloprune.compiler.planner import Constraints, MacCounter, Target, plan_from_counts
from yoloprune.compiler.score import score_groups
from yoloprune.graphs.dependency import (
    ChannelGroup,
    ConvChannels,
    build_graph,
    channel_groups,
    head_convs,
)
from yoloprune.graphs.errors import PlanError, TargetUnreachable
from yoloprune.graphs.plan import PruningPlan


@pytest.fixture(scope="module")
def traced(tiny_model):
    """A copy of the tiny YOLOv5 with its graph and groups (the copy is measured in place)."""
    model = copy.deepcopy(tiny_model)
    graph = build_graph(model)
    return model, graph, channel_groups(model, graph)


def _heads(model, batch):
    got = []
    hooks = [c.register_forward_hook(lambda _, __, out: got.append(out)) for c in head_convs(model)]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return got


def _same_heads(a: nn.Module, b: nn.Module) -> bool:
    batch = images(2, seed=9)
    return all(torch.equal(x, y) for x, y in zip(_heads(a, batch), _heads(b, batch), strict=True))


def test_a_run_from_a_layer_on_cached_outputs_equals_the_whole_forward(tiny_model):
    runner = _Runner(tiny_model)
    batch = images(2, seed=3)
    with torch.no_grad():
        whole = runner.run(batch)
        for start in (1, 5, len(runner.layers) - 1):
            again = runner.run(batch, start, whole)
            assert len(again) == len(whole)
            for a, b in zip(again[start:], whole[start:], strict=True):
                if isinstance(b, torch.Tensor):
                    assert torch.equal(a, b)


@pytest.mark.parametrize("which", [0, 3, -4])  # the stem, a C3's group, a head-side group
def test_removing_a_groups_channels_by_its_readers_equals_pruning_it(tiny_model, traced, which):
    """Zeroing the weights that read the removed channels (no mean added back) gives exactly
    the head outputs of the model with that group physically pruned."""
    model, graph, groups = traced
    prunable = [g for g in groups if not g.protected]
    group = prunable[which]
    keep = group.size // 2
    scores = {g.id: torch.arange(g.size, 0, -1).float() for g in prunable}  # keeps the first half
    counts = {g.id: g.size for g in prunable} | {group.id: keep}
    counter = MacCounter([], {})
    plan = plan_from_counts(
        "tiny", 64, prunable, scores, counts, counter, Target("ratio", 0.5), Constraints(),
        allocation="uniform", importance="test",
    )  # fmt: skip
    batch = images(2, seed=4)
    pruned = _heads(apply_plan(tiny_model, plan), batch)
    readers = removals(model, graph, group)
    zeros = {r.conv: torch.zeros(r.conv.in_channels) for r in readers}
    dropped = [(r.conv, r.inputs[r.roots >= keep]) for r in readers]
    with removed_channels(dropped, zeros):
        masked = _heads(model, batch)
    for a, b in zip(masked, pruned, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert _same_heads(tiny_model, model)  # restored


def test_the_mean_added_back_is_a_constant_channels_whole_contribution():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 1, bias=False)
    x = torch.randn(2, 4, 5, 5)
    x[:, 2] = 0.7  # channel 2 carries a constant
    wanted = conv(x)
    with removed_channels([(conv, torch.tensor([2]))], {conv: torch.tensor([0.0, 0.0, 0.7, 0.0])}):
        got = conv(x)
        assert torch.all(conv.weight[:, 2] == 0)
    torch.testing.assert_close(got, wanted)
    torch.testing.assert_close(conv(x), wanted)  # restored


def test_each_group_is_measured_at_every_level_and_more_removed_costs_more(tiny_model, traced):
    model, graph, groups = traced
    scores = score_groups(model, graph, groups, "l2")
    curves = measure(model, graph, groups, scores, [images(4, seed=5)], progress=False)
    prunable = [g for g in groups if not g.protected]
    assert set(curves) == {g.id for g in prunable}
    for g in prunable:
        curve = curves[g.id]
        expected = {max(1, round(g.size * f)) for f in LEVELS} - {g.size}
        assert set(curve) == expected
        assert all(e >= 0 for e in curve.values())
    # a random model on noise: not every group's curve rises, most do
    rising = [curves[g.id][min(curves[g.id])] > curves[g.id][max(curves[g.id])] for g in prunable]
    assert sum(rising) >= 0.8 * len(rising)
    assert _same_heads(tiny_model, model)  # restored


def test_the_curve_is_linear_between_measured_points_and_zero_when_whole():
    curve = {48: 0.1, 32: 0.3, 16: 0.7}
    assert curve_error(curve, 64, 64) == 0.0
    assert curve_error(curve, 64, 32) == pytest.approx(0.3)
    assert curve_error(curve, 64, 56) == pytest.approx(0.05)
    assert curve_error(curve, 64, 24) == pytest.approx(0.5)
    assert curve_error(curve, 64, 8) == pytest.approx(0.9)  # along the last segment


def _chain(sizes: dict[str, int], tie: dict[str, str] | None = None):
    """Groups a, b, ... in a chain of 1x1 convs on a 1x1 map (MACs = products of neighbours)."""
    tie = tie or {}
    groups = [ChannelGroup(g, n, (), tie=tie.get(g, "")) for g, n in sizes.items()]
    names = list(sizes)
    convs = [ConvChannels(names[0], names[0], sizes[names[0]], ((None, 16, 1),), 1, 1)]
    for prev, name in itertools.pairwise(names):
        convs.append(ConvChannels(name, name, sizes[name], ((prev, sizes[prev], 1),), 1, 1))
    return groups, MacCounter(convs, {c.name: 1 for c in convs})


def test_the_allocation_removes_channels_where_they_cost_least_per_mac():
    groups, counter = _chain({"a": 256, "b": 256, "c": 256})
    curves = {
        "a": {192: 1.0, 128: 2.0, 64: 3.0},  # costly
        "b": {192: 1e-4, 128: 2e-4, 64: 3e-4},  # cheap
        "c": {192: 1e-3, 128: 2e-3, 64: 3e-3},
    }
    c = Constraints(round_to=8, max_ratio=0.6)
    for goal, b in ((0.6, 152), (0.4, 104)):
        counts = allocate(groups, curves, counter, Target("macs", goal), c)
        assert abs(counter.macs(counts) / counter.macs() / goal - 1) <= 0.03
        assert counts["a"] == 256 and counts["b"] == b
        assert (counts["c"] == 256) == (goal == 0.6)  # next in line once b is at its floor
        assert all(n % 8 == 0 for n in counts.values())
    # b's floor: max_ratio 0.6 leaves ceil(102.4) rounded up to 8


def test_tied_groups_step_together_and_a_ratio_target_counts_channels():
    groups, counter = _chain({"a": 32, "b": 32, "c": 64}, tie={"a": "t", "b": "t"})
    curves = {g: {24: 0.1, 16: 0.2, 8: 0.3} for g in ("a", "b")} | {"c": {48: 1, 32: 2, 16: 3}}
    counts = allocate(groups, curves, counter, Target("ratio", 0.25), Constraints(8, 0.8))
    assert counts["a"] == counts["b"] < 32 and counts["c"] == 64
    assert sum(counts.values()) == 96  # 25 % of 128 channels removed


def test_an_unreachable_target_says_which_limits_bind():
    groups, counter = _chain({"a": 64, "b": 64})
    curves = {g: {48: 1, 32: 2, 16: 3} for g in ("a", "b")}
    with pytest.raises(TargetUnreachable, match=r"--allocation sensitivity.*--max-ratio 0\.2"):
        allocate(groups, curves, counter, Target("macs", 0.3), Constraints(8, 0.2))


def test_the_plan_records_the_measurement_and_it_round_trips(tiny_model, traced, tmp_path):
    model, graph, groups = traced
    files = _image_files(tmp_path, 3)
    sensitivity = GroupSensitivity(files, 64, progress=False)
    scores = score_groups(model, graph, groups, "l2")
    curves = sensitivity(model, graph, groups, scores)
    assert sensitivity(model, graph, groups, scores) is curves  # measured once
    record = sensitivity.record(curves)
    assert record["images"] == 3 and record["levels"] == list(LEVELS)
    prunable = [g for g in groups if not g.protected]
    plan = plan_from_counts(
        "tiny", 64, prunable, scores, {g.id: g.size for g in prunable}, MacCounter([], {}),
        Target("macs", 0.5), Constraints(), allocation="sensitivity", importance="l2",
    )  # fmt: skip
    plan = dataclasses.replace(plan, sensitivity=record, macs_before=100, macs_after=50)
    plan = PruningPlan.from_json(plan.to_json())
    assert plan.sensitivity == record
    bad = json.loads(plan.to_json())
    bad["sensitivity"]["errors"][prunable[0].id] = {"half": 0.1}
    with pytest.raises(PlanError, match=r"sensitivity\.errors"):
        PruningPlan.from_json(json.dumps(bad))


def _image_files(folder, count: int):
    from PIL import Image

    generator = torch.Generator().manual_seed(7)
    paths = []
    for i in range(count):
        pixels = (torch.rand(48, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()
        path = folder / f"{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def test_no_images_is_refused():
    with pytest.raises(PlanError, match="no calibration images"):
        GroupSensitivity([], 64)


def test_plans_at_other_targets_reuse_the_measurement(tiny_model, tmp_path, monkeypatch):
    """A sweep's points (and --round-to auto's candidates) plan on one prepared model: the
    sensitivity is measured once, and each plan meets its own target."""
    from tests.compiler.test_planner import prepared_for
    from yoloprune.compiler import allocation
    from yoloprune.compiler.pipeline import CompileOptions, plan_for

    calls = []
    real = allocation.measure
    monkeypatch.setattr(allocation, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    prepared = prepared_for(copy.deepcopy(tiny_model), 64)
    folder = tmp_path / "images"
    folder.mkdir()
    _image_files(folder, 3)
    plans = []
    for macs in (0.7, 0.5):
        options = CompileOptions(
            "m.yaml", imgsz=64, macs=macs, calib_images=folder, allocation="sensitivity"
        )
        plans.append(plan_for(prepared, options))
        assert abs(plans[-1].macs_ratio / macs - 1) <= 0.03
    assert len(calls) == 1 and plans[0].sensitivity == plans[1].sensitivity
    assert plans[0].sensitivity["images"] == 3  # all there are (the default asks for 32)
    assert plans[0].alignment is not None  # --round-to auto chose among candidates
    # ... and they were sensitivity plans (the real plan's speed timed), from the same curves
    assert plans[0].alignment["accuracy_check"].startswith("sensitivity plans at macs 0.7")
    # a given count is honoured even where reconstruction reads fewer images
    options = CompileOptions(
        "m.yaml", imgsz=64, macs=0.5, calib_images=folder, allocation="sensitivity",
        reconstruct_images=2, allocation_images=3,
    )  # fmt: skip
    assert plan_for(prepared, options).sensitivity["images"] == 3
    assert len(calls) == 1  # the same three images as above: the measurement is reused
