import dataclasses

import numpy as np
import pytest

from tests.compiler.test_planner import prepared_for
from yoloprune.compiler import alignment, report
from yoloprune.compiler.options import CompileOptions
from yoloprune.compiler.pipeline import plan_for
from yoloprune.graphs.errors import PlanError, TargetUnreachable
from yoloprune.graphs.plan import PruningPlan
from yoloprune.kernels import latency_table
from yoloprune.kernels.alignment import BANDS, ChainTable


@pytest.fixture
def profile(monkeypatch, tmp_path):
    """Write this machine's alignment profile (threads 1) with times ``ms(shape)``."""
    monkeypatch.setattr(latency_table, "DEFAULT_CACHE", tmp_path)

    def write(ms):
        table = latency_table.open_table("ort", threads=1, kind=ChainTable)
        table.entries = {s.key(): ms(s) for band in BANDS for s in band.shapes()}
        table.save()

    return write


def off_block(block: int, penalty: float):
    return lambda s: s.macs() * 1e-9 * (penalty if s.channels % block else 1.0)


def model_off_block(block: int, penalty: float):
    """Whole-model times: MACs, ``penalty`` times slower where a pruned count is off ``block``."""

    def measure(plans: dict) -> dict:
        return {
            name: plan.macs_after
            * (penalty if any(g.kept % block for g in plan.groups if g.pruned) else 1.0)
            for name, plan in plans.items()
        }

    return measure


@pytest.fixture
def timing(monkeypatch):
    """Time ``--round-to auto``'s candidate models with ``measure(plans)``."""
    from yoloprune.compiler import pipeline

    def use(measure):
        monkeypatch.setattr(pipeline, "alignment_measure", lambda prepared, settings: measure)

    return use


@pytest.fixture
def prepared(tiny_model):
    return prepared_for(tiny_model, 64)


def test_a_16_channel_block_is_timed_and_chosen(timing, prepared, tmp_path):
    timing(model_off_block(16, 1.5))
    plan = plan_for(prepared, CompileOptions("t", macs=0.5, threads=1))
    record = plan.alignment
    rows = {r["round_to"]: r for r in record["candidates"]}
    assert record["chosen"] == plan.round_to == 16
    assert "whole pruned models timed" in record["rule"]
    assert not {"table", "measured_now"} & set(record)  # no path
    assert rows[8]["relative_latency"] == 1.0 and rows[8]["eligible"]
    assert rows[16]["relative_latency"] < 0.7 and rows[32]["relative_latency"] < 0.7
    # at 16's speed the finest alignment would have to remove more importance than 16 does
    assert rows[16]["importance_removed"] <= rows[16]["finest_at_this_speed"]
    assert rows[16]["matched_macs"] < plan.macs_ratio * 0.75
    # 32 removes 10 % more than the finest would at its speed: a tie it passes, but it is no
    # faster than 16, which is taken
    assert rows[32]["finest_at_this_speed"] < rows[32]["importance_removed"]
    assert rows[32]["importance_removed"] <= rows[32]["finest_at_this_speed"] * (
        1 + alignment.IMPORTANCE_TIE
    )
    assert [r["eligible"] for r in record["candidates"]] == [True, True, True]
    assert rows[32]["relative_latency"] > rows[16]["relative_latency"]
    assert all(g.kept % 16 == 0 for g in plan.groups if g.pruned)
    # the record travels with the plan file
    path = tmp_path / "plan.json"
    plan.save(path)
    assert PruningPlan.load(path).alignment == record


def test_the_matched_plans_are_timed_together_with_the_finest_once(timing, prepared):
    """Two measurements: the candidates, then the finest's plan with every coarser candidate's
    matched plan, interleaved (the finest exported and timed once, not once per candidate)."""
    calls, times = [], []
    slow_off_16 = model_off_block(16, 1.5)

    def measure(plans: dict) -> dict:
        calls.append(list(plans))
        times.append(slow_off_16(plans))
        return times[-1]

    timing(measure)
    plan = plan_for(prepared, CompileOptions("t", macs=0.5, threads=1))
    assert calls == [["8", "16", "32"], ["finest", "16", "32"]]
    rows = {r["round_to"]: r for r in plan.alignment["candidates"]}
    for a in ("16", "32"):  # relative to the finest's time in the same measurement
        relative = times[1][a] / times[1]["finest"]
        assert rows[int(a)]["matched_relative_latency"] == round(relative, 4) < 1


