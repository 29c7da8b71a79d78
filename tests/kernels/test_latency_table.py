import json

import numpy as np
import pytest
import torch

from yoloprune.graphs.errors import LatencyTableError
from yoloprune.kernels.latency_table import (
    ConvShape,
    LatencyTable,
    TableKey,
    conv_onnx,
    open_table,
    ort_measurer,
)

KEY = TableKey("ort", "Test CPU @ 1GHz", "fp32", 1, 2)


def fake_measurer(calls):
    def measure(shape: ConvShape) -> float:
        calls.append(shape)
        return shape.cin * shape.cout / 1000

    return measure


def test_table_measures_once_caches_and_reloads(tmp_path):
    calls = []
    path = tmp_path / KEY.filename()
    table = LatencyTable(KEY, path, fake_measurer(calls))
    shapes = [ConvShape(16, 32, 3, 1, 1, 20, 20), ConvShape(32, 32, 1, 1, 1, 20, 20)]
    table.ensure(shapes + shapes, progress=False)
    assert len(calls) == 2 and table.measured == 2
    assert table[shapes[0]] == pytest.approx(0.512)
    assert table.lookup(ConvShape(8, 8, 3, 1, 1, 20, 20)) is None

    reloaded = LatencyTable(KEY, path, fake_measurer(calls))
    reloaded.ensure(shapes, progress=False)
    assert len(calls) == 2 and reloaded.measured == 0  # served from the file
    assert reloaded[shapes[1]] == pytest.approx(1.024)
    extra = ConvShape(8, 16, 3, 2, 1, 20, 20)
    assert reloaded[extra] == pytest.approx(0.128)  # measured on demand
    assert len(calls) == 3
    assert len(json.loads(path.read_text())["entries"]) == 3


def test_an_interrupted_measurement_keeps_what_it_measured(tmp_path, monkeypatch):
    """Saved while measuring (every SAVE_EVERY_S; 0 here: after each entry) and when it stops
    by an error or Ctrl-C: the next run measures only what is still missing."""
    from yoloprune.kernels import latency_table

    path = tmp_path / KEY.filename()
    shapes = [ConvShape(10 * i, 16, 3, 1, 1, 20, 20) for i in (1, 2, 3, 4)]  # in key order
    seen_on_disk = []

    def stopped_at_third(shape: ConvShape) -> float:
        seen_on_disk.append(len(json.loads(path.read_text())["entries"]) if path.exists() else 0)
        if shape.cin == 30:
            raise KeyboardInterrupt
        return 1.0

    monkeypatch.setattr(latency_table, "SAVE_EVERY_S", 0.0)
    with pytest.raises(KeyboardInterrupt):
        LatencyTable(KEY, path, stopped_at_third).ensure(shapes, progress=False)
    assert seen_on_disk == [0, 1, 2]  # each entry was on disk before the next was measured
    calls = []
    resumed = LatencyTable(KEY, path, fake_measurer(calls))
    resumed.ensure(shapes, progress=False)
    assert [c.cin for c in calls] == [30, 40] and resumed.measured == 2
    monkeypatch.setattr(latency_table, "SAVE_EVERY_S", 3600.0)
    failing = LatencyTable(KEY, tmp_path / "other.json", stopped_at_third)
    with pytest.raises(KeyboardInterrupt):
        failing.ensure(shapes, progress=False)  # no periodic save: saved as it stopped
    assert len(json.loads((tmp_path / "other.json").read_text())["entries"]) == 2
    unwritable = LatencyTable(KEY, tmp_path / "third.json", stopped_at_third)

    def refuse():
        raise LatencyTableError("cannot write the latency table")

    monkeypatch.setattr(unwritable, "save", refuse)
    with pytest.raises(KeyboardInterrupt):  # what stopped it, not the failed save
        unwritable.ensure(shapes, progress=False)


