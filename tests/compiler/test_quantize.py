"""INT8 post-training quantization: explicit Q/DQ as TensorRT wants it, calibrated on images."""

import itertools
import json
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from yoloprune.compiler.cli import main
from yoloprune.compiler.options import CompileOptions
from yoloprune.compiler.quantize import (
    Calibration,
    CalibrationRecord,
    calibration_batches,
    quantized,
    to_int8,
)
from yoloprune.compiler.train.data import DataError
from yoloprune.graphs.errors import YoloPruneError


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Eight seeded RGB images of mixed sizes, one of them not an image at all."""
    folder = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(64, 64), (48, 80), (80, 40)] * 3):
        if i == 8:
            (folder / "broken.png").write_bytes(b"not a png")
            continue
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def constants(proto) -> dict:
    values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def test_int8_file_has_per_channel_weights_and_per_tensor_activations(tmp_path, tiny_model, images):
    path, _, record = to_int8(
        tiny_model, tmp_path / "m.int8.onnx", 64, Calibration(images), mode="raw"
    )
    proto = onnx.load(str(path))
    values, producers = constants(proto), {o: n for n in proto.graph.node for o in n.output}
    int8_weights = {i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert convs
    for conv in convs:
        for position, per_channel in ((0, False), (1, True)):  # input, weight
            dq = producers[conv.input[position]]
            assert dq.op_type == "DequantizeLinear", conv.name
            scale, zero = values[dq.input[1]], values[dq.input[2]]
            assert zero.dtype == np.int8 and not zero.any()  # symmetric int8
            assert (scale.ndim == 1 and scale.size > 1) if per_channel else scale.ndim == 0
            if per_channel:  # weights stored as int8, not fp32 quantized at run time
                assert dq.input[0] in int8_weights
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)  # folded first
    quantizing = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantizing) == len(convs)  # conv inputs only: not the SPPF's max pools
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["precision"] == "int8" and json.loads(meta["quantization"]) == record
    assert record["calibration_images"] == 8 and record["calibration_unreadable"] == 1
    assert record["weights_stored"] == f"int8 ({len(convs)} tensors)"


def test_a_quantized_conv_in_onnx_runtime_equals_the_fake_quantized_one(tiny_model, images):
    """Within one quantization step: here to float rounding, the ops being the same."""
    from yoloprune.kernels.ort import OrtRunner

    record = CalibrationRecord()
    model, _ = quantized(tiny_model, calibration_batches(Calibration(images).files, 64, record))
    conv = model.model[0].conv
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = conv(x).numpy()
    path = f"{images.parent}/conv.onnx"
    torch.onnx.export(conv, x, path, opset_version=17, dynamo=False, input_names=["images"])
    with OrtRunner(path) as runner:
        (actual,) = runner.infer(x.numpy())
    step = (
        float(conv.input_quantizer.amax) / 127 * float(conv.weight.abs().sum(dim=(1, 2, 3)).max())
    )
    assert np.abs(actual - expected).max() < min(1e-4, step)


def test_int8_without_images_is_one_line_naming_both_sources(tmp_path, tiny_yaml, capsys):
    with pytest.raises(DataError, match=r"--data data\.yaml.*--calib-images DIR"):
        CompileOptions(str(tiny_yaml), precision="int8")
    out = tmp_path / "new" / "deeper" / "m.onnx"
    assert main(["export", str(tiny_yaml), "--out", str(out), "--precision", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--calib-images DIR" in err
    assert not (tmp_path / "new").exists()  # refused before any folder or file was made


def test_export_writes_onnx_files_only_and_leaves_no_folder_when_it_fails(
    tmp_path, tiny_yaml, capsys, monkeypatch
):
    from yoloprune.compiler import export

    for out in (tmp_path / "m.pt", tmp_path / "x.txt"):
        assert main(["export", str(tiny_yaml), "--out", str(out)]) == 2
        assert "give a path ending in .onnx" in capsys.readouterr().err
    monkeypatch.setattr(export, "DEFAULT_PARITY_TOLERANCE", 1e-30)  # parity fails after export
    out = tmp_path / "new" / "deeper" / "m.onnx"
    assert main(["export", str(tiny_yaml), "--out", str(out), "--imgsz", "64"]) == 2
    assert "ONNX Runtime differs from PyTorch" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tiny_yaml]  # the folders made for it are gone


def test_an_empty_calibration_folder_is_one_line(tmp_path, tiny_yaml, tiny_model, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["export", str(tiny_yaml), "--out", str(tmp_path / "m.onnx"), "--precision", "int8"]
    assert main([*argv, "--calib-images", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no images" in err and str(empty) in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"junk")
    message = f"--calib-images {broken}: no calibration image could be read"
    with pytest.raises(YoloPruneError, match=re.escape(message)):
        to_int8(tiny_model, tmp_path / "x.onnx", 64, Calibration(broken), mode="raw")
    assert not (tmp_path / "x.onnx").exists()


def test_compile_writes_the_int8_file_with_its_calibration_record(
    tmp_path, tiny_yaml, images, capsys
):
    out = tmp_path / "out"
    argv = ["compile", str(tiny_yaml), "--imgsz", "64", "--no-bench", "--out", str(out)]
    assert main([*argv, "--precision", "int8", "--calib-images", str(images)]) == 0
    report = json.loads((out / "report.json").read_text())
    lowered = report["precisions"]["int8"]
    read = lowered["quantization"]["calibration_images"]
    assert f", calibrated on {read} images), parity" in capsys.readouterr().out  # all it read
    assert lowered["file"] == "tiny-pruned.int8.onnx" and (out / lowered["file"]).is_file()
    assert lowered["parity"]["ok"] and "calibration images" in lowered["parity"]["input"]
    assert lowered["quantization"]["calibration_images"] == 8


def test_storing_weights_as_int8_changes_no_output(tmp_path, tiny_model, images):
    from yoloprune.compiler.export import export_onnx
    from yoloprune.compiler.quantize import store_int8_weights
    from yoloprune.kernels.ort import OrtRunner

    batches = calibration_batches(Calibration(images).files, 64, CalibrationRecord())
    model, _ = quantized(tiny_model, batches)
    runtime = export_onnx(model, tmp_path / "runtime.onnx", 64, simplify=False, mode="raw")
    proto = onnx.load(str(runtime))
    stored = store_int8_weights(proto)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp_path / "stored.onnx"))
    assert stored == sum(n.op_type == "Conv" for n in proto.graph.node)
    initializers = {i.name for i in proto.graph.initializer}
    quantized_constants = [
        n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in initializers
    ]
    assert quantized_constants == []
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    with OrtRunner(runtime) as a, OrtRunner(tmp_path / "stored.onnx") as b:
        np.testing.assert_array_equal(a.infer(x)[0], b.infer(x)[0])
    assert (tmp_path / "stored.onnx").stat().st_size < 0.5 * runtime.stat().st_size


@pytest.fixture(scope="module")
def three_convs():
    """A YOLOv5 of three convs and a one-level head: ModelOpt's entropy search costs about a
    second and a half per quantizer, which the tiny model's sixty would make a minute and a
    half."""
    from tests.helpers import randomized, tiny_cfg
    from yoloprune.graphs.yolov5 import DetectionModel

    cfg = tiny_cfg()
    cfg["backbone"] = [[-1, 1, "Conv", [16, 6, 2, 2]], [-1, 1, "Conv", [32, 3, 2]]]
    cfg["backbone"].append([-1, 1, "Conv", [32, 3, 2]])
    cfg["head"] = [[[2], 1, "Detect", ["nc", "anchors"]]]
    cfg["anchors"] = [[10, 13, 16, 30, 33, 23]]
    return randomized(DetectionModel(cfg).eval(), seed=0)


def test_entropy_and_percentile_calibrators_narrow_the_activation_ranges(three_convs, images):
    """Histogram calibrators clip outliers: each conv input's range is at most the max
    calibrator's; weights keep their max either way; the file records the method."""
    files = Calibration(images).files
    ranges = {}
    for method in ("max", "entropy", "percentile"):
        q, _ = quantized(three_convs, calibration_batches(files, 64, CalibrationRecord()), method)
        convs = [m for m in q.modules() if isinstance(m, torch.nn.Conv2d)]
        ranges[method] = (
            torch.stack([m.input_quantizer.amax.detach().reshape(()) for m in convs]),
            torch.cat([m.weight_quantizer.amax.detach().flatten() for m in convs]),
        )
    for method in ("entropy", "percentile"):
        inputs, weights = ranges[method]
        assert (inputs <= ranges["max"][0] * (1 + 1e-6)).all()
        assert (inputs < ranges["max"][0]).any()  # something was clipped
        torch.testing.assert_close(weights, ranges["max"][1], rtol=0, atol=0)


