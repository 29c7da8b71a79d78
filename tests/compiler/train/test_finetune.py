import dataclasses
import math

import pytest
import torch

from tests.helpers import tiny_cfg
from yoloprune.compiler.train import finetune
from yoloprune.compiler.train.data import read_data_yaml
from yoloprune.compiler.train.finetune import (
    ModelEMA,
    TrainSettings,
    accumulation,
    autocast_dtype,
    in_float32,
    learning_rates,
    train,
)
from yoloprune.compiler.train.objective import YoloV5Objective
from yoloprune.compiler.train.synthetic import SyntheticSpec, generate
from yoloprune.graphs.checkpoint import describe, load_model
from yoloprune.graphs.errors import YoloPruneError
from yoloprune.graphs.yolov5 import DetectionModel


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "data"
    return read_data_yaml(generate(root, SyntheticSpec(train=32, val=8, imgsz=64), progress=False))


def tiny(data):
    cfg = tiny_cfg()
    cfg["nc"] = data.nc
    torch.manual_seed(0)
    model = DetectionModel(cfg)
    return model, describe(model, "tiny.yaml", pretrained=False, imgsz=64)


FAST = TrainSettings(
    epochs=3,
    batch=8,
    nominal_batch=8,
    imgsz=64,
    optimizer="adamw",
    lr0=0.003,
    warmup_epochs=0.5,
    warmup_bias_lr=0.1,  # these tests train from random init: yolov5's from-scratch recipe
    augment=False,
)


def test_training_loss_decreases(shapes):
    model, info = tiny(shapes)
    settings = dataclasses.replace(FAST, epochs=10)
    result = train(model, info, dataclasses.replace(shapes, val=()), settings, progress=False)

    def total(h):
        return h["box"] + h["obj"] + h["cls"]

    first, last = result.history[0], result.history[-1]
    assert total(last) < 0.97 * total(first)
    assert last["box"] < first["box"] and last["cls"] < first["cls"]
    assert len(result.history) == 10 and result.best is None  # no val split: no best


def test_validation_and_resume(shapes, tmp_path):
    model, info = tiny(shapes)
    two = dataclasses.replace(FAST, epochs=2)
    train(model, info, shapes, two, save_dir=tmp_path, progress=False)
    assert (tmp_path / "last.pt").exists() and (tmp_path / "best.pt").exists()
    raw = torch.load(tmp_path / "last.pt", weights_only=True)
    assert raw["train_state"]["epoch"] == 2
    fresh, _ = tiny(shapes)
    resumed = train(
        fresh,
        info,
        shapes,
        dataclasses.replace(FAST, epochs=3),
        save_dir=tmp_path,
        resume=tmp_path / "last.pt",
        progress=False,
    )
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert all("map50_95" in h for h in resumed.history)
    # the returned model (an EMA copy) can be traced and pruned again: gradients are on
    assert all(p.requires_grad for p in resumed.model.parameters())
    best, _ = load_model(tmp_path / "best.pt")  # reloads without training code
    assert sum(p.numel() for p in best.parameters()) == sum(p.numel() for p in model.parameters())
    # resumed with nothing left to train: the model returned is the best one saved, not the
    # last training weights
    again, _ = tiny(shapes)
    done = train(
        again,
        info,
        shapes,
        dataclasses.replace(FAST, epochs=3),
        save_dir=tmp_path / "again",
        resume=tmp_path / "last.pt",
        progress=False,
    )
    kept = done.model.state_dict()  # `best`: tmp_path's best.pt, which the resume left alone
    assert all(torch.equal(kept[k], v) for k, v in best.state_dict().items())
    assert not all(torch.equal(kept[k], v) for k, v in again.state_dict().items())


@pytest.mark.parametrize(("every", "evaluated"), [(2, [2, 3]), (0, [3]), (1, [1, 2, 3])])
def test_eval_every_validates_those_epochs_and_the_last(shapes, every, evaluated):
    model, info = tiny(shapes)
    settings = dataclasses.replace(FAST, eval_every=every)
    result = train(model, info, shapes, settings, progress=False)
    assert [h["epoch"] for h in result.history if "map50_95" in h] == evaluated
    best = max((h for h in result.history if "map50_95" in h), key=lambda h: h["map50_95"])
    assert result.best == best and result.best_metrics.map50_95 == best["map50_95"]


