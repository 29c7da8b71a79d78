"""The report's warning where the bench step re-measures a latency goal and finds it missed."""

from yoloprune.compiler.report import _missed_latency_goal

PLANNED = {
    "runtime": "ort",
    "table_key": {"runtime": "ort", "precision": "fp32", "batch": 1, "threads": 2},
    "baseline_ms": 6.0,
    "goal_ms": 6.0 / 1.75,  # --speedup 1.75: ratio 0.5714
    "measured_speedup": 1.76,
}


def test_a_missed_goal_is_named_with_both_measurements():
    (warning,) = _missed_latency_goal(PLANNED, {"ratio": 0.611})
    assert "latency ratio of 0.611 (speed-up 1.64x)" in warning
    assert "goal's 0.571" in warning and "planner measured 1.76x" in warning


def test_within_the_planners_tolerance_or_faster_no_warning():
    assert _missed_latency_goal(PLANNED, {"ratio": 0.5714 * 1.029}) == []
    assert _missed_latency_goal(PLANNED, {"ratio": 0.5714 * 1.031}) != []
    assert _missed_latency_goal(PLANNED, {"ratio": 0.50}) == []


def test_only_goals_the_bench_step_measures_alike_are_compared():
    assert _missed_latency_goal(None, {"ratio": 0.9}) == []
    assert _missed_latency_goal(PLANNED, None) == []
    macs_latency_aware = {k: v for k, v in PLANNED.items() if k != "goal_ms"}
    assert _missed_latency_goal(macs_latency_aware, {"ratio": 0.9}) == []
    assert _missed_latency_goal(dict(PLANNED, runtime="torch"), {"ratio": 0.9}) == []
    batch_8 = dict(PLANNED, table_key=dict(PLANNED["table_key"], batch=8))
    assert _missed_latency_goal(batch_8, {"ratio": 0.9}) == []
    fp16 = dict(PLANNED, table_key=dict(PLANNED["table_key"], precision="fp16"))
    assert _missed_latency_goal(fp16, {"ratio": 0.9}) == []
