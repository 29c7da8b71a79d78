"""Depth pruning in latency-aware plans (--drop-blocks): the knapsack removes whole residual
blocks where that saves the most time per importance lost; apply, save and reload follow."""

import json
from dataclasses import replace

import pytest
import torch

from tests.compiler.test_latency_planner import KEY, macs_measurer
from tests.compiler.test_planner import prepared_for
from tests.graphs.test_blocks import silence_branch
from tests.helpers import images, outputs, zero_removed_channels
from yoloprune.compiler.apply import apply_plan
from yoloprune.compiler.latency_planner import (
    LatencyModel,
    _counts_plan,
    conv_geometry,
    importance_cost,
    latency_counts,
)
from yoloprune.compiler.pipeline import CompileOptions, mac_counter, plan_for, plan_request
from yoloprune.compiler.score import score_groups
from yoloprune.graphs.blocks import droppable_blocks, dropped_blocks, hidden_group
from yoloprune.graphs.checkpoint import load_model, save_pruned
from yoloprune.graphs.dependency import conv_channels
from yoloprune.graphs.errors import PlanError
from yoloprune.graphs.plan import PruningPlan
from yoloprune.kernels.latency_table import LatencyTable

IMGSZ = 64


@pytest.fixture(scope="module")
def prepared(tiny_model):
    return prepared_for(tiny_model, IMGSZ)


@pytest.fixture(scope="module")
def macs_model(prepared, tmp_path_factory):
    table = LatencyTable(KEY, tmp_path_factory.mktemp("t") / "t.json", macs_measurer)
    geometry = conv_geometry(prepared.model, conv_channels(prepared.model, prepared.groups), IMGSZ)
    return LatencyModel(geometry, table, round_to=8, progress=False)


def deep_counts(prepared, macs_model, droppable):
    scores = score_groups(prepared.model, prepared.graph, prepared.groups, "l2")
    counter = mac_counter(prepared)
    goal = (counter, 0.10 * counter.macs())  # past what the width floors alone allow
    return (
        scores,
        counter,
        latency_counts(
            prepared.groups,
            importance_cost(scores),
            macs_model,
            0.0,
            8,
            0.8,
            macs_goal=goal,
            droppable=droppable,
        ),
    )


def test_knapsack_drops_blocks_only_where_allowed(prepared, macs_model):
    droppable = droppable_blocks(prepared.model, prepared.groups)
    with pytest.raises(PlanError, match="cannot be reached"):
        deep_counts(prepared, macs_model, {})  # width alone stops at the floors
    _, counter, (counts, _) = deep_counts(prepared, macs_model, droppable)
    emptied = {gid for gid, n in counts.items() if n == 0}
    assert emptied and emptied <= set(droppable)
    assert counter.macs(counts) <= 0.10 * counter.macs()
    # MACs-as-time: each removed block's convs are gone from the prediction and the count
    assert macs_model.predict(counts) == pytest.approx(counter.macs(counts), rel=1e-9)


def dropping_plan(prepared, macs_model) -> PruningPlan:
    droppable = droppable_blocks(prepared.model, prepared.groups)
    _, _, (counts, _) = deep_counts(prepared, macs_model, droppable)
    options = CompileOptions("tiny.yaml", macs=0.10, latency_aware=True, drop_blocks=True)
    return _counts_plan(plan_request(prepared, options), counts, droppable)


def test_exact_surgery_with_blocks_dropped(prepared, macs_model):
    """Zero every channel the plan removes and silence every block it drops: the pruned
    model's outputs equal that model's; with live channels and blocks they do not."""
    plan = dropping_plan(prepared, macs_model)
    assert plan.drop_blocks
    model = prepared.model
    zeroed = zero_removed_channels(
        model, replace(plan, groups=tuple(g for g in plan.groups if g.kept > 0))
    )
    for block in plan.drop_blocks:
        zeroed = silence_branch(zeroed, block)
    pruned = apply_plan(zeroed, plan)
    assert dropped_blocks(pruned) == plan.drop_blocks
    x = images(2, IMGSZ)
    expected, actual = outputs(zeroed, x), outputs(pruned, x)
    assert torch.allclose(actual, expected, atol=1e-5, rtol=0), (actual - expected).abs().max()
    live = outputs(apply_plan(model, plan), x)
    assert (live - outputs(model, x)).abs().max() > 1e-2
    counted = mac_counter(prepared_for(pruned, IMGSZ)).macs()
    assert counted == plan.macs_after  # the MAC count of the dropped model is the plan's


def test_plan_with_dropped_blocks_round_trips_and_old_plans_load(prepared, macs_model):
    plan = dropping_plan(prepared, macs_model)
    assert PruningPlan.from_json(plan.to_json()) == plan
    old = json.loads(plan.to_json())
    del old["drop_blocks"]  # a plan written before depth pruning
    old["groups"] = [g for g in old["groups"] if g["keep"]]
    assert PruningPlan.from_json(json.dumps(old)).drop_blocks == ()


