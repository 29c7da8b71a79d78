import json

import numpy as np
import onnx
import pytest
import torch

from compiler.apply import apply_plan
from compiler.export import Parity, check_parity, export_onnx
from compiler.pipeline import CompileOptions, plan_for
from graphs.errors import ExportError
from kernels.ort import OrtRunner
from tests.compiler.test_planner import prepared_for


@pytest.fixture(scope="module")
def pruned(tiny_model):
    return apply_plan(
        tiny_model, plan_for(prepared_for(tiny_model, 64), CompileOptions("t", macs=0.5))
    )


def test_static_export_names_shapes_and_parity(tmp_path, pruned):
    path = export_onnx(pruned, tmp_path / "m.onnx", 64)
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version >= 17
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["output0"]
    dims = [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 3 * (64 + 16 + 4), 8]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["stride"] == "32" and json.loads(meta["names"]) == {"0": "0", "1": "1", "2": "2"}
    parity = check_parity(pruned, path, 64)
    assert parity.ok and parity.max_abs_diff < 1e-4
    assert not list(tmp_path.glob("*.tmp"))


def test_dynamic_batch_export(tmp_path, pruned):
    path = export_onnx(pruned, tmp_path / "d.onnx", 64, dynamic=True)
    runner = OrtRunner(path, threads=1)
    x = torch.rand(3, 3, 64, 64)
    (out,) = runner.run(x.numpy())
    exported = pruned.eval()
    exported.detect.export = True
    try:
        with torch.no_grad():
            expected = exported(x).numpy()
    finally:
        exported.detect.export = False
    assert out.shape == expected.shape == (3, 252, 8)
    assert np.abs(out[..., 4:] - expected[..., 4:]).max() < 1e-4
    assert check_parity(pruned, path, 64, batch=2).ok


def test_parity_fails_loudly_on_a_wrong_onnx(tmp_path, tiny_model, pruned):
    path = export_onnx(tiny_model, tmp_path / "other.onnx", 64)
    # an ONNX of another model (same interface) must not pass parity against `pruned`
    parity = check_parity(pruned, path, 64)
    assert not parity.ok and parity.max_abs_diff > 1e-2


def test_parity_ok_is_the_tolerance_comparison():
    assert Parity(1e-4, 0.1, 1e-3).ok and not Parity(2e-3, 1.0, 1e-3).ok


def test_old_opsets_are_refused(tmp_path, pruned):
    with pytest.raises(ExportError, match="opset 17 or newer"):
        export_onnx(pruned, tmp_path / "o.onnx", 64, opset=12)
    assert not list(tmp_path.iterdir())