def test_the_logged_distillation_is_per_image_as_the_other_losses_are(shapes, monkeypatch):
    """The detection parts are logged per image and summed over the batch into the loss; the
    distillation term likewise, so its logged value does not grow with --batch (it doubled
    from batch 8 to 16 before 2026-12-02). A stand-in distillation of 0.25 per image, weight
    2: logged 0.5 at every batch size."""
    teacher, _ = tiny(shapes)

    def quarter(self, student_raw, teacher_out):
        return torch.tensor(0.25) + 0 * student_raw[0].sum()

    monkeypatch.setattr(YoloV5Objective, "distill", quarter)
    for batch in (4, 8):
        model, info = tiny(shapes)
        settings = dataclasses.replace(FAST, epochs=1, batch=batch, nominal_batch=batch, distill=2)
        data = dataclasses.replace(shapes, val=())
        result = train(model, info, data, settings, teacher=teacher, progress=False)
        assert result.history[0]["kd"] == pytest.approx(0.5, rel=1e-6)
        assert (result.recipe["batch"], result.recipe["distill"]) == (batch, 2)
    # the report's recipe says what was applied: no teacher, no distillation
    result = train(*tiny(shapes), data, settings, progress=False)
    assert result.history[0]["kd"] == 0 and result.recipe["distill"] == 0
    assert result.recipe == {
        "batch": 8,
        "processes": 1,
        "optimizer": "adamw",
        "lr0": 0.003,
        "distill": 0.0,
        "augment": False,
    }


def test_distillation_is_used_and_zero_for_identical_outputs(shapes):
    model, info = tiny(shapes)
    teacher, _ = tiny(shapes)
    outputs = [torch.randn(1, 3, 4, 4, 8)]
    objective = YoloV5Objective(model, 64)
    assert objective.distill(outputs, (None, outputs)).item() == 0.0
    assert objective.distill(outputs, (None, [o + 1 for o in outputs])).item() > 0
    teacher = teacher.double()  # the trainer's own copy runs in fp32 on its device
    before = [p.detach().clone() for p in teacher.parameters()]
    settings = dataclasses.replace(FAST, epochs=1, distill=1.0)
    result = train(
        model, info, dataclasses.replace(shapes, val=()), settings, teacher=teacher, progress=False
    )
    assert result.history[0]["kd"] > 0
    # the caller's teacher (compile's original model) is left as it was: moved to the GPU or
    # converted in place, it broke every later stage that runs it (seen on an H200)
    after = list(teacher.parameters())
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in after)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_more_processes_than_gpus_is_one_clear_error(monkeypatch):
    from yoloprune.compiler.train import finetune

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert finetune.training_device(FAST, 0) == torch.device("cuda:0")
    with pytest.raises(YoloPruneError, match="nproc_per_node"):
        finetune.training_device(FAST, 1)
    assert finetune.training_device(dataclasses.replace(FAST, device="cpu"), 1) == torch.device(
        "cpu"
    )


def test_distillation_keeps_its_pull_where_student_logits_saturate(shapes):
    """A squared error of sigmoids stops pulling a confidently wrong student (its gradient
    carries sigmoid'(logit), 2e-9 at -20); the Bernoulli KL does not."""
    objective = YoloV5Objective(tiny(shapes)[0], 64)
    teacher = torch.zeros(1, 3, 4, 4, 8)
    teacher[..., 4] = 4.0  # the teacher sees objects everywhere
    pulls = []
    for logit in (-2.0, -20.0):
        student = torch.zeros_like(teacher)
        student[..., 4] = logit
        student.requires_grad_(True)
        objective.distill([student], (None, [teacher])).backward()
        pulls.append(student.grad[..., 4].abs().mean().item())
    assert pulls[1] >= 0.9 * pulls[0] > 0


