import ast
import types

import numpy as np
import onnx
import pytest
import torch
import yaml

from tests.compiler.test_planner import prepared_for
from tests.helpers import needs_ultralytics, tiny_cfg
from yoloprune.compiler.apply import apply_plan
from yoloprune.compiler.cli import main
from yoloprune.compiler.export import Parity, check_parity, export_onnx
from yoloprune.compiler.pipeline import CompileOptions, plan_for
from yoloprune.graphs.errors import ExportError
from yoloprune.kernels.ort import OrtRunner


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
    # read as yolov5's DetectMultiBackend reads it (detect.py / val.py)
    stride, names = int(meta["stride"]), ast.literal_eval(meta["names"])
    assert stride == 32 and names[0] == "0" and names == {0: "0", 1: "1", 2: "2"}
    parity = check_parity(pruned, path, 64)
    assert parity.ok and parity.max_abs_diff < 1e-4
    assert not list(tmp_path.glob("*.tmp"))


def test_dynamic_batch_export(tmp_path, pruned):
    path = export_onnx(pruned, tmp_path / "d.onnx", 64, dynamic=True)
    x = torch.rand(3, 3, 64, 64)
    with OrtRunner(path, threads=1) as runner:
        assert not isinstance(runner.input_shape()[0], int)  # the batch axis is dynamic
        (out,) = runner.infer(x.numpy())
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


def test_end_to_end_parity_counts_what_it_compared_and_says_when_nothing():
    """Top-k rows (x1, y1, x2, y2, score, class): rows above the k-th score by more than the
    tolerance are matched; with flat scores none is, and the report says the boxes went
    unchecked (here they differ by 30 px)."""
    from yoloprune.compiler.export import _end2end_diff
    from yoloprune.compiler.report import parity_warnings

    want = np.array([[[0, 0, 10, 10, 0.9, 1], [5, 5, 20, 20, 0.5, 2], [1, 1, 4, 4, 0.2, 0]]])
    got = want.copy()
    got[0, 1, :4] += 1.0  # one pixel off, a compared row
    worst, pixels, compared = _end2end_diff(got, want, 64, 1e-3)
    assert compared == 4 and pixels == 1.0 and worst == pytest.approx(1 / 64)
    flat, moved = want.copy(), want.copy()
    flat[..., 4] = moved[..., 4] = 0.5
    moved[..., :4] += 30
    worst, _, compared = _end2end_diff(moved, flat, 64, 1e-3)
    assert compared == 0 and worst == 0.0  # nothing above the k-th: nothing compared
    parity = Parity(worst, 0.0, 1e-3, compared=compared).to_dict()
    assert parity_warnings(parity)[0].startswith("ONNX parity compared no detection")
    assert parity_warnings(Parity(0.0, 0.0, 1e-3, compared=4).to_dict()) == []
    assert parity_warnings(Parity(0.0, 0.0, 1e-3).to_dict()) == []  # raw outputs: all compared


def test_old_opsets_are_refused(tmp_path, pruned):
    with pytest.raises(ExportError, match="opset 17 or newer"):
        export_onnx(pruned, tmp_path / "o.onnx", 64, opset=12)
    assert not list(tmp_path.iterdir())


@needs_ultralytics
@pytest.mark.parametrize("spec,mode", [("yolov8n.yaml", "raw"), ("yolo26n.yaml", "end2end")])
def test_ultralytics_metadata_reads_as_autobackend_reads_it(tmp_path, spec, mode):
    """Parsed by ultralytics' own reader (BaseBackend.apply_metadata, used by AutoBackend)."""
    from ultralytics.nn.backends.base import BaseBackend

    from yoloprune.graphs.checkpoint import load_model

    model, _ = load_model(spec)
    path = export_onnx(model, tmp_path / "m.onnx", 64, mode=mode)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    backend = types.SimpleNamespace(dynamic=False)
    BaseBackend.apply_metadata(backend, meta)
    assert backend.stride == 32 and backend.batch == 1 and backend.channels == 3
    assert backend.imgsz == [64, 64] and backend.task == "detect"
    assert backend.names[0] == "0" and len(backend.names) == 80
    assert backend.end2end is (mode == "end2end")


def test_export_command_writes_what_compile_writes(tmp_path, capsys):
    """`export` of a compile's pruned checkpoint gives compile's ONNX graph, node for node and
    weight for weight; the unpruned model exports the same way (the baseline)."""
    model = tmp_path / "tiny.yaml"
    model.write_text(yaml.safe_dump(tiny_cfg()))
    out = tmp_path / "out"
    assert main(["compile", str(model), "--imgsz", "64", "--out", str(out), "--no-bench"]) == 0
    again = tmp_path / "again.onnx"
    assert main(["export", str(out / "tiny-pruned.pt"), "--imgsz", "64", "--out", str(again)]) == 0
    compiled, exported = (onnx.load(str(p)) for p in (out / "tiny-pruned.onnx", again))
    assert compiled.graph.SerializeToString() == exported.graph.SerializeToString()
    assert {p.key: p.value for p in compiled.metadata_props} == {
        p.key: p.value for p in exported.metadata_props
    }
    baseline = tmp_path / "baseline.onnx"
    assert main(["export", str(model), "--imgsz", "64", "--out", str(baseline)]) == 0
    assert "parity" in capsys.readouterr().out
    assert baseline.stat().st_size > again.stat().st_size


def test_export_command_writes_nothing_when_parity_fails(tmp_path, capsys):
    target = tmp_path / "m.onnx"
    argv = [
        "export",
        "yolov5n.yaml",
        "--imgsz",
        "64",
        "--out",
        str(target),
        "--parity-tol",
        "1e-12",
    ]
    from yoloprune.compiler.cli import main

    assert main(argv) == 2
    assert "nothing was written" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
