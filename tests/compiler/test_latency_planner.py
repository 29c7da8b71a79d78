import dataclasses
import math
import random

import pytest
import torch

from tests.helpers import needs_ultralytics
from yoloprune.compiler.latency_planner import (
    Bracket,
    LatencyModel,
    LatencySettings,
    _preferred,
    conv_geometry,
    importance_cost,
    latency_counts,
)
from yoloprune.compiler.pipeline import (
    CompileOptions,
    Prepared,
    mac_counter,
    plan_for,
    plan_request,
    prepare,
)
from yoloprune.compiler.planner import Target
from yoloprune.compiler.planners import PLANNERS, run_planner
from yoloprune.compiler.score import score_groups
from yoloprune.graphs.dependency import build_graph, channel_groups, conv_channels
from yoloprune.graphs.errors import PlanError, TargetUnreachable
from yoloprune.kernels.latency_table import LatencyTable, TableKey

KEY = TableKey("test", "macs", "fp32", 1, 1)
IMGSZ = 64


def macs_measurer(shape):
    """A 'runtime' whose conv time is its MACs: bilinear in (cin, cout), so interpolation
    between grid points is exact and the model must reproduce the MAC counter exactly."""
    out_h = (shape.height + 2 * shape.pad - shape.kernel) // shape.stride + 1
    out_w = (shape.width + 2 * shape.pad - shape.kernel) // shape.stride + 1
    return shape.cin // shape.groups * shape.cout * shape.kernel**2 * out_h * out_w


def sqrt_macs(shape):
    """A stand-in conv time: the square root of its MACs (small convs cost more per MAC)."""
    return math.sqrt(macs_measurer(shape))


def randomized_tiny(folder, imgsz: int) -> Prepared:
    """The tiny model with random BN (so channel scores differ), traced afresh."""
    import yaml

    from tests.helpers import randomized, tiny_cfg

    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg()))
    p = prepare(str(path), imgsz)
    model = randomized(p.model)
    graph = build_graph(model)
    return Prepared(model, p.info, imgsz, channel_groups(model, graph), graph)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return randomized_tiny(tmp_path_factory.mktemp("m"), IMGSZ)


@pytest.fixture(scope="module")
def macs_model(prepared, tmp_path_factory):
    table = LatencyTable(KEY, tmp_path_factory.mktemp("t") / "t.json", macs_measurer)
    geometry = conv_geometry(prepared.model, conv_channels(prepared.model, prepared.groups), IMGSZ)
    return LatencyModel(geometry, table, round_to=8, progress=False)


def test_prediction_equals_mac_count_for_any_plan(prepared, macs_model):
    counter = mac_counter(prepared)
    assert macs_model.predict() == pytest.approx(counter.macs())
    rng = random.Random(0)
    prunable = [g for g in prepared.groups if not g.protected]
    for _ in range(5):
        kept = {g.id: rng.randrange(1, g.size + 1) for g in prunable}
        assert macs_model.predict(kept) == pytest.approx(counter.macs(kept), rel=1e-9)


def test_calibration_scales_to_the_measured_whole_model(macs_model):
    full = macs_model.layers_ms()
    macs_model.calibrate(2 * full)
    try:
        assert macs_model.predict() == pytest.approx(2 * full)
    finally:
        macs_model.calibrate(full)


def test_greedy_meets_budget_keeps_importance_and_alignment(prepared, macs_model):
    scores = score_groups(prepared.model, prepared.graph, prepared.groups, "l2")
    budget = 0.5 * macs_model.predict()
    counts, predicted = latency_counts(
        prepared.groups, importance_cost(scores), macs_model, budget, 8, 0.8
    )
    assert predicted <= budget
    assert predicted == pytest.approx(macs_model.predict(counts))
    assert predicted > 0.4 * macs_model.predict()  # stops soon after the budget is met
    for g in prepared.groups:
        if g.protected:
            assert g.id not in counts
        elif counts[g.id] < g.size:
            assert counts[g.id] % 8 == 0 and counts[g.id] >= 0.2 * g.size
    looser, _ = latency_counts(
        prepared.groups, importance_cost(scores), macs_model, 0.75 * budget * 2, 8, 0.8
    )
    assert sum(looser.values()) >= sum(counts.values())


def test_impossible_budget_is_a_plan_error(prepared, macs_model):
    scores = score_groups(prepared.model, prepared.graph, prepared.groups, "l2")
    with pytest.raises(PlanError, match="cannot be met"):
        latency_counts(
            prepared.groups,
            importance_cost(scores),
            macs_model,
            0.01 * macs_model.predict(),
            8,
            0.8,
        )