def test_a_coarse_alignment_costlier_than_pruning_deeper_is_not_taken(timing, prepared):
    """32 runs 5 % faster, but the finest alignment planned to run that fast removes less
    importance than 32 does at the target (by more than the tie): pruning a little deeper is
    the better buy."""
    timing(model_off_block(32, 1.05))
    options = CompileOptions("t", macs=0.5, threads=1)
    plan = plan_for(prepared, options)
    rows = {r["round_to"]: r for r in plan.alignment["candidates"]}
    assert rows[32]["relative_latency"] < 1 - alignment.SPEED_TIE
    too_costly = rows[32]["finest_at_this_speed"] * (1 + alignment.IMPORTANCE_TIE)
    assert too_costly < rows[32]["importance_removed"]
    assert plan.round_to == 8 and not rows[32]["eligible"]


def refusing(monkeypatch, refused: set[int], error=TargetUnreachable) -> list[int]:
    """The uniform planner raising ``error`` (the latency knapsack's kind by default) at the
    alignments in ``refused``; returns the alignments it was called at, in order."""
    from yoloprune.compiler import planners

    plan, calls = planners.PLANNERS["uniform"], []

    def refuse(request):
        calls.append(request.constraints.round_to)
        if request.constraints.round_to in refused:
            raise error(f"budget cannot be met with --round-to {request.constraints.round_to}")
        return plan(request)

    monkeypatch.setitem(planners.PLANNERS, "uniform", refuse)
    return calls


def test_an_alignment_the_planner_refuses_is_replaced_by_the_next_choice(
    timing, prepared, monkeypatch, tmp_path
):
    """16 is chosen until the planner cannot meet the target there, as the latency knapsack
    could not at 32 for --speedup 2 on the embedded model: the choice is made again among the
    rest, and the record says why 16 was not taken."""
    timing(model_off_block(16, 1.5))
    options = CompileOptions("t", macs=0.5, threads=1)
    assert plan_for(prepared, options).round_to == 16
    calls = refusing(monkeypatch, {16})
    plan = plan_for(prepared, options)
    rows = {r["round_to"]: r for r in plan.alignment["candidates"]}
    assert calls == [16, 32] and plan.round_to == plan.alignment["chosen"] == 32
    assert not rows[16]["eligible"] and "--round-to 16" in rows[16]["planner_refused"]
    assert "planner_refused" not in rows[32] and rows[32]["eligible"]
    assert all(g.kept % 32 == 0 for g in plan.groups if g.pruned)
    text = report.alignment_text(plan.alignment)
    assert "16: 0.6" in text and "the planner cannot meet the target at this alignment" in text
    plan.save(tmp_path / "plan.json")
    assert PruningPlan.load(tmp_path / "plan.json").alignment == plan.alignment


def test_with_every_eligible_alignment_refused_the_fastest_plannable_one_is_tried(
    timing, prepared, monkeypatch
):
    """32 runs 5 % faster but costs too much importance, and 16 is no faster: 8 is chosen.
    When the planner refuses 8, 32 (plannable, the fastest left) is tried and kept, marked as
    the fallback; when it refuses every one, the finest's error says the others failed too."""
    timing(model_off_block(32, 1.05))
    options = CompileOptions("t", macs=0.5, threads=1)
    first = {r["round_to"]: r for r in plan_for(prepared, options).alignment["candidates"]}
    assert [first[a]["eligible"] for a in (8, 16, 32)] == [True, False, False]
    calls = refusing(monkeypatch, {8})
    plan = plan_for(prepared, options)
    rows = {r["round_to"]: r for r in plan.alignment["candidates"]}
    assert calls == [8, 32] and plan.round_to == 32
    assert rows[32]["fallback"] and rows[32]["eligible"] and not rows[16]["eligible"]
    assert "the only alignment left" in report.alignment_text(plan.alignment)
    monkeypatch.undo()
    timing(model_off_block(32, 1.05))
    calls = refusing(monkeypatch, {8, 16, 32})
    with pytest.raises(TargetUnreachable) as refused:
        plan_for(prepared, options)
    assert calls == [8, 32, 16]
    assert str(refused.value) == (
        "budget cannot be met with --round-to 8 (nor at --round-to 16 and 32)"
    )


