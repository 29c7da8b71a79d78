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


class CountedTeacher(nn.Module):
    """Counts forward calls across the copies train() makes of it."""

    calls = 0

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        type(self).calls += 1
        return self.model(x)


def test_teacher_targets_are_looked_up_once_every_sample_was_seen(shapes):
    model, _ = tiny(shapes)
    CountedTeacher.calls = 0
    teacher = CountedTeacher(model.eval())
    objective = YoloV5Objective(model, 64)
    targets = TeacherTargets(teacher, objective.distill_targets, SampleMemo(1 << 30))
    torch.manual_seed(0)
    images = torch.rand(4, 3, 64, 64)
    first = targets(images[:2], [0, 1])
    targets(images[2:], [2, 3])
    assert CountedTeacher.calls == 2
    mixed = targets(images[[3, 0, 1]], [3, 0, 1])  # another batch composition: looked up
    assert CountedTeacher.calls == 2
    with torch.no_grad():
        live = objective.distill_targets(model(images[[3, 0, 1]]))
    for kept, fresh in zip(_leaves(mixed), _leaves(live), strict=True):
        torch.testing.assert_close(kept, fresh, rtol=1e-5, atol=1e-5)
    assert torch.equal(_leaves(mixed)[0][1:], _leaves(first)[0])
    partly = targets(images[[0, 1]] + 1, [0, 9])  # index 9 unseen: the teacher runs on it alone
    assert CountedTeacher.calls == 3
    with torch.no_grad():
        unseen = objective.distill_targets(model(images[[1]] + 1))
    assert torch.equal(_leaves(partly)[0][0], _leaves(first)[0][0])  # index 0: looked up
    torch.testing.assert_close(_leaves(partly)[0][1:], _leaves(unseen)[0], rtol=1e-5, atol=1e-5)


def test_nested_targets_rebuild_in_order():
    tree = (None, {"one2many": {"boxes": torch.ones(2), "scores": torch.zeros(3)}, "x": [1]})
    leaves = _leaves(tree)
    rebuilt = _rebuild(tree, iter([t + 1 for t in leaves]))
    assert torch.equal(rebuilt[1]["one2many"]["boxes"], torch.full((2,), 2.0))
    assert torch.equal(rebuilt[1]["one2many"]["scores"], torch.ones(3))
    assert rebuilt[0] is None and rebuilt[1]["x"] == [1]


def _fit(shapes, cache_mib, channels_last, epochs=2):
    model, info = tiny(shapes)
    teacher, _ = tiny(shapes)
    settings = dataclasses.replace(
        FAST, epochs=epochs, distill=1.0, cache_mib=cache_mib, channels_last=channels_last
    )
    CountedTeacher.calls = 0
    result = train(model, info, shapes, settings, teacher=CountedTeacher(teacher), progress=False)
    return model, result


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_kept_work_skips_the_teacher_after_the_first_epoch_with_the_same_result(shapes):
    """16 images in batches of 8: the teacher runs twice in epoch 1, then never; the training
    is the one without the memo up to the float rounding of batch composition."""
    _, live = _fit(shapes, cache_mib=0, channels_last=False, epochs=3)
    assert CountedTeacher.calls == 6 and live.cache is None
    _, kept = _fit(shapes, cache_mib=64, channels_last=False, epochs=3)
    assert CountedTeacher.calls == 2
    assert kept.cache["images"] == 16 and kept.cache["teacher_outputs"] == 16
    assert kept.cache["val_images"] == 8 and kept.cache["refused"] == 0
    for a, b in zip(live.history, kept.history, strict=True):
        for key in ("box", "obj", "cls", "kd"):
            assert b[key] == pytest.approx(a[key], rel=1e-5)
    torch.testing.assert_close(_weights(kept.model), _weights(live.model), rtol=1e-4, atol=1e-5)


def test_channels_last_training_matches_the_default_layout(shapes):
    """The layout changes float rounding only: the first epoch's losses agree to rounding, and
    the weights end apart by far less than training moved them. AdamW turns rounding-sized
    gradients into small steps, so the second epoch drifts, more at one thread (as a pytest
    worker computes) than at two: measured 4e-5 and 1e-5 relative in epoch 1, up to 1e-2 and
    2e-4 in epoch 2, weights apart by 0.0056 and 0.0010 of the training's movement."""
    start = _weights(tiny(shapes)[0])
    _, plain = _fit(shapes, cache_mib=0, channels_last=False)
    fast_model, fast = _fit(shapes, cache_mib=0, channels_last=True)
    for epoch, (a, b) in enumerate(zip(plain.history, fast.history, strict=True)):
        for key in ("box", "obj", "cls", "kd"):
            assert b[key] == pytest.approx(a[key], rel=2e-4 if epoch == 0 else 5e-2)
    plain_w, fast_w = _weights(plain.model), _weights(fast.model)
    assert (fast_w - plain_w).norm() < 0.02 * (plain_w - start).norm()
    # the caller's model and the result are back in the default layout
    convs = [m.weight for m in fast_model.modules() if isinstance(m, nn.Conv2d)]
    assert any(w.shape[-1] == 3 for w in convs) and all(w.is_contiguous() for w in convs)
    assert all(p.is_contiguous() for p in fast.model.parameters())


def test_resumed_optimizer_state_takes_its_parameter_layout():
    """A last.pt written channels-last and resumed in the default layout: the fused step reads
    state as flat memory, so the state must follow the parameter's strides."""
    from yoloprune.compiler.train.finetune import _match_layouts

    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 3, 3, 3))
    optimizer = torch.optim.AdamW([weight], fused=True)
    saved = torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    optimizer.state[weight] = {"step": torch.tensor(1.0), "exp_avg": saved}
    _match_layouts(optimizer)
    state = optimizer.state[weight]["exp_avg"]
    assert state.stride() == weight.stride() and torch.equal(state, saved)
