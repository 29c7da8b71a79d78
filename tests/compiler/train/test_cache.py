import dataclasses

import pytest
import torch
from torch import nn

from tests.compiler.train.test_finetune import FAST, tiny
from yoloprune.compiler.train.cache import SampleMemo, TeacherTargets, _leaves, _rebuild
from yoloprune.compiler.train.data import YoloDataset, read_data_yaml
from yoloprune.compiler.train.finetune import train
from yoloprune.compiler.train.objective import YoloV5Objective
from yoloprune.compiler.train.synthetic import SyntheticSpec, generate


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache") / "data"
    return read_data_yaml(generate(root, SyntheticSpec(train=16, val=8, imgsz=64), progress=False))


def test_memo_keeps_within_its_budget():
    memo = SampleMemo(budget_bytes=100)
    assert memo.put(("train", 0), (torch.zeros(20),))  # 80 bytes
    assert not memo.put(("train", 1), (torch.zeros(20),))  # would be 160
    assert memo.put(("teacher", 0), (torch.zeros(5, dtype=torch.uint8), 0.5, (1, 2)))
    assert memo.get(("train", 1)) is None and memo.get(("train", 0)) is not None
    summary = memo.summary()
    assert summary["images"] == 1 and summary["teacher_outputs"] == 1
    assert summary["refused"] == 1 and memo.used_bytes == 85


def test_kept_samples_are_the_decoded_ones_bit_for_bit(shapes):
    plain = YoloDataset(shapes.train, shapes.nc, 64)
    memo = SampleMemo(1 << 30)
    kept = YoloDataset(shapes.train, shapes.nc, 64, memo=memo, memo_kind="train")
    for _ in range(2):  # the second pass reads the memo
        for i in (0, 5, 15):
            a, b = plain[i], kept[i]
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            assert a[2] == b[2] and b[2]["index"] == i
    assert memo.summary()["images"] == 3
    augmented = YoloDataset(
        shapes.train, shapes.nc, 64, augment=True, memo=SampleMemo(1 << 30), memo_kind="train"
    )
    assert augmented.memo is None  # augmented samples change every epoch: never kept


class CountingTeacher(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


def test_teacher_targets_are_looked_up_once_every_sample_was_seen(shapes):
    model, _ = tiny(shapes)
    teacher = CountingTeacher(model.eval())
    objective = YoloV5Objective(model, 64)
    targets = TeacherTargets(teacher, objective.distill_targets, SampleMemo(1 << 30))
    torch.manual_seed(0)
    images = torch.rand(4, 3, 64, 64)
    first = targets(images[:2], [0, 1])
    targets(images[2:], [2, 3])
    assert teacher.calls == 2
    mixed = targets(images[[3, 0, 1]], [3, 0, 1])  # another batch composition: looked up
    assert teacher.calls == 2
    with torch.no_grad():
        live = objective.distill_targets(model(images[[3, 0, 1]]))
    for kept, fresh in zip(_leaves(mixed), _leaves(live), strict=True):
        torch.testing.assert_close(kept, fresh, rtol=1e-5, atol=1e-5)
    assert torch.equal(_leaves(mixed)[0][1:], _leaves(first)[0])
    targets(images[[0, 1]] + 1, [0, 9])  # an unseen sample: the whole batch runs
    assert teacher.calls == 3


def test_nested_targets_rebuild_in_order():
    tree = (None, {"one2many": {"boxes": torch.ones(2), "scores": torch.zeros(3)}, "x": [1]})
    leaves = _leaves(tree)
    rebuilt = _rebuild(tree, iter([t + 1 for t in leaves]))
    assert torch.equal(rebuilt[1]["one2many"]["boxes"], torch.full((2,), 2.0))
    assert torch.equal(rebuilt[1]["one2many"]["scores"], torch.ones(3))
    assert rebuilt[0] is None and rebuilt[1]["x"] == [1]


def test_training_with_kept_work_matches_training_without(shapes):
    """The memo and channels-last change float rounding only: the same losses and weights."""
    settings = dataclasses.replace(FAST, epochs=2, distill=1.0)
    results = []
    for cache_mib, channels_last in ((0, False), (64, True)):
        model, info = tiny(shapes)
        teacher, _ = tiny(shapes)
        run = dataclasses.replace(settings, cache_mib=cache_mib, channels_last=channels_last)
        results.append(train(model, info, shapes, run, teacher=teacher, progress=False))
    live, kept = results
    assert live.cache is None
    assert kept.cache["images"] == 16 and kept.cache["teacher_outputs"] == 16
    assert kept.cache["val_images"] == 8
    for a, b in zip(live.history, kept.history, strict=True):
        for key in ("box", "obj", "cls", "kd"):
            assert b[key] == pytest.approx(a[key], rel=1e-3)
    start = torch.cat([p.detach().flatten() for p in tiny(shapes)[0].parameters()])
    live_w, kept_w = (
        torch.cat([p.detach().flatten() for p in r.model.parameters()]) for r in results
    )
    # AdamW turns rounding-sized gradient differences into small steps: compare the weights'
    # difference with how far training moved them
    assert (kept_w - live_w).norm() < 0.01 * (live_w - start).norm()
    assert all(p.is_contiguous() for p in kept.model.parameters())