def test_latency_targets_validate():
    with pytest.raises(PlanError, match="greater than 1"):
        Target("speedup", 0.9)
    with pytest.raises(PlanError, match="positive"):
        Target("latency_ms", 0)
    with pytest.raises(PlanError, match="give one target"):
        CompileOptions("m", macs=0.5, speedup=2.0).target()


@pytest.mark.timing
@pytest.mark.slow
def test_closed_loop_meets_the_budget_on_ort_cpu(tmp_path):
    """On the real runtime (ONNX Runtime CPU, one thread): the plan's measured latency lands
    within 10% of the goal, and the pruned model is measured faster than the original."""
    p = randomized_tiny(tmp_path, 160)
    settings = LatencySettings(
        runtime="ort", threads=1, table=tmp_path / "table.json", grid=(0.5, 1.0), runs=25
    )
    options = CompileOptions("tiny.yaml", speedup=1.3, threads=1)
    request = dataclasses.replace(plan_request(p, options), latency=settings)
    plan = run_planner(request, "latency")
    lat = plan.latency
    assert plan.allocation == "latency" and plan.target == {"kind": "speedup", "value": 1.3}
    assert lat["measured_speedup"] == pytest.approx(1.3, rel=0.10)
    assert 1 <= len(lat["rounds"]) <= settings.rounds
    assert (tmp_path / "table.json").is_file() and lat["table_entries"] > 0
    assert torch.isfinite(torch.tensor(lat["predicted_ms"])) and lat["predicted_ms"] > 0
    saved = tmp_path / "plan.json"
    plan.save(saved)
    replayed = plan_for(p, CompileOptions("tiny.yaml", plan=saved))
    assert replayed == plan  # the latency record round-trips with the plan