def test_calibration_method_is_recorded_and_bad_ones_refused(tmp_path, tiny_model, images, capsys):
    _, _, record = to_int8(
        tiny_model,
        tmp_path / "m.int8.onnx",
        64,
        Calibration(images, method="percentile"),
        mode="raw",
    )
    assert record["calibrator"].startswith("percentile (99.99")
    argv = ["export", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "x.onnx")]
    assert main([*argv, "--calib-method", "entropy"]) == 2  # without int8
    assert "--calib-method apply to INT8 only" in capsys.readouterr().err
    with pytest.raises(YoloPruneError, match="--calib-method median: use one of max"):
        Calibration(images, method="median")


def test_qat_is_refused_where_it_cannot_run(tiny_yaml, images, tmp_path):
    data = tmp_path / "data.yaml"
    data.write_text(f"path: {images}\ntrain: .\nval: .\nnames: [a, b, c]\n")
    common = dict(precision="int8", epochs=2, data=data, calib_images=images)
    with pytest.raises(YoloPruneError, match="drop --steps"):
        CompileOptions(str(tiny_yaml), macs=0.5, steps=2, **common)
    with pytest.raises(YoloPruneError, match="QAT would regrow the zeroed weights"):
        CompileOptions(str(tiny_yaml), ratio=0.3, method="unstructured", **common)


