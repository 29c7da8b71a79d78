"""Accuracy checks that need a trained detector: the embedded default model (synthetic shapes)."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import needs_ultralytics
from yoloprune.compiler.apply import apply_plan
from yoloprune.compiler.evaluation.evaluate import (
    evaluate,
    onnx_predictor,
    torch_predictor,
    val_dataset,
)
from yoloprune.compiler.export import export_onnx
from yoloprune.compiler.pipeline import CompileOptions, plan_for, prepare
from yoloprune.compiler.train.data import image_files, read_data_yaml
from yoloprune.compiler.train.finetune import TrainSettings, train
from yoloprune.compiler.train.synthetic import SyntheticSpec, generate
from yoloprune.graphs.checkpoint import WEIGHTS_DIR, load_model

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = WEIGHTS_DIR / "yolov5n-shapes.pt"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A fresh synthetic set (another seed than the one the model was trained on)."""
    root = tmp_path_factory.mktemp("acc") / "shapes"
    return read_data_yaml(
        generate(root, SyntheticSpec(train=320, val=60, imgsz=256, seed=11), progress=False)
    )


@pytest.fixture(scope="module")
def embedded():
    return prepare(str(WEIGHTS))


def test_embedded_model_detects(embedded, shapes):
    metrics = evaluate(
        torch_predictor(embedded.model), val_dataset(shapes, 256), shapes.names, progress=False
    )
    assert metrics.map50_95 > 0.5 and metrics.map50 > 0.8


@needs_ultralytics
def test_embedded_ultralytics_model_detects(shapes):
    """The YOLOv8n trained here (benchmarks/train_default_model.py --model yolov8n) loads as an
    ultralytics-family model and detects on the synthetic val images."""
    model, info = load_model(WEIGHTS.with_name("yolov8n-shapes.pt"))
    assert info.family == "ultralytics" and info.imgsz == 256 and info.names == shapes.names
    metrics = evaluate(
        torch_predictor(model), val_dataset(shapes, 256), shapes.names, progress=False
    )
    assert metrics.map50_95 > 0.5 and metrics.map50 > 0.8


@needs_ultralytics
def test_embedded_yolo26_model_detects_end_to_end(shapes):
    """The YOLO26n trained here (benchmarks/train_default_model.py --model yolo26n) loads as an
    NMS-free ultralytics model and detects through its one-to-one head (0.813 on the 300
    images of its own val split, 0.857 on these 60 when written)."""
    from yoloprune.graphs.family import family_of

    model, info = load_model(WEIGHTS.with_name("yolo26n-shapes.pt"))
    assert info.family == "ultralytics" and info.imgsz == 256 and info.names == shapes.names
    assert family_of(model).end2end_capable(model)
    metrics = evaluate(
        torch_predictor(model), val_dataset(shapes, 256), shapes.names, progress=False
    )
    assert metrics.map50_95 > 0.75 and metrics.map50 > 0.9


@pytest.mark.slow
def test_onnx_and_pytorch_map_agree(embedded, shapes, tmp_path):
    # light pruning, no fine-tune: the model still detects, so agreement means something
    plan = plan_for(embedded, CompileOptions(str(WEIGHTS), macs=0.85))
    pruned = apply_plan(embedded.model, plan)
    path = export_onnx(pruned, tmp_path / "p.onnx", 256)
    dataset = val_dataset(shapes, 256)
    by_torch = evaluate(torch_predictor(pruned), dataset, shapes.names, progress=False)
    with onnx_predictor(path) as predict:
        by_onnx = evaluate(predict, dataset, shapes.names, runtime="onnxruntime", progress=False)
    assert by_torch.map50_95 > 0.05  # a real detector, so agreement means something
    assert abs(by_torch.map50_95 - by_onnx.map50_95) <= 0.002
    assert abs(by_torch.map50 - by_onnx.map50) <= 0.002


@pytest.mark.slow
def test_fine_tuning_recovers_accuracy(embedded, shapes):
    plan = plan_for(embedded, CompileOptions(str(WEIGHTS), macs=0.5))
    pruned = apply_plan(embedded.model, plan)
    dataset = val_dataset(shapes, 256)
    before = evaluate(torch_predictor(pruned), dataset, shapes.names, progress=False)
    settings = TrainSettings(
        epochs=2,
        batch=16,
        nominal_batch=16,
        imgsz=256,
        optimizer="adamw",
        lr0=0.0005,
        momentum=0.9,
        warmup_epochs=0.2,
        distill=1.0,
    )
    tuned = train(
        pruned,
        embedded.info,
        dataclasses.replace(shapes, val=()),
        settings,
        teacher=embedded.model,
        progress=False,
    ).model
    after = evaluate(torch_predictor(tuned), dataset, shapes.names, progress=False)
    assert after.map50_95 > before.map50_95 + 0.05