def test_plan_command_with_a_speedup_target_records_the_latency(tmp_path, capsys):
    import json

    import yaml

    from tests.helpers import tiny_cfg
    from yoloprune.compiler.cli import main

    model = tmp_path / "tiny.yaml"
    model.write_text(yaml.safe_dump(tiny_cfg()))
    table = tmp_path / "table.json"
    out = tmp_path / "plan.json"
    argv = ["plan", str(model), "--imgsz", "128", "--speedup", "1.1", "--latency-table", str(table)]
    assert main([*argv, "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["allocation"] == "latency" and plan["target"]["kind"] == "speedup"
    latency = plan["latency"]
    assert latency["runtime"] == "ort" and latency["table"] == str(table)
    assert latency["predicted_ms"] > 0 and latency["measured_ms"] > 0 and latency["rounds"]
    assert plan["macs_after"] < plan["macs_before"]
    entries = len(json.loads(table.read_text())["entries"])
    assert entries == latency["table_entries"] > 0
    # a second plan reuses the cached table: nothing new to measure
    assert main([*argv, "--out", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["latency"]["measured_now"] == 0
    assert main([*argv[:-4], "--speedup", "0.5", "--out", str(out)]) == 2
    assert "greater than 1" in capsys.readouterr().err


def test_compile_with_a_latency_budget_reports_predicted_and_measured(tmp_path):
    import json

    import yaml

    from tests.helpers import tiny_cfg
    from yoloprune.compiler.cli import main

    model = tmp_path / "tiny.yaml"
    model.write_text(yaml.safe_dump(tiny_cfg()))
    out = tmp_path / "out"
    argv = ["compile", str(model), "--imgsz", "128", "--out", str(out), "--bench-runs", "5"]
    argv += ["--latency-ms", "1000", "--latency-table", str(tmp_path / "t.json")]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    planned = report["plan"]["latency"]
    assert report["plan"]["target"] == {"kind": "latency_ms", "value": 1000.0}
    assert planned["goal_ms"] == 1000.0 and planned["measured_ms"] <= 1000.0
    assert "onnxruntime_cpu" in report["latency_ms"]  # re-measured by the bench step
    text = (out / "report.md").read_text()
    assert "Latency-aware plan on ort" in text and "Re-measured by the bench step" in text


def test_latency_aware_allocation_stops_at_the_macs_target(prepared, macs_model):
    scores = score_groups(prepared.model, prepared.graph, prepared.groups, "l2")
    counter = mac_counter(prepared)
    goal = 0.5 * counter.macs()
    counts, _ = latency_counts(
        prepared.groups, importance_cost(scores), macs_model, 0.0, 8, 0.8, macs_goal=(counter, goal)
    )
    assert 0.97 * goal <= counter.macs(counts) <= goal  # stops at the first step under it
    sizes = {g.id: g.size for g in prepared.groups}
    assert all(n % 8 == 0 or n == sizes[gid] for gid, n in counts.items())


def test_latency_aware_macs_target_is_reached_where_the_table_shows_no_saving(prepared, tmp_path):
    """A measured table can be flat or noisy (a step that saves no predicted time): under a
    MACs target such steps must still be taken, cheapest importance per MAC first, after every
    step that saves time. Here every conv times the same whatever its channels."""
    table = LatencyTable(KEY, tmp_path / "flat.json", lambda shape: 1.0)
    geometry = conv_geometry(prepared.model, conv_channels(prepared.model, prepared.groups), IMGSZ)
    flat = LatencyModel(geometry, table, round_to=8, progress=False)
    scores = score_groups(prepared.model, prepared.graph, prepared.groups, "l2")
    counter = mac_counter(prepared)
    goal = 0.6 * counter.macs()
    counts, predicted = latency_counts(
        prepared.groups, importance_cost(scores), flat, 0.0, 8, 0.8, macs_goal=(counter, goal)
    )
    assert counter.macs(counts) <= goal
    assert predicted == pytest.approx(flat.predict())  # nothing saved, as the table says
    with pytest.raises(PlanError, match="cannot be met"):  # a time budget stays impossible
        latency_counts(prepared.groups, importance_cost(scores), flat, 0.5 * flat.predict(), 8, 0.8)


def test_compile_option_latency_aware_plans_a_macs_target(tmp_path):
    p = randomized_tiny(tmp_path, IMGSZ)
    options = CompileOptions(
        "tiny.yaml", macs=0.6, latency_aware=True, threads=1, latency_table=tmp_path / "t.json"
    )
    plan = plan_for(p, options)
    assert plan.allocation == "latency" and plan.target == {"kind": "macs", "value": 0.6}
    # the table is measured here, so which step lands last varies; one step of this tiny model
    # removes at most ~8% of its MACs (the stem: 8 of 16 channels)
    assert 0.52 <= plan.macs_ratio <= 0.6
    assert plan.latency["table"] == str(tmp_path / "t.json") and (tmp_path / "t.json").exists()
    assert plan.latency["predicted_ms_uncalibrated"] > 0
    assert plan.latency["baseline_ms_uncalibrated"] > 0
    with pytest.raises(PlanError, match="--latency-aware plans a --macs target"):
        plan_for(p, CompileOptions("tiny.yaml", ratio=0.3, latency_aware=True))


@needs_ultralytics
def test_prediction_follows_depthwise_convs_as_their_group_shrinks(tmp_path):
    """YOLO11's head has depthwise convs: pruning their group shrinks their inputs, outputs and
    groups together, and the model must time them smaller (MACs-as-time stays exact)."""
    p = prepare("yolo11n.yaml", IMGSZ)
    convs = conv_channels(p.model, p.groups)
    depthwise = [c for c in convs if c.groups > 1 and c.out_group is not None]
    protected = {g.id for g in p.groups if g.protected}
    assert any(c.out_group not in protected for c in depthwise)
    table = LatencyTable(KEY, tmp_path / "t.json", macs_measurer)
    model = LatencyModel(conv_geometry(p.model, convs, IMGSZ), table, 8, progress=False)
    counter = mac_counter(p)
    rng = random.Random(0)
    prunable = [g for g in p.groups if not g.protected]
    for _ in range(3):  # counts a plan can hold: multiples of round_to, or the whole group
        kept = {g.id: rng.choice([*range(8, g.size, 8), g.size]) for g in prunable}
        assert model.predict(kept) == pytest.approx(counter.macs(kept), rel=1e-9)


@needs_ultralytics
@pytest.mark.parametrize("spec", ["yolo11n.yaml", "yolo26n.yaml"])
def test_latency_aware_plans_keep_split_halves_tied_and_meet_the_macs_target(tmp_path, spec):
    """A split block's halves step together in the knapsack (so stock ultralytics can load the
    pruned block), and the MACs target is still met: raising one half after the fact would
    overshoot it (0.60 and 0.54 of the MACs for yolo11s and yolo26s at --macs 0.5)."""
    p = prepare(spec, IMGSZ)
    table = LatencyTable(KEY, tmp_path / "t.json", macs_measurer)
    model = LatencyModel(conv_geometry(p.model, conv_channels(p.model, p.groups), IMGSZ), table, 8)
    scores = score_groups(p.model, p.graph, p.groups, "l2")
    counter = mac_counter(p)
    goal = 0.5 * counter.macs()
    counts, _ = latency_counts(
        p.groups, importance_cost(scores), model, 0.0, 8, 0.8, macs_goal=(counter, goal)
    )
    assert 0.97 * goal <= counter.macs(counts) <= goal
    ties: dict[str, set[int]] = {}
    for g in p.groups:
        if g.tie:
            ties.setdefault(g.tie, set()).add(counts[g.id])
    assert ties and all(len(kept) == 1 for kept in ties.values())
    assert any(counts[g.id] < g.size for g in p.groups if g.tie)  # halves were pruned


def test_the_latency_planner_times_plans_only_through_its_measure_callable(tmp_path):
    """The planner never runs a runtime itself: a stand-in measure whose 'latency' is the
    plan's MACs drives the closed loop, and every round it reports is that measure's."""
    p = randomized_tiny(tmp_path, IMGSZ)
    counter = mac_counter(p)
    full_macs, asked = counter.macs(), []

    def measure(plans):
        asked.append(sorted(plans))
        return {k: 10.0 * (v.macs_ratio if v else 1.0) for k, v in plans.items()}

    table = tmp_path / "t.json"
    options = CompileOptions("tiny.yaml", speedup=1.2, threads=1, latency_table=table)
    request = dataclasses.replace(plan_request(p, options), measure=measure)
    plan = run_planner(request, "latency")
    assert asked[0] == ["base"] and all(a == ["base", "pruned"] for a in asked[1:])
    lat = plan.latency
    assert lat["baseline_ms"] == 10.0 and len(lat["rounds"]) == len(asked) - 1
    assert lat["measured_ms"] == pytest.approx(10.0 * plan.macs_ratio)
    assert plan.macs_before == full_macs
    assert set(PLANNERS) >= {"uniform", "global", "latency", "latency-aware", "unstructured"}


def test_a_plan_meeting_the_goal_beats_one_missing_it():
    """--speedup 2 asks for at least 2x: of two plans 15 % either side of the goal the one
    meeting it is kept; among plans meeting it the least pruned, among misses the fastest."""
    goal, tolerance = 10.0, 0.03
    assert _preferred(8.5, 11.5, goal, tolerance) and not _preferred(11.5, 8.5, goal, tolerance)
    assert _preferred(10.2, 9.0, goal, tolerance)  # within the tolerance counts as meeting
    assert _preferred(9.5, 8.0, goal, tolerance) and not _preferred(8.0, 9.5, goal, tolerance)
    assert _preferred(11.0, 12.0, goal, tolerance) and not _preferred(12.0, 11.0, goal, tolerance)


def test_corrected_budgets_stay_between_the_too_fast_and_the_too_slow():
    bracket = Bracket()
    # measured twice as fast as the goal: the budget doubles (no bracket yet)
    assert bracket.next_budget(10.0, 5.0, 10.0) == pytest.approx(20.0)
    # 20 measured too slow: the correction (20 * 10 / 10.5) lies inside (10, 20), taken
    assert bracket.next_budget(20.0, 10.5, 10.0) == pytest.approx(20.0 * 10 / 10.5)
    # 19 measured far too slow (a step): the correction 9.5 would leave (10, 19), so the
    # geometric mean of the bracket instead
    assert bracket.next_budget(19.0, 20.0, 10.0) == pytest.approx((10.0 * 19.0) ** 0.5)
    assert (bracket.too_fast, bracket.too_slow) == (10.0, 19.0)


def test_the_closed_loop_keeps_the_slowest_plan_meeting_the_goal(tmp_path, monkeypatch):
    """A stand-in runtime whose time falls in a step (aligned counts crossing a kernel
    boundary): 0.81 of the baseline's while the square root of the MACs kept is at least
    0.75, 0.70 below. The plan kept is the slowest one measured at or under the goal, and every
    corrected budget lies inside the bracket of the budgets before it. The per-layer table is a
    stand-in too (each conv's time the square root of its MACs, so its predictions follow the
    same square root), so the rounds do not depend on this machine's timing."""
    import yoloprune.kernels.latency_table as latency_table

    monkeypatch.setattr(latency_table, "ort_measurer", lambda *args, **kwargs: sqrt_macs)
    p = randomized_tiny(tmp_path, IMGSZ)

    def measure(plans):
        step = {True: 0.81, False: 0.70}
        return {
            k: 10.0 * (step[math.sqrt(v.macs_ratio) >= 0.75] if v else 1.0)
            for k, v in plans.items()
        }

    options = CompileOptions("tiny.yaml", speedup=1.3, threads=1, latency_table=tmp_path / "t.json")
    request = dataclasses.replace(plan_request(p, options), measure=measure)
    plan = run_planner(request, "latency")
    lat, goal = plan.latency, 10.0 / 1.3
    measured = [r["measured_ms"] for r in lat["rounds"]]
    meeting = [m for m in measured if m <= goal * 1.03]
    assert meeting and any(m > goal * 1.03 for m in measured), "rounds on both sides"
    assert lat["measured_ms"] == max(meeting)
    # the rule before 2026-12-01 (closest either side) would have kept a plan missing the goal
    assert min(measured, key=lambda m: abs(m / goal - 1)) > goal * 1.03
    too_fast, too_slow, bracketed = 0.0, math.inf, 0
    for r in lat["rounds"]:
        assert too_fast < r["budget_ms"] < too_slow
        bracketed += too_slow < math.inf and too_fast > 0
        if r["measured_ms"] > goal:
            too_slow = min(too_slow, r["budget_ms"])
        else:
            too_fast = max(too_fast, r["budget_ms"])
    assert bracketed  # some round was planned inside a bracket of both sides


def test_error_priced_steps_spare_the_group_whose_measured_error_is_high(prepared, macs_model):
    """With --allocation sensitivity the knapsack prices a step by the error the group's curve
    adds, not by importance: the group importance pruned most, given a curve a thousand times
    steeper than the others', is left whole, and the MACs target is still met."""
    from yoloprune.compiler.allocation import LEVELS, error_cost

    counter = mac_counter(prepared)
    goal = (counter, 0.6 * counter.macs())
    scores = score_groups(prepared.model, prepared.graph, prepared.groups, "l2")
    by_importance, _ = latency_counts(
        prepared.groups, importance_cost(scores), macs_model, 0.0, 8, 0.8, macs_goal=goal
    )
    prunable = [g for g in prepared.groups if not g.protected and not g.tie]
    precious = max(prunable, key=lambda g: g.size - by_importance[g.id])
    assert by_importance[precious.id] < precious.size  # importance does prune it
    sizes = {g.id: g.size for g in prepared.groups}
    curves = {
        g.id: {round(g.size * f): (1000.0 if g is precious else 1.0) * (1 - f) for f in LEVELS}
        for g in prepared.groups
        if not g.protected
    }
    by_error, _ = latency_counts(
        prepared.groups, error_cost(curves, sizes), macs_model, 0.0, 8, 0.8, macs_goal=goal
    )
    assert by_error[precious.id] == precious.size
    assert counter.macs(by_error) <= goal[1]


def test_latency_aware_plans_can_be_priced_by_measured_sensitivity(tmp_path):
    from tests.compiler.test_allocation import _image_files

    p = randomized_tiny(tmp_path, IMGSZ)
    folder = tmp_path / "images"
    folder.mkdir()
    _image_files(folder, 3)
    options = CompileOptions(
        "tiny.yaml", macs=0.6, latency_aware=True, allocation="sensitivity", threads=1,
        calib_images=folder, latency_table=tmp_path / "t.json", round_to=8,
    )  # fmt: skip
    assert options.settings.planner == "latency-aware" and options.settings.group_sensitivity
    plan = plan_for(p, options)
    assert plan.allocation == "latency" and plan.sensitivity["images"] == 3
    assert plan.max_ratio == 0.6 and plan.macs_ratio <= 0.6
    assert set(plan.sensitivity["errors"]) == {g.id for g in p.groups if not g.protected}
    floor = {g.id: math.ceil(0.4 * g.size / 8) * 8 for g in p.groups}
    assert all(len(g.keep) >= min(floor[g.id], g.size) for g in plan.groups)


@pytest.mark.parametrize("blocks_allowed", [True, False])
def test_a_missed_macs_target_suggests_drop_blocks_only_where_it_may_be_given(
    prepared, macs_model, blocks_allowed
):
    """--macs 0.05 at --max-ratio 0.5 cannot be met; the refusal names --max-ratio, and
    --drop-blocks only where the plan may take it (not with measured-error pricing)."""
    counter = mac_counter(prepared)
    scores = score_groups(prepared.model, prepared.graph, prepared.groups, "l2")
    with pytest.raises(TargetUnreachable, match="raise --max-ratio") as caught:
        latency_counts(
            prepared.groups, importance_cost(scores), macs_model, 0.0, 8, 0.5,
            macs_goal=(counter, 0.05 * counter.macs()), blocks_allowed=blocks_allowed,
        )  # fmt: skip
    assert ("--drop-blocks" in str(caught.value)) is blocks_allowed
