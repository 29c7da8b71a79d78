"""Quantization-aware training: INT8 fake quantizers in our fine-tuning loop, both families."""

import copy
import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tests.helpers import needs_ultralytics, randomized, tiny_cfg
from yoloprune.compiler.export import deployed_model
from yoloprune.compiler.quantize import (
    Calibration,
    CalibrationRecord,
    calibration_batches,
    quantized,
    to_int8,
)
from yoloprune.compiler.train.data import read_data_yaml
from yoloprune.compiler.train.finetune import TrainSettings
from yoloprune.compiler.train.qat import _fp32_on_cpu, own_form, quantization_aware_training
from yoloprune.compiler.train.synthetic import SyntheticSpec, generate
from yoloprune.graphs.checkpoint import describe
from yoloprune.graphs.errors import YoloPruneError
from yoloprune.graphs.yolov5 import DetectionModel

ONE_EPOCH = TrainSettings(
    epochs=1,
    batch=8,
    nominal_batch=8,
    imgsz=64,
    optimizer="adamw",
    lr0=0.001,
    warmup_epochs=0.0,
    distill=1.0,
    augment=False,
)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("qat") / "data"
    return read_data_yaml(generate(root, SyntheticSpec(train=16, val=4, imgsz=64), progress=False))


def _quantizers_off(model):
    from modelopt.torch.quantization.nn import TensorQuantizer

    for module in model.modules():
        if isinstance(module, TensorQuantizer):
            module.disable()
    return model


def test_own_form_holds_the_folded_weights_exactly(tiny_model, shapes):
    """The fp32 checkpoint QAT writes keeps its BatchNorm modules, and computes what the
    trained, folded model computes with its quantizers off (to float rounding)."""
    record = CalibrationRecord()
    q, folded = quantized(tiny_model, calibration_batches(_images(shapes), 64, record))
    assert folded == sum(isinstance(m, torch.nn.BatchNorm2d) for m in tiny_model.modules())
    with torch.no_grad():  # stand in for training: move every float weight
        for p in q.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.01)
    fp32 = own_form(q, tiny_model)
    assert [type(m) for m in fp32.modules()] == [type(m) for m in tiny_model.modules()]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():  # float64: only the BatchNorms' float32 constants round (1e-8 each)
        expected = _quantizers_off(q.eval()).double()(x)[0]
        actual = fp32.double()(x)[0]
        untouched = copy.deepcopy(tiny_model).double()(x)[0]
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= 1e-5 * scale
    assert (untouched - expected).abs().max() > 1e-3 * scale  # the weights did move


def _images(shapes):
    return Calibration(data=shapes.root / "data.yaml").files


def test_qat_trains_the_quantized_model_and_exports_it(tmp_path, shapes):

    cfg = tiny_cfg()
    cfg["nc"] = shapes.nc
    tiny_model = randomized(DetectionModel(cfg).eval(), seed=2)
    info = describe(tiny_model, "tiny.yaml", pretrained=True, imgsz=64)
    calibration = Calibration(data=shapes.root / "data.yaml")
    before = [p.detach().clone() for p in tiny_model.parameters()]
    qat = quantization_aware_training(
        tiny_model,
        info,
        dataclasses.replace(shapes, val=()),
        ONE_EPOCH,
        calibration,
        teacher=tiny_model,
        progress=False,
    )
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.parameters(), strict=True))
    assert qat.record["method"].startswith("QAT") and "1 epochs from PTQ" in qat.record["qat"]
    assert len(qat.training.history) == 1 and qat.training.history[0]["kd"] > 0
    convs = [m for m in qat.quantized.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.input_quantizer.amax is not None for m in convs)
    trained = qat.quantized.model[0].conv
    assert not torch.equal(trained.weight, quantized_start(tiny_model, calibration).weight)
    path, _, record = to_int8(
        qat.fp32, tmp_path / "m.int8.onnx", 64, calibration, mode="raw", trained=qat
    )
    assert qat.record.items() <= record.items() and "weights_stored" in record
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["quantization"])["method"].startswith("QAT")
    codes = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    first = next(n for n in proto.graph.node if n.op_type == "Conv")
    producer = next(n for n in proto.graph.node if first.input[1] in n.output)
    scale = trained.weight_quantizer.amax.detach().reshape(-1, 1, 1, 1) / 127
    with torch.no_grad():  # the codes ModelOpt's fake quantization uses
        expected = torch.round(trained.weight_quantizer(trained.weight) / scale)
    np.testing.assert_array_equal(codes[producer.input[0]], expected.numpy().astype(np.int8))


def test_qat_on_the_cpu_trains_in_fp32_even_where_bf16_is_the_default(monkeypatch):
    from yoloprune.compiler.train import finetune

    monkeypatch.setattr(finetune, "cpu_computes_bf16", lambda: True)
    cpu = dataclasses.replace(ONE_EPOCH, device="cpu")
    assert finetune.autocast_dtype(cpu.amp, torch.device("cpu")) is torch.bfloat16
    assert _fp32_on_cpu(cpu).amp is False
    with pytest.raises(YoloPruneError, match=r"^--amp: quantization-aware training runs in fp32"):
        _fp32_on_cpu(dataclasses.replace(cpu, amp=True))
    gpu = dataclasses.replace(ONE_EPOCH, device="cuda")  # AMP there as before: fp16
    assert _fp32_on_cpu(gpu) is gpu


def quantized_start(model, calibration):
    """The first conv as PTQ leaves it (QAT's starting point)."""
    from yoloprune.compiler.quantize import post_training_quantized

    return post_training_quantized(model, 64, calibration)[0].model[0].conv


@needs_ultralytics
@pytest.mark.parametrize("spec", ["yolov8n.yaml", "yolo26n.yaml"])
def test_ultralytics_qat_keeps_the_dfl_in_float_and_exports(tmp_path, shapes, spec):
    from yoloprune.graphs.ultralytics_family import build

    model, _ = build(spec, nc=shapes.nc)
    model.eval()
    info = describe(model, spec, pretrained=False, imgsz=64)
    calibration = Calibration(data=shapes.root / "data.yaml")
    settings = dataclasses.replace(ONE_EPOCH, distill=0.0)
    qat = quantization_aware_training(
        model, info, dataclasses.replace(shapes, val=()), settings, calibration, progress=False
    )
    dfl = getattr(qat.quantized.model[-1], "dfl", None)
    if spec.startswith("yolov8"):
        assert all(not q.is_enabled for n, q in dfl.named_modules() if n.endswith("quantizer"))
    for mode in ("raw", "end2end") if spec.startswith("yolo26") else ("raw",):
        out, reference, _ = to_int8(
            qat.fp32, tmp_path / f"{mode}.int8.onnx", 64, calibration, mode=mode, trained=qat
        )
        from yoloprune.kernels.ort import OrtRunner

        images = next(calibration_batches(calibration.files, 64, CalibrationRecord(), batch=1))
        with OrtRunner(out) as runner:
            (actual,) = runner.infer(images.numpy())[:1]
        with torch.no_grad():
            expected = deployed_model(reference, mode, runtime_forms=False)(images).numpy()
        assert actual.shape == expected.shape and np.isfinite(actual).all()
        nodes = [n.op_type for n in onnx.load(str(out)).graph.node]
        assert nodes.count("QuantizeLinear") == nodes.count("Conv")  # every conv, DFL none
