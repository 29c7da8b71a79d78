"""The compile as a list of stages; prune_in_memory runs compile's own stages for benchmarks."""

import torch

from yoloprune.compiler.apply import apply_plan
from yoloprune.compiler.pipeline import (
    IN_MEMORY_STAGES,
    STAGES,
    CompileOptions,
    plan_for,
    prepare,
    prune_in_memory,
)


def test_in_memory_stages_are_compile_stages_in_compile_order():
    names = [stage.name for stage in STAGES]
    assert [n for n in names if n in IN_MEMORY_STAGES] == list(IN_MEMORY_STAGES)


def test_prune_in_memory_builds_what_the_plan_and_apply_stages_build(tiny_yaml):
    options = CompileOptions(str(tiny_yaml), macs=0.6)
    job = prune_in_memory(options)
    assert set(job.seconds) == {"load + graph", "score + plan", "apply"}  # nothing else ran
    assert job.staging is None and "recalibrated" not in job.artifacts  # no data: no BN pass
    prepared = prepare(str(tiny_yaml))
    assert job["plan"] == plan_for(prepared, options)
    expected = apply_plan(prepared.model, job["plan"]).state_dict()
    got = job["pruned"].state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    again = prune_in_memory(options, prepared)  # a model traced once, planned again
    assert "load + graph" not in again.seconds and again["plan"] == job["plan"]


def test_the_baseline_is_exported_as_the_pruned_file_is(monkeypatch, tmp_path):
    """Latency ratios compare like with like: the unpruned model's ONNX gets the compile's
    export mode, batch axis and simplification (it was exported in the model's default mode,
    static, whatever the pruned file's)."""
    from yoloprune.compiler import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "export_onnx", lambda *a, **k: calls.append((a, k)) or a[1])
    options = CompileOptions("m.yaml", macs=0.5, dynamic=True, simplify=False)
    path = pipeline.export_baseline("model", tmp_path / "b.onnx", 64, "raw", options)
    assert path == tmp_path / "b.onnx"
    assert calls == [
        (("model", tmp_path / "b.onnx", 64), {"dynamic": True, "simplify": False, "mode": "raw"})
    ]