def test_other_plan_errors_are_not_retried_at_other_alignments(timing, prepared, monkeypatch):
    timing(model_off_block(16, 1.5))
    calls = refusing(monkeypatch, {8, 16, 32}, error=PlanError)
    with pytest.raises(PlanError, match="--round-to 16") as raised:
        plan_for(prepared, CompileOptions("t", macs=0.5, threads=1))
    assert calls == [16] and not isinstance(raised.value, TargetUnreachable)


def test_importance_within_the_proxys_resolution_is_a_tie_that_goes_to_the_faster():
    """The embedded model's case (MACs 0.35): 16 removed 12.1 % where 8 at its speed removes
    11.6 % (10.8 % in another run), and the two measured the same mAP; 14 % against 11.6 %
    is costlier."""
    assert alignment._no_costlier(0.121263, 0.115964)
    assert alignment._no_costlier(0.121263, 0.108)
    assert not alignment._no_costlier(0.14, 0.115964)
    assert alignment._no_costlier(0.5, None)  # the finest cannot run that fast at all


def test_the_report_line_says_when_a_candidate_passed_as_a_tie():
    from yoloprune.compiler.report import alignment_text

    rows = [
        {"round_to": 8, "relative_latency": 1.0, "importance_removed": 0.074, "eligible": True},
        {"round_to": 16, "relative_latency": 0.72, "importance_removed": 0.121, "eligible": True},
        {"round_to": 32, "relative_latency": 0.7, "importance_removed": 0.3, "eligible": False},
    ]
    rows[1]["finest_at_this_speed"], rows[2]["finest_at_this_speed"] = 0.116, 0.12
    key = {"device": "cpu x", "precision": "fp32", "batch": 1}
    record = {"chosen": 16, "runtime": "ort", "table_key": key, "rule": "r", "candidates": rows}
    text = alignment_text(record)
    assert (
        "16: 0.720x time, removes 12.1% of the importance (the finest at this speed: 11.6%)" in text
    )
    assert "(the finest at this speed: 11.6%), more but within the tie: eligible; 32" in text
    assert "(the finest at this speed: 12.0%), not taken; r)" in text
    assert "8: 1.000x time, removes 7.4% of the importance; 16" in text


def test_ties_go_to_the_finest_alignment(prepared):
    """The test session times every candidate alike (tests/conftest.py)."""
    plan = plan_for(prepared, CompileOptions("t", macs=0.5, threads=1))
    assert plan.round_to == 8
    assert [r["relative_latency"] for r in plan.alignment["candidates"]] == [1.0, 1.0, 1.0]
    assert [r["eligible"] for r in plan.alignment["candidates"]] == [True, False, False]


@pytest.mark.timing
def test_the_real_timing_times_whole_candidate_models(prepared):
    """The unpatched timing (ONNX Runtime, 20 interleaved runs of each candidate model): the
    record's figures are relative to the finest plannable candidate, whichever is chosen."""
    from tests.conftest import REAL_TIMING
    from yoloprune.compiler import alignment as module
    from yoloprune.compiler.pipeline import plan_request

    options = CompileOptions("t", macs=0.5, threads=1)
    measure = REAL_TIMING[0](prepared, options.settings.alignment)
    request, record = module.choose_alignment(
        plan_request(prepared, options), "uniform", options.settings.alignment, measure
    )
    rows = record["candidates"]
    assert rows[0]["relative_latency"] == 1.0
    assert all(0.2 < r["relative_latency"] < 5 for r in rows)
    assert record["chosen"] == request.constraints.round_to in (8, 16, 32)
    tensorrt = dataclasses.replace(options.settings.alignment, runtime="tensorrt")
    assert REAL_TIMING[0](prepared, tensorrt) is None  # the chain profile stands in


def test_a_given_round_to_is_used_as_it_is(profile, prepared):
    profile(off_block(16, 1.5))
    options = CompileOptions("t", macs=0.5, threads=1, round_to=8)
    assert options.settings.alignment is None
    plan = plan_for(prepared, options)
    assert plan.round_to == 8 and plan.alignment is None