def test_every_int8_weight_code_in_the_file_is_modelopts(tmp_path, tiny_model, images):
    """ModelOpt rounds w * (127 / amax), QuantizeLinear w / (amax / 127): weights are snapped to
    their fake-quantized values before export, so no code lands across a half step."""
    from yoloprune.compiler.quantize import post_training_quantized

    calibration = Calibration(images)
    path, _, _ = to_int8(tiny_model, tmp_path / "m.int8.onnx", 64, calibration, mode="raw")
    proto = onnx.load(str(path))
    codes = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    fresh, _ = post_training_quantized(tiny_model, 64, calibration)  # not snapped
    modules = dict(fresh.named_modules())
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in modules.values())
    for node in convs:
        conv = modules[module_path(node.name)]
        scale = conv.weight_quantizer.amax.detach().reshape(-1, 1, 1, 1) / 127
        with torch.no_grad():
            expected = torch.round(conv.weight_quantizer(conv.weight) / scale).numpy()
        actual = codes[producers[node.input[1]].input[0]]
        np.testing.assert_array_equal(actual, expected.astype(np.int8))


def module_path(node_name: str) -> str:
    """The module an exported node came from: /model.2/m/m.0/cv1/conv/Conv is model.2.m.0.cv1.conv
    (a Sequential's scope repeats its name)."""
    parts: list[str] = []
    for segment in node_name.strip("/").split("/")[:-1]:
        if parts and segment.startswith(parts[-1] + "."):
            parts[-1] = segment
        else:
            parts.append(segment)
    return ".".join(parts)