def test_distillation_weighs_box_and_class_by_teacher_objectness(shapes):
    objective = YoloV5Objective(tiny(shapes)[0], 64)
    teacher = torch.zeros(1, 3, 4, 4, 8)
    teacher[..., 4] = -10.0
    teacher[0, 0, 1, 1, 4] = 10.0  # one anchor holds an object
    misses = {}
    for name, anchor in (("object", (0, 0, 1, 1)), ("background", (0, 1, 2, 2))):
        student = teacher.clone()
        student[(*anchor, slice(None, 4))] += 2.0  # box off
        student[(*anchor, slice(5, None))] += 5.0  # classes off
        misses[name] = objective.distill([student], (None, [teacher])).item()
    assert misses["object"] > 100 * misses["background"] > 0


def test_ema_follows_its_formula():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = ModelEMA(model, tau=10.0)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    d = 0.9999 * (1 - math.exp(-1 / 10))
    assert torch.allclose(ema.ema.weight, torch.full((1, 2), 1 - d))


def test_ema_averages_every_floating_tensor_and_follows_a_converted_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ema = ModelEMA(model, tau=5.0)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(1, 7):
        if step == 4:  # new tensors in the model: the EMA must read them, not the old ones
            model.to(memory_format=torch.channels_last)
            model[1].running_mean = model[1].running_mean.clone()
        with torch.no_grad():
            for value in model.parameters():
                value.add_(torch.randn_like(value))
        model.train()(torch.randn(2, 3, 8, 8))  # moves the BatchNorm statistics
        ema.update(model)
        d = 0.9999 * (1 - math.exp(-step / 5.0))
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                expected[key] = d * expected[key] + (1 - d) * value
    averaged = ema.ema.state_dict()
    for key, value in expected.items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(averaged[key], value, rtol=1e-5, atol=1e-6)
    # the counter is not averaged: it keeps the copy's value
    assert averaged["1.num_batches_tracked"] == 0


@pytest.mark.parametrize(
    ("amp", "device", "cpu_bf16", "expected"),
    [
        (None, "cpu", True, torch.bfloat16),  # the default where the CPU computes bf16
        (None, "cpu", False, None),  # emulated bf16 is slower: fp32
        (True, "cpu", False, torch.bfloat16),  # asked for: honoured
        (False, "cpu", True, None),
        (None, "cuda", False, torch.float16),
        (False, "cuda", True, None),
    ],
)
def test_mixed_precision_rule(monkeypatch, amp, device, cpu_bf16, expected):
    monkeypatch.setattr(finetune, "cpu_computes_bf16", lambda: cpu_bf16)
    assert autocast_dtype(amp, torch.device(device)) is expected


def test_cpu_bf16_is_read_from_the_cpu_flags(monkeypatch):
    from tests.conftest import REAL_CPU_BF16
    from yoloprune.kernels import ort

    monkeypatch.setattr(finetune, "cpu_computes_bf16", REAL_CPU_BF16[0])  # the suite pins False
    for flags, expected in (
        (["avx2", "avx512_bf16"], True),
        (["amx_bf16"], True),
        (["avx2"], False),
    ):
        monkeypatch.setattr(ort, "cpu_description", lambda f=flags: ("cpu", f))
        assert finetune.cpu_computes_bf16() is expected


def test_raw_outputs_are_read_in_fp32():
    half = torch.ones(2, dtype=torch.bfloat16)
    raw = {"boxes": half, "feats": [half, (half, torch.ones(1, dtype=torch.long))]}
    out = in_float32(raw)
    assert out["boxes"].dtype == torch.float32 and out["feats"][0].dtype == torch.float32
    assert isinstance(out["feats"][1], tuple) and out["feats"][1][1].dtype == torch.long


