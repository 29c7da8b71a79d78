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


def _epochs(*maps, step=None):
    records = [{"epoch": i + 1} for i in range(len(maps))]
    for record, value in zip(records, maps, strict=True):
        record.update({"map50_95": value} if value is not None else {})
        record.update({"step": step} if step else {})
    return records


def test_the_fine_tune_line_names_the_epochs_evaluated():
    from yoloprune.compiler.report import _finetune_text

    def line(history):
        return _finetune_text({"history": history, "seconds": 12.4})

    assert line(_epochs(0.5, 0.6)) == (
        "Fine-tuned 2 epochs in 12 s (mAP@.5:.95 after each epoch: 0.5000 → 0.6000)."
    )
    assert line(_epochs(None, 0.55, 0.6)) == (
        "Fine-tuned 3 epochs in 12 s (mAP@.5:.95 after epochs 2, 3: 0.5500 → 0.6000)."
    )
    assert (
        line(_epochs(None, 0.6))
        == "Fine-tuned 2 epochs in 12 s (mAP@.5:.95 after epoch 2: 0.6000)."
    )
    assert line(_epochs(None, None)) == "Fine-tuned 2 epochs in 12 s."
    for low, said in (("bf16", ", the forward in bf16 mixed precision"), (None, ", in fp32")):
        text = _finetune_text({"history": _epochs(None), "seconds": 3, "mixed_precision": low})
        assert text == f"Fine-tuned 1 epochs in 3 s{said}."
    recipe = {"batch": 16, "processes": 1, "optimizer": "adamw", "lr0": 0.005, "distill": 1.0}
    text = _finetune_text(
        {
            "history": _epochs(None, 0.8),
            "seconds": 90.4,
            "mixed_precision": "bf16",
            "recipe": {**recipe, "augment": False},
        }
    )
    assert text == (
        "Fine-tuned 2 epochs at batch 16 (AdamW, lr0 0.005, distillation 1) in 90 s, the forward "
        "in bf16 mixed precision (mAP@.5:.95 after epoch 2: 0.8000)."
    )
    sgd = {**recipe, "optimizer": "sgd", "lr0": 0.01, "processes": 2, "augment": True}
    text = _finetune_text({"history": _epochs(None), "seconds": 3, "recipe": sgd})
    assert text == (
        "Fine-tuned 1 epochs at batch 16 x 2 processes (SGD, lr0 0.01, distillation 1, "
        "augmented) in 3 s."
    )
    alone = {**sgd, "distill": 0.0, "processes": 1, "augment": False}
    text = _finetune_text({"history": _epochs(None), "seconds": 3, "recipe": alone})
    assert text == "Fine-tuned 1 epochs at batch 16 (SGD, lr0 0.01, no distillation) in 3 s."
    iterative = _epochs(None, 0.4, step=1) + _epochs(None, 0.5, step=2)
    assert line(iterative) == (
        "Fine-tuned 4 epochs in 12 s "
        "(mAP@.5:.95 after epochs 2 of step 1, 2 of step 2: 0.4000 → 0.5000)."
    )


def test_the_profile_sentence_splits_the_ratio_and_flags_slow_profiled_runs():
    from yoloprune.compiler.report import profile_text

    split = {"ratio": 0.58, "macs_share": 0.445, "conv_efficiency_lost": 0.05, "rest": 0.085}
    latency = {
        "before": {"median_ms": 66.0},
        "after": {"median_ms": 38.0},
        "profile": {
            "runs": 20,
            "before": {"run_ms": 68.0},
            "after": {"run_ms": 40.0},
            "split": {**split, "floor": 0.498},
        },
    }
    text = profile_text(latency)
    assert text.startswith("latency split (ONNX Runtime's profiler, 20 runs each, kernel time)")
    assert "ratio 0.580 = MACs 0.445" in text and "efficiency lost +0.050" in text
    assert "other operators 0.085; floor 0.498" in text and "indicative only" not in text
    latency["profile"]["after"]["run_ms"] = 42.0  # > 1.1 x 38 ms
    assert profile_text(latency).endswith("or noise): indicative only")
    assert profile_text({"profile": {"skipped": "why"}}) == "latency split not available: why"