def test_latency_budgets_are_aligned_by_speed_alone(profile, prepared):
    """--latency-ms has no MACs equivalent before timing: the record says the check did not
    run (the choice itself is tested through the planner's request, without timing models)."""
    from yoloprune.compiler.pipeline import plan_request

    profile(off_block(16, 1.5))
    options = CompileOptions("t", latency_ms=1.0, threads=1)
    request, record = alignment.choose_alignment(
        plan_request(prepared, options), "latency", options.settings.alignment
    )
    assert record["chosen"] == request.constraints.round_to == 16
    assert record["accuracy_check"].startswith("not checked")
    speedup, _ = alignment.choose_alignment(
        plan_request(prepared, dataclasses.replace(options, latency_ms=None, speedup=2.0)),
        "latency",
        options.settings.alignment,
    )
    assert speedup.constraints.round_to == 16


def test_round_to_values(prepared):
    assert CompileOptions("t").settings.alignment is not None  # auto is the default
    assert CompileOptions("t", round_to="auto").settings.alignment is not None
    assert CompileOptions("t", method="unstructured", ratio=0.3).settings.alignment is None
    with pytest.raises(PlanError, match="--round-to x: give a positive integer or auto"):
        CompileOptions("t", round_to="x")
    with pytest.raises(PlanError, match="must be a positive integer"):
        CompileOptions("t", round_to=0)


def test_iterative_steps_keep_the_first_steps_alignment(timing, tiny_yaml, tmp_path):
    """Every step plans on the alignment the first one chose, so the composed plan is aligned
    to it and replays."""
    from yoloprune.compiler.pipeline import compile_model

    timing(model_off_block(16, 1.5))
    options = CompileOptions(
        str(tiny_yaml), imgsz=64, macs=0.5, steps=2, threads=1, bench=False, out=tmp_path / "o"
    )
    report = compile_model(options)
    assert report["alignment"]["round_to"] == 16
    assert report["alignment"]["all_pruned_groups_aligned"]
    assert report["alignment"]["chosen_by"]["chosen"] == 16
    plan = PruningPlan.load(tmp_path / "o" / "tiny-plan.json")
    assert plan.round_to == 16 and all(g.kept % 16 == 0 for g in plan.groups if g.pruned)


def test_a_damaged_alignment_record_is_refused_on_load(timing, prepared, tmp_path):
    import json

    timing(model_off_block(16, 1.5))
    plan = plan_for(prepared, CompileOptions("t", macs=0.5, threads=1))
    data = json.loads(plan.to_json())
    data["alignment"] = {"chosen": 16}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=r"malformed plan .*alignment must be a mapping"):
        PruningPlan.load(path)
    del data["alignment"]  # plans written before auto have none
    path.write_text(json.dumps(data))
    assert PruningPlan.load(path).alignment is None


def test_no_plannable_finest_leaves_no_candidate_unchecked(prepared):
    """Costs are compared with the finest *plannable* candidate; one that cannot be planned is
    never eligible; untimed (the profile), the finest's matched plan is assumed to run at the
    speed its MACs scale to."""
    from yoloprune.compiler.pipeline import plan_request

    request = plan_request(prepared, CompileOptions("t", macs=0.5, threads=1))
    candidates = alignment._Candidates(request, "uniform")
    plans = candidates.all()
    plans[8] = "cannot be met"
    rows = alignment._rows(candidates, plans, {8: 1.0, 16: 1.0, 32: 0.5}, None)
    assert [r["eligible"] for r in rows] == [False, True, rows[2]["eligible"]]
    assert rows[0]["plannable"] is False and "finest_at_this_speed" not in rows[1]
    assert rows[2]["matched_relative_latency"] == 0.5
    assert rows[2]["eligible"] == (
        rows[2]["finest_at_this_speed"] is None
        or rows[2]["importance_removed"] <= rows[2]["finest_at_this_speed"]
    )
    budget = plan_request(prepared, CompileOptions("t", latency_ms=1.0))
    unchecked = alignment._Candidates(budget, "latency")
    rows = alignment._rows(unchecked, {}, {8: 1.0, 16: 0.9, 32: 0.8}, None)
    assert all(r["eligible"] and "importance_removed" not in r for r in rows)
    assert alignment._choose(rows) == 32