def test_bf16_fine_tune_runs_the_student_in_bf16_and_the_teacher_in_fp32(shapes):
    def run(amp):
        model, info = tiny(shapes)
        teacher, _ = tiny(shapes)
        seen = {}

        def note(name):  # the first conv's output dtype, seen once per model
            return lambda module, inputs, output: seen.setdefault(name, output.dtype) and None

        model.model[0].conv.register_forward_hook(note("student"))
        teacher.model[0].conv.register_forward_hook(note("teacher"))
        settings = dataclasses.replace(FAST, epochs=1, amp=amp, distill=1.0)
        data = dataclasses.replace(shapes, val=())
        result = train(model, info, data, settings, teacher=teacher, progress=False)
        return result, seen

    low, seen = run(True)
    assert seen == {"student": torch.bfloat16, "teacher": torch.float32}
    assert low.mixed_precision == "bf16"
    full, seen = run(False)
    assert seen == {"student": torch.float32, "teacher": torch.float32}
    assert full.mixed_precision is None
    losses = [(r.history[0]["box"], r.history[0]["kd"]) for r in (low, full)]
    assert all(math.isfinite(v) for pair in losses for v in pair)
    assert losses[0] != losses[1] and losses[0] == pytest.approx(losses[1], rel=0.05)


def test_learning_rates_warm_up_from_zero_then_follow_the_schedule_every_step():
    settings = TrainSettings(epochs=2, lrf=0.01)  # warm-up: 2 / 8 = 0.25 epoch
    steps = 100  # per epoch: the warm-up is 25 steps
    assert settings.warmup == 0.25 and TrainSettings(epochs=16).warmup == 1.0
    rates = [learning_rates(settings, 0.003, step, steps) for step in range(2 * steps)]
    # every group, biases included, rises from 0: yolov5's bias start of 0.1 wrecked the
    # first AdamW steps of a pruned model (2 epochs: mAP 0.56 -> 0.58 from this alone)
    assert rates[0] == [0.0, 0.0, 0.0]
    cosine = [0.003 * (1 - (1 - math.cos(math.pi * s / steps / 2)) / 2 * 0.99) for s in range(200)]
    assert rates[10] == pytest.approx([cosine[10] * 10 / 25] * 3, rel=1e-12)
    assert rates[25] == pytest.approx([cosine[25]] * 3, rel=1e-12)
    # after the warm-up: the cosine, per step (not held for an epoch), to lr0 * lrf at the end
    for step in (26, 50, 99, 100, 150, 199):
        assert rates[step] == pytest.approx([cosine[step]] * 3, rel=1e-12)
    assert rates[199][1] == pytest.approx(0.003 * (0.01 + 0.99 * (1 - math.cos(math.pi / 200)) / 2))


def test_learning_rates_per_epoch_and_yolov5_bias_warm_up_where_asked():
    settings = TrainSettings(
        epochs=2, warmup_epochs=0.5, warmup_bias_lr=0.1, schedule_every="epoch"
    )
    assert learning_rates(settings, 0.01, 0, 10) == [0.0, 0.0, 0.1]
    assert learning_rates(settings, 0.01, 5, 10) == pytest.approx([0.01, 0.01, 0.01])
    assert learning_rates(settings, 0.01, 9, 10) == [0.01] * 3  # held for the whole epoch
    held = 0.01 * (1 - 0.99 / 2)
    assert learning_rates(settings, 0.01, 10, 10) == pytest.approx([held] * 3)
    assert learning_rates(settings, 0.01, 19, 10) == pytest.approx([held] * 3)


def test_one_update_per_batch_unless_a_nominal_batch_is_set():
    assert accumulation(TrainSettings(batch=16, weight_decay=5e-4)) == (1, 5e-4)
    assert accumulation(TrainSettings(batch=16, weight_decay=5e-4), world=4) == (1, 5e-4)
    assert accumulation(TrainSettings(batch=16, nominal_batch=64, weight_decay=5e-4)) == (4, 5e-4)
    # yolov5's rule where a nominal batch is set: decay scales with the batch a step sees
    assert accumulation(TrainSettings(batch=16, nominal_batch=16, weight_decay=5e-4), 4) == (
        1,
        pytest.approx(2e-3),
    )


def test_settings_are_validated():
    with pytest.raises(YoloPruneError, match="optimizer"):
        TrainSettings(optimizer="lion")
    with pytest.raises(YoloPruneError, match="epochs"):
        TrainSettings(epochs=0)
    with pytest.raises(YoloPruneError, match="eval-every"):
        TrainSettings(eval_every=-1)
    with pytest.raises(YoloPruneError, match="schedule_every"):
        TrainSettings(schedule_every="batch")
