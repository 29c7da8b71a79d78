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