def test_calibration_keeps_the_statistics_of_batchnorms_it_does_not_fold(tiny_v50_model, images):
    """v5.0's BottleneckCSP normalises a concat with its own BatchNorm (no conv to fold into):
    calibration runs the training forward, but that BatchNorm must stay in eval mode."""
    csp_bns = {
        f"{name}.bn": (m.bn.running_mean.clone(), m.bn.running_var.clone())
        for name, m in tiny_v50_model.named_modules()
        if type(m).__name__ == "BottleneckCSP"
    }
    assert csp_bns  # the model has them
    batches = calibration_batches(Calibration(images).files, 64, CalibrationRecord())
    q, _ = quantized(tiny_v50_model, batches)
    modules = dict(q.named_modules())
    for name, (mean, var) in csp_bns.items():
        assert isinstance(modules[name], torch.nn.BatchNorm2d) and not modules[name].training
        assert torch.equal(modules[name].running_mean, mean)
        assert torch.equal(modules[name].running_var, var)


def _first_conv_kept_in_float(model) -> dict:
    """A stand-in for the sensitivity pass: the first conv taken out of quantization."""
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.input_quantizer.disable()
    conv.weight_quantizer.disable()
    return {"kept": ["first conv"]}


@pytest.fixture(scope="module")
def int8_bodies(tmp_path_factory, images):
    """The embedded (trained) YOLOv5n's INT8 file with each float part at 128 px, the first
    conv kept out of INT8. (A random-init model's activations can leave fp16's range.)"""
    from yoloprune.graphs.checkpoint import WEIGHTS_DIR, load_model

    model, _ = load_model(WEIGHTS_DIR / "yolov5n-shapes.pt")
    folder = tmp_path_factory.mktemp("bodies")
    files = {}
    for body in ("fp16", "fp32"):
        calibration = Calibration(images, float_precision=body)
        path, _, record = to_int8(
            model,
            folder / f"{body}.int8.onnx",
            128,
            calibration,
            mode="raw",
            keep_float=_first_conv_kept_in_float,
        )
        files[body] = (onnx.load(str(path)), record, path)
    return files


@pytest.mark.parametrize("body", ["fp16", "fp32"])
def test_the_int8_files_float_part_has_the_precision_asked(int8_bodies, body):
    """fp16 (the default): every Q/DQ scale, the kept conv's weights and the float ops' tensors
    are fp16 (opset 19: a DequantizeLinear outputs its scale's type), inputs and outputs fp32;
    fp32: as ModelOpt exports it."""
    proto, record, _ = int8_bodies[body]
    want = np.float16 if body == "fp16" else np.float32
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == (
        19 if body == "fp16" else 17
    )
    values = constants(proto)
    qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(values[n.input[1]].dtype == want for n in qdq)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    kept = [c for c in convs if c.input[1] in values]  # no DequantizeLinear: a float weight
    assert len(kept) == 1 and len(convs) > 1  # the stand-in pass kept exactly one
    assert values[kept[0].input[1]].dtype == want
    for io in (*proto.graph.input, *proto.graph.output):
        assert io.type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # the pipeline's fp32
    assert record["float"].startswith(body)
    assert record["sensitivity"] == {"kept": ["first conv"], "kept_precision": body}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["quantization"])["float"] == record["float"]