def test_the_profile_is_measured_at_the_latency_batch(profile, prepared):
    """--latency-batch N: the profile of batch N decides a --latency-ms compile's alignment (a
    cache of its own), and the report line names the batch."""
    from yoloprune.compiler.pipeline import plan_request
    from yoloprune.compiler.report import alignment_text

    profile(off_block(16, 1.5))  # batch 1 would choose 16
    batched = latency_table.open_table("ort", batch=2, threads=1, kind=ChainTable)
    flat = {s.key(): s.macs() * 1e-9 for band in BANDS for s in band.shapes()}  # 8 wins ties
    batched.entries = flat
    batched.save()
    for batch, chosen, text in ((2, 8, " fp32 batch 2 ("), (None, 16, " fp32 (")):
        options = CompileOptions("t", latency_ms=1.0, threads=1, latency_batch=batch)
        _, record = alignment.choose_alignment(
            plan_request(prepared, options), "latency", options.settings.alignment
        )
        assert record["table_key"]["batch"] == (batch or 1)
        assert record["chosen"] == chosen and text in alignment_text(record)


def test_the_candidate_models_are_timed_at_the_latency_batch(prepared, monkeypatch):
    from tests.conftest import REAL_TIMING
    from yoloprune.compiler import pipeline

    seen = []
    monkeypatch.setattr(
        pipeline, "plan_latency_measure", lambda p, s, seconds: seen.append((s, seconds))
    )
    REAL_TIMING[0](prepared, CompileOptions("t", macs=0.5, latency_batch=2).settings.alignment)
    settings, seconds = seen[0]
    assert settings.batch == 2 and settings.runs == alignment.ALIGNMENT_RUNS
    assert seconds == alignment.ALIGNMENT_SECONDS


def test_auto_is_the_default_so_saying_it_is_never_refused(profile, prepared, tmp_path):
    profile(lambda s: s.macs() * 1e-9)
    path = tmp_path / "plan.json"
    plan_for(prepared, CompileOptions("t", macs=0.5, threads=1)).save(path)
    assert CompileOptions("t", plan=path, round_to="auto").settings.alignment is None
    unstructured = CompileOptions("t", method="unstructured", ratio=0.3, round_to="auto")
    assert unstructured.settings.alignment is None
    with pytest.raises(PlanError, match="drop --round-to"):
        CompileOptions("t", plan=path, round_to=16)


def test_a_profile_at_another_precision_says_so(timing, prepared, tmp_path):
    """The ORT profile times fp32 convolutions; an fp16 or int8 file deploys other kernels, so
    the report (and compile's output) says what to measure instead, also for a replayed plan:
    the note compares the plan's profile with the file this compile deploys, and the plan
    file itself stays precision-free."""
    from yoloprune.compiler.report import _precision_note

    timing(model_off_block(16, 1.5))
    plan = plan_for(prepared, CompileOptions("t", macs=0.5, threads=1))
    assert "precision_note" not in plan.alignment
    assert _precision_note(plan, CompileOptions("t", macs=0.5)) is None
    note = _precision_note(plan, CompileOptions("t", macs=0.5, precision="fp16"))
    assert note == (
        "the alignment was timed in fp32, the deployed file is fp16 (TensorRT's fp16 "
        "kernels want multiples of 8): measure on the deployment GPU with --latency-runtime "
        "tensorrt, or pass --round-to 8"
    )
    path = tmp_path / "plan.json"
    plan.save(path)
    replayed = PruningPlan.load(path)
    note = _precision_note(replayed, CompileOptions("t", plan=path, precision="fp16"))
    assert "deployed file is fp16" in note
    # a latency planner cannot profile on TensorRT: the advice is the rule itself
    assert alignment.precision_note(replayed.alignment, "int8", plans_latency=True).endswith(
        "(TensorRT's int8 kernels want multiples of 32): pass --round-to 32 to follow that "
        "rule unmeasured"
    )
    fp32_body = alignment.precision_note(replayed.alignment, "int8-fp32", plans_latency=False)
    assert "deployed file is int8-fp32 (TensorRT's int8-fp32 kernels want multiples of 32)" in (
        fp32_body
    )
    same = {"table_key": {"precision": "int8-fp32"}}
    assert alignment.precision_note(same, "int8-fp32", False) is None
    unguided = alignment.precision_note({"table_key": {"precision": "fp16"}}, "fp32", False)
    assert unguided == "the alignment was timed in fp16, the deployed file is fp32"