def test_apply_refuses_a_plan_whose_emptied_groups_and_blocks_disagree(prepared, macs_model):
    plan = dropping_plan(prepared, macs_model)
    with pytest.raises(PlanError, match="must be exactly the hidden groups of drop_blocks"):
        apply_plan(prepared.model, replace(plan, drop_blocks=plan.drop_blocks[1:]))


def test_dropped_blocks_survive_save_and_reload(prepared, macs_model, tmp_path):
    plan = dropping_plan(prepared, macs_model)
    pruned = apply_plan(prepared.model, plan)
    path = tmp_path / "pruned.pt"
    save_pruned(pruned, prepared.info, path)
    assert torch.load(path, weights_only=True)["dropped_blocks"] == list(plan.drop_blocks)
    reloaded, _ = load_model(path)
    assert dropped_blocks(reloaded) == plan.drop_blocks
    x = images(2, IMGSZ)
    assert torch.equal(outputs(reloaded, x), outputs(pruned, x))


def test_drop_blocks_needs_a_latency_aware_plan(prepared):
    with pytest.raises(PlanError, match="--drop-blocks needs a latency-aware plan"):
        plan_for(prepared, CompileOptions("m.yaml", macs=0.5, drop_blocks=True))


def test_cli_plan_with_drop_blocks_records_them(tmp_path):
    """End to end through the CLI on the real runtime's table: a deep MACs target that width
    alone cannot reach (max ratio 0.5) is met by removing blocks, and the plan lists them."""
    import yaml

    from tests.helpers import tiny_cfg
    from yoloprune.compiler.cli import main

    model = tmp_path / "tiny.yaml"
    model.write_text(yaml.safe_dump(tiny_cfg()))
    out = tmp_path / "plan.json"
    argv = ["plan", str(model), "--imgsz", "64", "--macs", "0.25", "--latency-aware"]
    argv += ["--max-ratio", "0.5", "--latency-table", str(tmp_path / "t.json"), "--out", str(out)]
    assert main(argv) == 2  # width alone: the floors stop it
    assert main([*argv, "--drop-blocks"]) == 0
    plan = PruningPlan.load(out)
    assert plan.drop_blocks and plan.macs_ratio <= 0.25
    assert {g.id for g in plan.groups if g.kept == 0} == {hidden_group(b) for b in plan.drop_blocks}


def test_compile_with_drop_blocks_exports_reports_and_reloads(tmp_path):
    import yaml

    from tests.helpers import tiny_cfg
    from yoloprune.compiler.cli import main

    model = tmp_path / "tiny.yaml"
    model.write_text(yaml.safe_dump(tiny_cfg()))
    out = tmp_path / "out"
    argv = ["compile", str(model), "--imgsz", "64", "--macs", "0.25", "--latency-aware"]
    argv += ["--max-ratio", "0.5", "--drop-blocks", "--latency-table", str(tmp_path / "t.json")]
    assert main([*argv, "--out", str(out), "--no-bench"]) == 0
    report = json.loads((out / "report.json").read_text())
    blocks = report["plan"]["drop_blocks"]
    assert blocks and report["parity"]["ok"]
    assert "Residual blocks removed whole" in (out / "report.md").read_text()
    reloaded, _ = load_model(out / "tiny-pruned.pt")
    assert list(dropped_blocks(reloaded)) == blocks


def test_iterative_compile_with_drop_blocks_composes_the_dropped_blocks(tmp_path):
    """--steps with --drop-blocks: each step may drop blocks of the current model; the composed
    plan lists all of them, replays on the original, and the checkpoint re-applies them."""
    import yaml

    from tests.helpers import tiny_cfg
    from yoloprune.compiler.cli import main

    model = tmp_path / "tiny.yaml"
    model.write_text(yaml.safe_dump(tiny_cfg()))
    out = tmp_path / "out"
    argv = ["compile", str(model), "--imgsz", "64", "--macs", "0.25", "--latency-aware"]
    argv += ["--max-ratio", "0.5", "--drop-blocks", "--latency-table", str(tmp_path / "t.json")]
    assert main([*argv, "--steps", "2", "--out", str(out), "--no-bench"]) == 0
    report = json.loads((out / "report.json").read_text())
    blocks = report["plan"]["drop_blocks"]
    assert blocks and report["parity"]["ok"] and report["plan"]["target"]["steps"] == 2
    reloaded, _ = load_model(out / "tiny-pruned.pt")
    assert list(dropped_blocks(reloaded)) == blocks
    replayed = tmp_path / "replayed"
    assert (
        main(
            [
                "compile",
                str(model),
                "--imgsz",
                "64",
                "--plan",
                str(out / "tiny-plan.json"),
                "--out",
                str(replayed),
                "--no-bench",
            ]
        )
        == 0
    )
    again = json.loads((replayed / "report.json").read_text())
    assert again["plan"]["drop_blocks"] == blocks
    assert again["params"]["after"] == report["params"]["after"]
