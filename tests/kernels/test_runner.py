"""The Runner interface: its active state, time_runners, and ONNX Runtime against PyTorch."""

import time

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import tiny_cfg
from yoloprune.kernels.ort import OrtRunner
from yoloprune.kernels.runner import Runner, RunnerStateError, time_runners
from yoloprune.kernels.torch_runtime import TorchRunner, TorchSettings


class FixedClock:
    """A clock that reads ``ms`` for every call (checks whose clock times which runner)."""

    def __init__(self, ms: float):
        self.ms = ms

    def start(self) -> None:
        pass

    def stop(self, sync) -> float:
        sync()
        return self.ms


class StandIn(Runner):
    """A runner with no runtime behind it: records what is asked of it."""

    name = "stand-in"

    def __init__(self, sleep_s=0.0, order=None, clock_ms=None, name=None):
        self.sleep_s, self.order, self.clock_ms = sleep_s, order, clock_ms
        self.name = name or StandIn.name
        self.events: list = []

    def activate_impl(self):
        self.events.append("activate")

    def deactivate_impl(self):
        self.events.append("deactivate")

    def infer_impl(self, inputs):
        self.events.append(("infer", inputs))
        time.sleep(self.sleep_s)
        return inputs

    def sync(self):
        self.events.append("sync")

    def clock(self):
        return FixedClock(self.clock_ms) if self.clock_ms is not None else None

    def timing_order(self):
        return self.order or super().timing_order()

    def describe(self):
        return {"tensorrt": "stand-in"}


def test_infer_needs_an_active_runner_and_activate_needs_an_inactive_one():
    runner = StandIn()
    with pytest.raises(RunnerStateError, match="stand-in runner is not active"):
        runner.infer(1)
    assert runner.activate() is runner and runner.is_active
    with pytest.raises(RunnerStateError, match="already active"):
        runner.activate()
    assert runner.infer(7) == 7
    runner.deactivate()
    runner.deactivate()  # releasing an inactive runner does nothing
    assert runner.events == ["activate", ("infer", 7), "deactivate"]
    with pytest.raises(RunnerStateError, match="not active"):
        runner.infer(1)


def test_context_manager_deactivates_even_when_the_body_raises():
    runner = StandIn()
    with pytest.raises(KeyError, match="boom"), runner as active:
        assert active is runner and runner.is_active
        raise KeyError("boom")
    assert not runner.is_active and runner.events == ["activate", "deactivate"]
    with runner:  # and it can be activated again
        runner.infer(None)
    assert runner.events[-1] == "deactivate"


def test_ort_and_torch_runners_agree_on_one_exported_model(tmp_path, tiny_model):
    from yoloprune.compiler.export import export_onnx

    path = export_onnx(tiny_model, tmp_path / "m.onnx", 64, dynamic=True)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with OrtRunner(path, threads=1) as ort_runner:
        (by_ort,) = ort_runner.infer(images.numpy())
    settings = TorchSettings(device="cpu", precision="fp32")
    with TorchRunner(tiny_model, 2, 64, settings) as torch_runner:
        by_torch = torch_runner.infer(images).numpy()
    assert by_ort.shape == by_torch.shape == (2, 252, 8)
    # fp32 kernels differ by summation order only (measured: <= 4e-5 relative): boxes in
    # pixels taken relative to the image size, like export parity; sigmoid scores as they are
    scale = np.array([64] * 4 + [1] * 4, dtype=np.float32)
    np.testing.assert_allclose(by_ort / scale, by_torch / scale, rtol=1e-4, atol=1e-4)
    assert not ort_runner.is_active and ort_runner.session is None
    assert torch_runner.model is None


def test_time_runners_uses_each_runners_own_clock_and_sync():
    a, b = StandIn(clock_ms=1.0), StandIn(clock_ms=2.5)
    with a, b:
        timings = time_runners({"a": a, "b": b}, "x", runs=3, warmup=1)
    assert (timings["a"].median_ms, timings["b"].median_ms) == (1.0, 2.5)
    assert timings["a"].runs == 3 and timings["a"].warmup == 1
    infers = [e for e in a.events if isinstance(e, tuple)]
    assert infers == [("infer", "x")] * 4  # one warm-up, three timed
    # after its warm-up, before every timed call of either runner, and in its own clock's stop
    assert b.events.count("sync") == 1 + 2 * 3 + 3


def test_time_runners_refuses_mixed_orders_kinds_and_inactive_runners():
    plain, blocked = StandIn(), StandIn(order={"block": 5, "rewarm": 2})
    with pytest.raises(RunnerStateError, match="activate the runners before timing them: a"):
        time_runners({"a": plain}, None, runs=1, warmup=0)
    with plain, blocked:
        with pytest.raises(ValueError, match="same timing order"):
            time_runners({"a": plain, "b": blocked}, None, runs=1, warmup=0)
        other = StandIn(name="other").activate()
        with pytest.raises(ValueError, match="one kind together"):
            time_runners({"a": plain, "o": other}, None, runs=1, warmup=0)
        other.deactivate()
        timings = time_runners({"b": blocked}, None, runs=6, warmup=0)
    assert timings["b"].runs == 6
    # blocks of 5 timed calls, each after 2 untimed: 2 + 5 + 2 + 1 calls
    assert sum(isinstance(e, tuple) for e in blocked.events) == 10
    with pytest.raises(ValueError, match="at least one runner"):
        time_runners({}, None)


def test_time_runners_passes_a_time_budget_on_in_the_runners_own_turns():
    """runs=6 at 10 ms within 0.2 s: 20 timed calls, still in turns of at most 5 after 2
    untimed (5 + 1, then 5 + 5 + 4: five turns)."""
    blocked = StandIn(order={"block": 5, "rewarm": 2}, clock_ms=10.0)
    with blocked:
        timings = time_runners({"b": blocked}, None, runs=6, warmup=0, seconds=0.2)
    assert timings["b"].runs == 20
    assert sum(isinstance(e, tuple) for e in blocked.events) == 20 + 5 * 2


def test_the_interface_is_all_bench_needs(monkeypatch, tmp_path):
    """bench drives any Runner: a stand-in for TensorRT (absent here) is made per model,
    activated, timed A B A B with its own hooks, described in the result and released."""
    from yoloprune.compiler import bench as bench_module

    made: list[StandIn] = []

    def make(source, settings, imgsz, scratch, index):
        made.append(StandIn(sleep_s=0.002 if index == 0 else 0.008, name="tensorrt"))
        return made[-1]

    monkeypatch.setitem(bench_module.RUNNERS, "tensorrt", make)
    spec = tmp_path / "m.yaml"
    spec.write_text(yaml.safe_dump(tiny_cfg()))
    settings = bench_module.BenchSettings(runtime="tensorrt", imgsz=64, runs=4, warmup=1)
    result = bench_module.bench([str(spec), str(spec)], settings)
    assert result["tensorrt"] == "stand-in" and result["precision"] == "fp32"
    assert [r["runs"] for r in result["rows"]] == [4, 4]
    assert result["rows"][0]["ratio"] == 1.0 and result["rows"][1]["ratio"] > 2.0
    for runner in made:
        assert runner.events[0] == "activate" and runner.events[-1] == "deactivate"
        # the GPU runtimes rerun the input they hold: bench passes none
        assert {e for e in runner.events if isinstance(e, tuple)} == {("infer", None)}