def test_tensorrt_times_the_profile_at_the_compiles_precision(monkeypatch, tmp_path):
    from yoloprune.kernels import tensorrt

    if not tensorrt.available()[0]:
        with pytest.raises(PlanError, match=r"^--latency-runtime tensorrt: TensorRT"):
            CompileOptions("t", macs=0.5, latency_runtime="tensorrt")
        # the combination is refused first, whether or not TensorRT is here
        with pytest.raises(PlanError, match="alignment profile only"):
            CompileOptions("t", speedup=2.0, latency_runtime="tensorrt")
    monkeypatch.setattr(tensorrt, "available", lambda: (True, "11.4.0"))
    for precision, profiled in ((None, "fp32"), ("fp16", "fp16")):
        options = CompileOptions("t", macs=0.5, latency_runtime="tensorrt", precision=precision)
        assert options.settings.alignment.runtime == "tensorrt"
        assert options.settings.alignment.precision == profiled
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(images / f"{i}.png")
    int8 = dict(macs=0.5, latency_runtime="tensorrt", precision="int8", calib_images=images)
    for int8_float, profiled in ((None, "int8"), ("fp16", "int8"), ("fp32", "int8-fp32")):
        options = CompileOptions("t", **int8, int8_float=int8_float)
        assert options.settings.alignment.precision == profiled  # the file's own float part
        assert options.timed_precision() == profiled
    with pytest.raises(PlanError, match=r"alignment profile only.*ort or torch"):
        CompileOptions("t", speedup=2.0, latency_runtime="tensorrt")
    with pytest.raises(PlanError, match="alignment profile only"):
        CompileOptions("t", macs=0.5, latency_aware=True, latency_runtime="tensorrt")
    with pytest.raises(PlanError, match=r"does not run.*drop it"):
        CompileOptions("t", macs=0.5, round_to=16, latency_runtime="tensorrt")
    with pytest.raises(PlanError, match=r"does not run.*drop it"):
        CompileOptions("t", method="unstructured", ratio=0.3, latency_runtime="tensorrt")


def test_sensitivity_candidates_share_one_scoring_and_one_measurement(prepared, tmp_path):
    """Every candidate (and every plan matched to a coarser one's speed) is a sensitivity plan
    of the same scores: the importance runs once and the curves are measured once."""
    from tests.compiler.test_allocation import _image_files
    from yoloprune.compiler.allocation import GroupSensitivity
    from yoloprune.compiler.pipeline import plan_request
    from yoloprune.compiler.planners import sensitivity as sensitivity_planner
    from yoloprune.compiler.report import alignment_text
    from yoloprune.compiler.score import Importance

    options = CompileOptions("t", macs=0.5, threads=1)
    request = plan_request(prepared, options)
    inner, calls = request.importance, []

    class Counted(Importance):
        name = inner.name

        def __call__(self, *args):
            calls.append("scored")
            return inner(*args)

    folder = tmp_path / "images"
    folder.mkdir()
    sensitivity = GroupSensitivity(_image_files(folder, 2), 64, progress=False)
    measured = []
    sensitivity_call = sensitivity.__call__
    request = dataclasses.replace(request, importance=Counted(), sensitivity=sensitivity)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            GroupSensitivity,
            "__call__",
            lambda self, *args: measured.append(self._curves is None) or sensitivity_call(*args),
        )
        chosen, record = alignment.choose_alignment(
            request, "sensitivity", options.settings.alignment, model_off_block(16, 1.5)
        )
    assert record["chosen"] == 16 and record["candidates"][1]["eligible"]
    assert "finest_at_this_speed" in record["candidates"][1]  # a matched plan was made too
    assert calls == ["scored"] and measured.count(True) == 1 and len(measured) > 3
    assert chosen.scores is request.scores and calls == ["scored"]  # handed on, not redone
    # compared by what the allocation minimises: the error its measured curves add
    rows = {r["round_to"]: r for r in record["candidates"]}
    assert record["accuracy_check"].endswith("compared by the head output error their measured "
                                             "curves add")  # fmt: skip
    assert all("importance_removed" not in r for r in rows.values())
    plan = sensitivity_planner(chosen)
    assert rows[16]["error_added"] == round(alignment.error_added(plan, sensitivity._curves), 6)
    assert rows[16]["error_added"] > rows[8]["error_added"] > 0  # coarser steps cost more
    text = alignment_text(record)
    assert "16: 0.667x time, adds head output error 1.51 (the finest at this speed: 2.03)" in text