def test_an_fp16_float_part_keeps_every_code_and_rounds_only_the_scales(int8_bodies, images):
    """Exact: every Q/DQ node of the fp16 file has the fp32 file's int8 codes and zero points,
    and its scale is the fp32 scale rounded to fp16. Run: on an image the scores move by fp16
    rounding of the activations (a code flipped near a half step moves one a little more)."""
    from yoloprune.kernels.ort import OrtRunner

    nodes, values = {}, {}
    for body, (proto, _, _) in int8_bodies.items():
        nodes[body] = {
            n.name: n
            for n in proto.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear")
        }
        values[body] = constants(proto)
    assert nodes["fp16"].keys() == nodes["fp32"].keys() and nodes["fp16"]
    tiny = np.finfo(np.float16).tiny  # the fp16 file counts the fp32 scales it cannot hold
    below = sum(int((values["fp32"][n.input[1]] < tiny).sum()) for n in nodes["fp32"].values())
    assert int8_bodies["fp16"][1]["scales_below_fp16_normal"] == below
    assert "scales_below_fp16_normal" not in int8_bodies["fp32"][1]
    for name, node in nodes["fp16"].items():
        twin = nodes["fp32"][name]
        half, full = values["fp16"], values["fp32"]
        np.testing.assert_array_equal(half[node.input[1]], full[twin.input[1]].astype(np.float16))
        np.testing.assert_array_equal(half[node.input[2]], full[twin.input[2]])
        if node.input[0] in half:  # a weight's int8 codes
            np.testing.assert_array_equal(half[node.input[0]], full[twin.input[0]])
    batch = next(calibration_batches(Calibration(images).files, 128, CalibrationRecord(), batch=1))
    outputs = {}
    for body, (_, _, path) in int8_bodies.items():
        with OrtRunner(path) as runner:
            outputs[body] = runner.infer(batch.numpy())[0]
    assert outputs["fp16"].dtype == np.float32 and outputs["fp16"].shape == outputs["fp32"].shape
    scores = np.abs(outputs["fp16"][..., 4:] - outputs["fp32"][..., 4:])
    boxes = np.abs(outputs["fp16"][..., :4] - outputs["fp32"][..., :4]) / 128
    assert 0 < np.median(scores) < 0.01 and scores.max() < 0.25  # measured 0.002 and 0.10
    assert boxes.max() < 0.05  # measured 0.02 of the image size


def test_an_unknown_int8_float_precision_is_refused(tmp_path, tiny_yaml, images, capsys):
    with pytest.raises(YoloPruneError, match="--int8-float bf16: use one of fp16, fp32"):
        Calibration(images, float_precision="bf16")
    with pytest.raises(YoloPruneError, match="--int8-float fp8: use one of fp16, fp32"):
        CompileOptions(str(tiny_yaml), precision="int8", calib_images=images, int8_float="fp8")
    argv = ["export", str(tiny_yaml), "--out", str(tmp_path / "x.onnx"), "--int8-float", "fp32"]
    assert main(argv) == 2  # without --precision int8: refused, not ignored
    err = capsys.readouterr().err
    assert "--int8-float apply to INT8 only: add --precision int8" in err
    assert not (tmp_path / "x.onnx").exists()


def test_each_int8_body_is_checked_at_its_own_parity_tolerance(tmp_path, images):
    """The fp32 body keeps the tighter 0.25 bound against the fake-quantized model (a broken
    export reads near 1); the fp16 body, which flips more codes, 0.5."""
    from yoloprune.compiler.export import export_onnx
    from yoloprune.compiler.precision import default_tolerance, lower_checked
    from yoloprune.graphs.checkpoint import WEIGHTS_DIR, load_model

    fp16, fp32 = Calibration(images), Calibration(images, float_precision="fp32")
    assert default_tolerance("int8", fp16) == 0.5 and default_tolerance("int8", fp32) == 0.25
    assert default_tolerance("fp16") == 1e-2 and default_tolerance("int8") == 0.25
    model, _ = load_model(WEIGHTS_DIR / "yolov5n-shapes.pt")
    base = export_onnx(model, tmp_path / "m.onnx", 128)
    _, parity, record = lower_checked(model, base, 128, "int8", calibration=fp32)
    assert parity.ok and parity.tolerance == 0.25 and record["float"] == "fp32"


@pytest.mark.parametrize(("total", "count"), [(10, 4), (7, 5), (30, 7), (3, 8)])
def test_calibration_images_are_spread_over_the_whole_set(tmp_path, total, count):
    """The first and the last image and an even spread between, in order; all of a smaller
    set (a step of total // count took the first ``count`` of 7 images, never the last)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(total):
        (folder / f"{i:02d}.png").write_bytes(b"")  # listed, never decoded here
    files = Calibration(folder, count=count).files
    indices = [int(f.stem) for f in files]
    assert len(indices) == min(total, count) and indices == sorted(set(indices))
    assert indices[0] == 0 and indices[-1] == total - 1
    gaps = [b - a for a, b in itertools.pairwise(indices)]
    assert not gaps or max(gaps) - min(gaps) <= 1