@pytest.mark.slow
def test_distributed_data_parallel_on_cpu(tmp_path, shapes):
    """torchrun with two CPU processes (Gloo): both ranks train, rank 0 writes the results."""
    files = image_files(shapes.train)[:32]
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"{f}\n" for f in files))
    script = tmp_path / "ddp.py"
    script.write_text(f"""
import dataclasses, json, os, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
import torch
from yoloprune.compiler.train.data import read_data_yaml
from yoloprune.compiler.train.finetune import TrainSettings, train
from yoloprune.graphs.checkpoint import load_model
torch.set_num_threads(1)
data = dataclasses.replace(read_data_yaml({str(shapes.root / "data.yaml")!r}),
                           train=(Path({str(listing)!r}),), val=())
model, info = load_model({str(WEIGHTS)!r})
settings = TrainSettings(epochs=1, batch=8, nominal_batch=16, imgsz=128, optimizer="adamw",
                         lr0=0.0005, momentum=0.9, augment=False, ema=False, device="cpu")
result = train(model, info, data, settings, progress=False)
rank = int(os.environ["RANK"])
Path({str(tmp_path)!r}, f"rank{{rank}}.json").write_text(json.dumps(
    {{"world": int(os.environ["WORLD_SIZE"]), "epochs": len(result.history),
     "checksum": float(sum(p.double().sum() for p in model.parameters()))}}))
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29531",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["epochs"] == 1  # rank 0 records history
    # DDP keeps replicas identical: both ranks end with the same weights
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-6)


@pytest.mark.slow
def test_quantization_aware_training_keeps_the_accuracy_of_post_training_quantization(
    embedded, shapes, tmp_path
):
    """One epoch with the INT8 quantizers in the loop (distilling from the fp32 model) keeps
    the mAP of the PTQ model it starts from, within the spread of training seeds, and the QAT
    file keeps the default int8 parity tolerance. It cannot claim more on this model: PTQ
    loses only 0.006 here (fp32 0.8645, PTQ 0.8585 on these 60 images), and QAT's margin over
    PTQ moved with the training seed from -0.0055 to +0.0008 (1 epoch, seeds 0-4) and from
    -0.0039 to +0.0051 (2 epochs), measured 2026-12-01. This test once asserted QAT > PTQ, which
    seed 0 passed by 0.0008."""
    from yoloprune.compiler.precision import lower_checked
    from yoloprune.compiler.quantize import Calibration, post_training_quantized
    from yoloprune.compiler.train.qat import quantization_aware_training

    calibration = Calibration(data=shapes.root / "data.yaml", count=16)
    dataset = val_dataset(shapes, 256)
    ptq, _ = post_training_quantized(embedded.model, 256, calibration)
    settings = TrainSettings(
        epochs=1,
        batch=16,
        nominal_batch=16,
        imgsz=256,
        optimizer="adamw",
        lr0=0.0001,
        momentum=0.9,
        warmup_epochs=0.0,
        distill=1.0,
        augment=False,
        device="cpu",  # as measured: no AMP, no cuDNN
        amp=False,
    )
    qat = quantization_aware_training(
        embedded.model,
        embedded.info,
        dataclasses.replace(shapes, val=()),
        settings,
        calibration,
        teacher=embedded.model,
        progress=False,
    )
    by_ptq = evaluate(torch_predictor(ptq), dataset, shapes.names, progress=False)
    by_qat = evaluate(torch_predictor(qat.quantized), dataset, shapes.names, progress=False)
    assert by_ptq.map50_95 > 0.85
    assert by_qat.map50_95 == pytest.approx(by_ptq.map50_95, abs=0.01)
    fp32 = export_onnx(qat.fp32, tmp_path / "qat.onnx", 256)
    _, parity, record = lower_checked(
        qat.fp32, fp32, 256, "int8", calibration=calibration, trained=qat
    )
    assert parity.ok and record["method"].startswith("QAT")