def test_table_of_another_device_is_refused(tmp_path):
    path = tmp_path / "table.json"
    LatencyTable(KEY, path, fake_measurer([])).ensure([ConvShape(8, 8, 1, 1, 1, 4, 4)], False)
    other = TableKey("ort", "Other CPU", "fp32", 1, 2)
    with pytest.raises(LatencyTableError, match="latency table for"):
        LatencyTable(other, path, fake_measurer([]))


def test_file_name_names_runtime_device_precision_batch_threads():
    assert KEY.filename() == "ort-test-cpu-1ghz-fp32-b1-t2.json"
    # ORT tables measured with and without thread spinning never share a file
    spin, nospin = (TableKey("ort", "Test CPU", "fp32", 1, 2, s) for s in (True, False))
    assert spin.filename() == "ort-test-cpu-fp32-b1-t2-spin.json"
    assert nospin.filename() == "ort-test-cpu-fp32-b1-t2-nospin.json"


@pytest.mark.parametrize("kernel,stride", [(1, 1), (3, 1), (3, 2), (6, 2)])
def test_measured_onnx_conv_is_conv_plus_silu(tmp_path, kernel, stride):
    """The timed graph computes what a folded yolov5 Conv computes (same shape, same op)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    shape = ConvShape(8, 16, kernel, stride, 1, 24, 24)
    model = conv_onnx(shape, batch=2)
    weights = {t.name: torch.tensor(numpy_helper.to_array(t)) for t in model.graph.initializer}
    reference = shape.module()
    with torch.no_grad():
        reference[0].weight.copy_(weights["w"])
        reference[0].bias.copy_(weights["b"])
    path = tmp_path / "conv.onnx"
    path.write_bytes(model.SerializeToString())
    x = np.random.default_rng(0).random((2, 8, 24, 24), dtype=np.float32)
    got = onnxruntime.InferenceSession(str(path)).run(None, {"x": x})[0]
    want = reference(torch.from_numpy(x)).detach().numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.timing
def test_ort_measurer_sees_a_larger_conv_as_slower():
    measure = ort_measurer(batch=1, threads=1, runs=7, warmup=2)
    small = measure(ConvShape(8, 8, 1, 1, 1, 32, 32))
    large = measure(ConvShape(128, 128, 3, 1, 1, 64, 64))
    assert 0 < small < large


def _ort_run(model, x):
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0]


def _check_declared_output(model, out) -> None:
    """The graph passes ONNX's full check (shapes declared, as TensorRT's parser expects) and
    declares the output shape ONNX Runtime produced."""
    import onnx

    onnx.checker.check_model(model, full_check=True)
    dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == list(out.shape)


def _fake_quantized_conv_silu(model, x: torch.Tensor) -> torch.Tensor:
    """The int8 timing graph's arithmetic in torch, from its own initializers: activations
    rounded to the input scale's grid (symmetric, clipped to int8), weights decoded from their
    int8 codes and per-channel scales, conv and SiLU in fp32."""
    from onnx import numpy_helper

    t = {
        i.name: torch.from_numpy(numpy_helper.to_array(i).astype(np.float32))
        for i in model.graph.initializer
    }
    scale = t["xs"]
    xq = torch.clamp(torch.round(x / scale), -128, 127) * scale
    weight = t["wq"] * t["ws"][:, None, None, None]
    y = torch.nn.functional.conv2d(xq, weight, t["b"], padding=1)
    return y * torch.sigmoid(y)


def test_int8_timing_graph_is_explicit_qdq_where_tensorrt_fuses_it():
    """What TensorRT is asked to time for --precision int8 (and what compiler.quantize writes):
    fp16 I/O and body; the conv's input quantized per tensor, its weight stored as int8 codes
    with a per-output-channel scale, zero points 0; ONNX Runtime computes the fake-quantized
    conv it describes (fp16 rounding aside)."""
    from onnx import TensorProto, numpy_helper

    shape = ConvShape(8, 16, 3, 1, 1, 12, 12)
    model = conv_onnx(shape, batch=1, precision="int8")
    ops = [n.op_type for n in model.graph.node]
    assert ops == [
        "QuantizeLinear",
        "DequantizeLinear",
        "DequantizeLinear",
        "Conv",
        "Sigmoid",
        "Mul",
    ]
    assert model.opset_import[0].version == 19
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert init["wq"].dtype == np.int8 and init["wq"].shape == (16, 8, 3, 3)
    assert init["ws"].dtype == np.float16 and init["ws"].shape == (16,)
    assert init["wz"].dtype == np.int8 and not init["wz"].any() and init["xz"] == 0
    assert init["xs"].shape == () and init["b"].dtype == np.float16
    weight_dq = next(n for n in model.graph.node if n.output == ["w"])
    assert [(a.name, a.i) for a in weight_dq.attribute] == [("axis", 0)]
    assert np.abs(init["wq"]).max(axis=(1, 2, 3)).tolist() == [127] * 16  # amax / 127 scales
    io = [model.graph.input[0], model.graph.output[0]]
    assert {v.type.tensor_type.elem_type for v in io} == {TensorProto.FLOAT16}

    x = np.random.default_rng(0).standard_normal((1, 8, 12, 12)).astype(np.float16)
    got = _ort_run(model, x).astype(np.float32)
    _check_declared_output(model, got)
    want = _fake_quantized_conv_silu(model, torch.from_numpy(x.astype(np.float32))).numpy()
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-2)  # unquantized: 0.32 off


def test_int8_fp32_timing_graph_is_the_same_qdq_in_fp32():
    """--int8-float fp32 files are timed as what they are: the int8 graph's Q/DQ with fp32
    scales, I/O and body; ONNX Runtime computes the same fake-quantized conv, now to fp32
    rounding (the fp16-body graph needs 2e-2)."""
    from onnx import TensorProto, numpy_helper

    shape = ConvShape(8, 16, 3, 1, 1, 12, 12)
    int8, fp32_body = conv_onnx(shape, 1, "int8"), conv_onnx(shape, 1, "int8-fp32")
    assert [n.op_type for n in fp32_body.graph.node] == [n.op_type for n in int8.graph.node]
    init = {i.name: numpy_helper.to_array(i) for i in fp32_body.graph.initializer}
    assert init["ws"].dtype == init["xs"].dtype == init["b"].dtype == np.float32
    assert init["wq"].dtype == np.int8
    io = [fp32_body.graph.input[0], fp32_body.graph.output[0]]
    assert {v.type.tensor_type.elem_type for v in io} == {TensorProto.FLOAT}
    x = np.random.default_rng(0).standard_normal((1, 8, 12, 12)).astype(np.float32)
    got = _ort_run(fp32_body, x)
    _check_declared_output(fp32_body, got)
    want = _fake_quantized_conv_silu(fp32_body, torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_fp16_timing_graph_is_fp16_throughout_and_computes_the_conv():
    from onnx import TensorProto

    shape = ConvShape(8, 16, 3, 2, 1, 12, 12)
    fp32, fp16 = conv_onnx(shape, 1), conv_onnx(shape, 1, precision="fp16")
    assert [n.op_type for n in fp16.graph.node] == ["Conv", "Sigmoid", "Mul"]
    assert {i.data_type for i in fp16.graph.initializer} == {TensorProto.FLOAT16}
    x = np.random.default_rng(1).random((1, 8, 12, 12), dtype=np.float32)
    want = _ort_run(fp32, x)
    got = _ort_run(fp16, x.astype(np.float16))
    assert got.dtype == np.float16
    _check_declared_output(fp16, got)
    _check_declared_output(fp32, want)
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="use one of fp32, fp16, int8"):
        conv_onnx(shape, 1, precision="bf16")


def test_ort_tables_are_fp32_only(tmp_path):
    with pytest.raises(LatencyTableError, match="ort latency tables are fp32, not int8"):
        open_table("ort", threads=1, precision="int8", path=tmp_path / "t.json")
