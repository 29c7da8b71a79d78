import os

import numpy as np
import pytest

from tests.helpers import ort_profile
from yoloprune.kernels.latency_table import ConvLayer, conv_silu_onnx
from yoloprune.kernels.profile import (
    conv_node_macs,
    onnx_conv_macs,
    peak_throughput,
    profile_onnx,
    split_against,
    summarise_events,
)

SIZE = 32


def layer(cout: int, cin_per_group: int, kernel: int, groups: int = 1) -> ConvLayer:
    rng = np.random.default_rng(cout + kernel)
    weight = rng.standard_normal((cout, cin_per_group, kernel, kernel), dtype=np.float32)
    return ConvLayer(weight, np.zeros(cout, np.float32), 1, kernel // 2, groups)


@pytest.fixture(scope="module")
def three_convs(tmp_path_factory):
    """16 -> 32 (3x3), depthwise 32 (3x3), 32 -> 16 (1x1), each with SiLU, at 32x32: channel
    counts that are whole NCHWc blocks on AVX2 (8) and AVX-512 (16), so no padded channels."""
    layers = [layer(32, 16, 3), layer(32, 1, 3, groups=32), layer(16, 32, 1)]
    path = tmp_path_factory.mktemp("profile") / "convs.onnx"
    path.write_bytes(conv_silu_onnx(layers, [1, 16, SIZE, SIZE], "convs").SerializeToString())
    return path


def test_profile_counts_each_convolution_and_leaves_no_file(three_convs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = np.random.default_rng(0).random((1, 16, SIZE, SIZE), dtype=np.float32)
    profile = profile_onnx(three_convs, images, runs=4, warmup=1, threads=1)
    pixels = SIZE * SIZE
    expected = sorted([32 * pixels * 16 * 9, 32 * pixels * 1 * 9, 16 * pixels * 32])
    assert sorted(c.macs for c in profile.convs) == expected
    assert profile.conv_macs == sum(expected)
    assert profile.runs == 4 and profile.conv_ms > 0 and profile.other_ms > 0
    assert profile.kernel_ms == pytest.approx(profile.conv_ms + profile.other_ms)
    assert profile.run_ms > 0
    assert profile.declared_conv_macs == profile.executed_conv_macs == sum(expected)
    assert profile.to_dict()["conv_macs"] == sum(expected)
    assert "convs" not in profile.to_dict(convs=False)
    assert os.listdir(tmp_path) == []  # the profiler's JSON went to a removed temporary folder


def test_declared_macs_leave_out_the_runtimes_channel_padding(tmp_path):
    """24 and 40 channels: whole blocks of 8 (AVX2) but not of 16 (AVX-512), where ONNX Runtime
    pads them to 32 and 48 and runs those."""
    path = tmp_path / "odd.onnx"
    model = conv_silu_onnx([layer(24, 16, 3), layer(40, 24, 3)], [1, 16, SIZE, SIZE], "odd")
    path.write_bytes(model.SerializeToString())
    pixels = SIZE * SIZE
    declared = 24 * pixels * 16 * 9 + 40 * pixels * 24 * 9
    assert onnx_conv_macs(path) == declared
    assert onnx_conv_macs(path, batch=4) == declared  # a static batch stays what it is
    images = np.random.default_rng(0).random((1, 16, SIZE, SIZE), dtype=np.float32)
    profile = profile_onnx(path, images, runs=2, warmup=1, threads=1)
    assert profile.conv_macs == profile.declared_conv_macs == declared
    padded16 = 32 * pixels * 16 * 9 + 48 * pixels * 32 * 9
    assert profile.executed_conv_macs in (declared, padded16)


def test_declared_macs_take_a_symbolic_batch_as_given(tmp_path):
    model = conv_silu_onnx([layer(16, 16, 1)], [1, 16, 8, 8], "dyn")
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    path = tmp_path / "dyn.onnx"
    path.write_bytes(model.SerializeToString())
    assert onnx_conv_macs(path, batch=3) == 3 * 16 * 64 * 16
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    for value in model.graph.output:
        value.type.tensor_type.shape.dim[2].dim_param = "height"
    path.write_bytes(model.SerializeToString())
    assert onnx_conv_macs(path) is None  # a symbolic height: not known


def _node(op: str, ts: int, dur: int, name: str = "n") -> dict:
    shapes = {
        "input_type_shape": [{"float": [1, 4, 8, 8]}, {"float": [2, 4, 3, 3]}],
        "output_type_shape": [{"float": [1, 2, 8, 8]}],
    }
    args = {"op_name": op, **shapes}
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": args}


def test_summarise_events_counts_only_the_last_runs():
    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},  # the warm-up run
        _node("Conv", 10, 90),
        {"cat": "Session", "name": "model_run", "ts": 200, "dur": 60},
        _node("Conv", 210, 40),
        _node("Sigmoid", 250, 4, "s"),
        {"cat": "Session", "name": "model_run", "ts": 300, "dur": 80},
        _node("Conv", 310, 60),
        _node("Sigmoid", 370, 6, "s"),
    ]
    profile = summarise_events(events, runs=2)
    assert profile.op_ms == {"Conv": pytest.approx(0.05), "Sigmoid": pytest.approx(0.005)}
    assert profile.run_ms == pytest.approx(0.07)
    (conv,) = profile.convs
    assert conv.name == "n" and conv.ms == pytest.approx(0.05)
    assert conv.macs == 2 * 8 * 8 * 4 * 9
    assert conv.gmacs_per_s == pytest.approx(conv.macs / 0.05 / 1e6)
    with pytest.raises(ValueError, match="holds 3 runs, fewer than the 4 asked"):
        summarise_events(events, runs=4)


def test_conv_macs_count_a_blocked_output_with_its_padding():
    args = {
        "input_type_shape": [{"float": [1, 2, 8, 8, 16]}, {"float": [24, 32, 1, 1]}],
        "output_type_shape": [{"float": [1, 2, 8, 8, 16]}],  # 24 channels padded to 32
    }
    assert conv_node_macs(args) == 32 * 8 * 8 * 32


def test_split_adds_up_and_the_floor_uses_the_fastest_fair_convolution():
    # baseline: 10 ms at 100 GMAC/s, 10 ms at 200, and a tiny conv at 1000 GMAC/s (below 1 %)
    base = ort_profile([(10.0, 1_000_000_000), (10.0, 2_000_000_000), (0.01, 10_000_000)], 5.0)
    pruned = ort_profile([(6.0, 600_000_000), (6.0, 900_000_000)], 4.0)
    assert peak_throughput(base) == pytest.approx(200.0)
    split = split_against(pruned, base)
    total = base.kernel_ms  # 25.01
    assert split["ratio"] == pytest.approx(16.0 / total)
    mean = base.conv_gmacs_per_s  # 3.01 GMAC in 20.01 ms
    assert split["macs_share"] == pytest.approx(1.5 / mean * 1e3 / total)
    assert split["macs_share"] + split["conv_efficiency_lost"] + split["rest"] == pytest.approx(
        split["ratio"]
    )
    assert split["rest"] == pytest.approx(4.0 / total)
    assert split["floor"] == pytest.approx((1.5 / 200.0 * 1e3 + 4.0) / total)
    assert split["conv_macs_ratio"] == pytest.approx(1.5 / 3.01)
    assert split["other_ms_ratio"] == pytest.approx(0.8)
