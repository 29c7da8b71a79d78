"""Training objectives: ultralytics' anchor-free loss driven by our own loop (YOLOv8, YOLO26)."""

import dataclasses

import pytest
import torch

from tests.helpers import needs_ultralytics
from yoloprune.compiler.train.data import read_data_yaml
from yoloprune.compiler.train.finetune import TrainSettings, train
from yoloprune.compiler.train.synthetic import SyntheticSpec, generate
from yoloprune.graphs.checkpoint import describe

FAST = TrainSettings(
    epochs=12,
    batch=8,
    nominal_batch=8,
    imgsz=64,
    optimizer="adamw",
    lr0=0.002,
    warmup_epochs=0.5,
    augment=False,
)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "data"
    return read_data_yaml(generate(root, SyntheticSpec(train=32, val=8, imgsz=64), progress=False))


def ultralytics_model(spec, nc):
    from yoloprune.graphs.ultralytics_family import build

    model, _ = build(spec, nc=nc)
    return model, describe(model, spec, pretrained=False, imgsz=64)


@needs_ultralytics
@pytest.mark.parametrize(
    ("spec", "parts"),
    [("yolov8n.yaml", ("box", "cls", "dfl")), ("yolo26n.yaml", ("box", "cls", "l1"))],
)
def test_anchor_free_loss_decreases_in_our_loop(shapes, spec, parts):
    model, info = ultralytics_model(spec, shapes.nc)
    no_val = dataclasses.replace(shapes, val=())
    result = train(model, info, no_val, FAST, progress=False)
    first, last = result.history[0], result.history[-1]
    assert set(parts) <= set(first)
    assert sum(last[p] for p in parts) < 0.85 * sum(first[p] for p in parts)
    assert tuple(p.shape for p in result.model.parameters()) == tuple(
        p.shape for p in model.parameters()
    )  # trained as it is, never rebuilt from YAML


@needs_ultralytics
def test_anchor_free_distillation_is_zero_for_identical_outputs_and_used(shapes):
    from yoloprune.compiler.train.objective import AnchorFreeObjective

    for spec in ("yolov8n.yaml", "yolo26n.yaml"):
        model, info = ultralytics_model(spec, shapes.nc)
        objective = AnchorFreeObjective(model, epochs=1)
        images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            teacher_out = model.eval()(images)
            student_raw = model(images)[1]  # same weights, same (eval) BN: identical outputs
        assert objective.distill(student_raw, teacher_out).item() == pytest.approx(0, abs=1e-9)
        teacher, _ = ultralytics_model(spec, shapes.nc)
        for p in teacher.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
        settings = dataclasses.replace(FAST, epochs=1, distill=1.0)
        no_val = dataclasses.replace(shapes, val=())
        result = train(model, info, no_val, settings, teacher=teacher, progress=False)
        assert result.history[0]["kd"] > 0
