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


def test_a_profile_that_cannot_be_split_is_recorded_as_skipped(tmp_path):
    import numpy as np
    from onnx import TensorProto, helper

    from yoloprune.compiler.pipeline import _profile
    from yoloprune.kernels.latency_table import ConvShape, conv_onnx

    shape = [1, 3, 16, 16]
    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["y"])],
        "no_convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    no_convs, convs = tmp_path / "sigmoid.onnx", tmp_path / "conv.onnx"
    no_convs.write_bytes(helper.make_model(graph).SerializeToString())
    convs.write_bytes(conv_onnx(ConvShape(3, 8, 3, 1, 1, 16, 16), 1).SerializeToString())
    images = np.random.default_rng(0).random(shape, dtype=np.float32)
    options = CompileOptions("m.yaml", threads=1, bench_runs=2)
    profile = _profile(no_convs, convs, images, options)
    assert profile["skipped"] == "the reference profile has no convolution time to compare with"
    assert (profile["runs"], profile["threads"]) == (2, 1) and "split" not in profile
    assert _profile(convs, convs, images, options)["split"]["conv_macs_ratio"] == 1.0
