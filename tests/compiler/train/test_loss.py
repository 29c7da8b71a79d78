import pytest
import torch

from tests.helpers import tiny_cfg
from yoloprune.compiler.train.loss import LossWeights, YoloV5Loss, ciou
from yoloprune.graphs.yolov5 import DetectionModel


def test_ciou_identical_overlapping_and_disjoint():
    a = torch.tensor([[10.0, 10.0, 4.0, 4.0]])
    assert ciou(a, a).item() == pytest.approx(1.0, abs=1e-6)
    shifted = torch.tensor([[11.0, 10.0, 4.0, 4.0]])  # IoU 12/20, centre distance 1, diag^2 41
    assert ciou(a, shifted).item() == pytest.approx(0.6 - 1 / 41, abs=1e-5)
    far = torch.tensor([[30.0, 30.0, 4.0, 4.0]])
    assert ciou(a, far).item() < 0


def test_targets_go_to_the_centre_cell_and_two_neighbours():
    model = DetectionModel(tiny_cfg()).train()
    loss = YoloV5Loss(model.detect, 64)
    raw = model(torch.zeros(1, 3, 64, 64))
    # one target centred at (0.3, 0.45) of a 64 px image: on the 8x8 level, cell (2.4, 3.6)
    # -> the centre cell (2, 3), the left neighbour (x frac < 0.5) and the lower one (y > 0.5)
    targets = torch.tensor([[0.0, 1.0, 0.3, 0.45, 0.2, 0.25]])
    _, tbox, indices, _ = loss.build_targets(raw, targets)
    b, a, gj, gi = indices[0]
    cells = {(int(j), int(i)) for j, i in zip(gj, gi, strict=True)}
    assert cells == {(3, 2), (3, 1), (4, 2)}
    assert (b == 0).all() and len(set(a.tolist())) >= 1
    # box targets are offsets from each assigned cell, within (-0.5, 1.5)
    assert ((tbox[0][:, :2] > -0.5) & (tbox[0][:, :2] < 1.5)).all()


def test_anchor_ratio_threshold_filters_mismatched_shapes():
    model = DetectionModel(tiny_cfg()).train()
    loss = YoloV5Loss(model.detect, 64, LossWeights(anchor_t=4.0))
    raw = model(torch.zeros(1, 3, 64, 64))
    # a 4 px object: 0.5 cells on P3 (anchors >= 1.25 cells: ratio 2.5, kept) but 0.125 cells
    # on P5 (anchors ~3.6 cells: ratio ~29, beyond anchor_t = 4)
    small = torch.tensor([[0.0, 0.0, 0.5, 0.5, 4 / 64, 4 / 64]])
    _, _, indices, _ = loss.build_targets(raw, small)
    assert len(indices[0][0]) > 0 and len(indices[2][0]) == 0


def test_loss_has_gradients_and_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = DetectionModel(tiny_cfg()).train()
    loss_fn = YoloV5Loss(model.detect, 64)
    x = torch.rand(2, 3, 64, 64)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 2, 0.2, 0.3, 0.1, 0.1]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.002)
    first = None
    for _ in range(25):
        optimizer.zero_grad()
        total, parts = loss_fn(model(x), targets)
        total.backward()
        optimizer.step()
        first = float(total.detach()) if first is None else first
    assert float(total.detach()) < 0.7 * first
    assert parts.shape == (3,) and (parts >= 0).all()
