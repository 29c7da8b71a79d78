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


def test_ort_measurer_sees_a_larger_conv_as_slower():
    measure = ort_measurer(batch=1, threads=1, runs=7, warmup=2)
    small = measure(ConvShape(8, 8, 1, 1, 1, 32, 32))
    large = measure(ConvShape(128, 128, 3, 1, 1, 64, 64))
    assert 0 < small < large
