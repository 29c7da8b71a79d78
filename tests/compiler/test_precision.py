"""Precision pass: the fp16 ONNX keeps fp32 inputs and outputs, says what it is, and matches the
fp32 PyTorch model within its stated tolerance on ONNX Runtime."""

import json

import numpy as np
import onnx
import pytest

from tests.helpers import needs_ultralytics
from yoloprune.compiler.cli import main
from yoloprune.compiler.export import export_onnx
from yoloprune.compiler.options import CompileOptions
from yoloprune.compiler.precision import (
    PARITY_TOLERANCES,
    lower_checked,
    precision_path,
    to_fp16,
)
from yoloprune.graphs.checkpoint import WEIGHTS_DIR, load_model
from yoloprune.graphs.errors import PlanError
from yoloprune.kernels.ort import OrtRunner

EMBEDDED = WEIGHTS_DIR / "yolov5n-shapes.pt"


def properties(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_fp16_file_of_the_trained_model_is_within_its_tolerance(tmp_path):
    model, _ = load_model(EMBEDDED)
    fp32 = export_onnx(model, tmp_path / "m.onnx", 320)
    path, parity, _ = lower_checked(model, fp32, 320, "fp16")
    assert path == tmp_path / "m.fp16.onnx" == precision_path(fp32, "fp16")
    assert parity.ok and parity.tolerance == PARITY_TOLERANCES["fp16"] == 1e-2
    assert parity.max_abs_diff > 1e-5  # it is really fp16 (fp32 agrees to ~1e-6)
    proto = onnx.load(str(path))
    io = [*proto.graph.input, *proto.graph.output]
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in io)
    weights = {i.name: i for i in proto.graph.initializer}
    conv_weights = [weights[n.input[1]] for n in proto.graph.node if n.op_type == "Conv"]
    assert conv_weights and all(w.data_type == onnx.TensorProto.FLOAT16 for w in conv_weights)
    meta = properties(path)
    assert meta["precision"] == "fp16" and properties(fp32)["precision"] == "fp32"
    quantization = json.loads(meta["quantization"])
    assert quantization["io"] == "fp32" and "TopK" in quantization["kept_fp32_ops"]
    assert meta["names"] == properties(fp32)["names"]  # the rest of the metadata is kept
    assert path.stat().st_size < 0.55 * fp32.stat().st_size


def test_a_parity_miss_writes_nothing(tmp_path):
    model, _ = load_model(EMBEDDED)
    fp32 = export_onnx(model, tmp_path / "m.onnx", 320)
    with pytest.raises(Exception, match=r"m\.fp16\.onnx: ONNX Runtime differs"):
        lower_checked(model, fp32, 320, "fp16", tolerance=1e-7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@needs_ultralytics
def test_yolo26_end_to_end_head_converts_and_runs(tmp_path):
    """YOLO26's head casts to float (the converter retypes the value but not the Cast) and
    feeds Resize a constant scale: both must survive the conversion and load in ORT."""
    model, _ = load_model("yolo26n.yaml")
    fp32 = export_onnx(model, tmp_path / "m.onnx", 128)
    fp16 = to_fp16(fp32, tmp_path / "m.fp16.onnx")
    images = np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32)
    with OrtRunner(fp16) as runner:
        (out,) = runner.infer(images)
    with OrtRunner(fp32) as runner:
        (want,) = runner.infer(images)
    assert out.dtype == np.float32 and out.shape == want.shape and np.isfinite(out).all()


def test_compile_writes_the_fp16_file_beside_the_fp32_one(tmp_path, tiny_yaml, capsys):
    out = tmp_path / "out"
    argv = ["compile", str(tiny_yaml), "--imgsz", "64", "--no-bench", "--out", str(out)]
    assert main([*argv, "--precision", "fp16"]) == 0
    report = json.loads((out / "report.json").read_text())
    lowered = report["precisions"]["fp16"]
    assert lowered["file"] == "tiny-pruned.fp16.onnx" and (out / lowered["file"]).is_file()
    assert lowered["parity"]["ok"] and lowered["parity"]["tolerance"] == 1e-2
    assert report["precisions"]["fp32"]["file"] == "tiny-pruned.onnx"
    assert report["files"]["onnx_fp16"] == "tiny-pruned.fp16.onnx"
    assert "| fp16 | tiny-pruned.fp16.onnx |" in (out / "report.md").read_text()
    assert "fp16: tiny-pruned.fp16.onnx" in capsys.readouterr().out
    from yoloprune.compiler.cli import onnx_at_precision

    assert onnx_at_precision(out / "tiny-pruned.onnx", "fp16") == out / lowered["file"]


def test_unknown_precisions_are_refused_before_any_work():
    with pytest.raises(PlanError, match="--precision int4: use one of fp32, fp16"):
        CompileOptions("m.yaml", precision="int4")


def test_bench_times_fp16_files_on_onnx_runtime_and_says_so(tmp_path, tiny_model):
    from yoloprune.compiler.bench import BenchSettings, bench

    fp32 = export_onnx(tiny_model, tmp_path / "m.onnx", 64)
    fp16 = to_fp16(fp32, precision_path(fp32, "fp16"))
    result = bench([str(fp32), str(fp16)], BenchSettings(runs=3, warmup=1, threads=1))
    assert [row["precision"] for row in result["rows"]] == ["fp32", "fp16"]
    assert result["precision"] == "per row"


def test_export_writes_its_files_together_and_drops_stale_siblings(tmp_path, tiny_yaml, capsys):
    out = tmp_path / "m.onnx"
    base = ["export", str(tiny_yaml), "--out", str(out), "--imgsz", "64"]
    assert main([*base, "--precision", "fp16"]) == 0
    assert (tmp_path / "m.fp16.onnx").is_file()
    assert main([*base, "--precision", "fp16", "--precision-parity-tol", "1e-9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--precision-parity-tol" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.fp16.onnx", "m.onnx", "tiny.yaml"]
    assert main(base) == 0  # a new fp32 export: the old fp16 sibling would not match it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "tiny.yaml"]
    assert main([*base, "--data", str(tiny_yaml)]) == 2
    assert "--data apply to INT8 only" in capsys.readouterr().err
