import pytest
import torch

from yoloprune.compiler.evaluation import nms
from yoloprune.compiler.evaluation.nms import box_iou, greedy_nms, non_max_suppression, xywh_to_xyxy


def brute_force_nms(boxes, scores, iou_thres):
    """Textbook greedy NMS, one pair at a time."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    keep = []
    for i in order:
        if all(float(box_iou(boxes[i : i + 1], boxes[k : k + 1])[0, 0]) <= iou_thres for k in keep):
            keep.append(i)
    return keep


def random_boxes(n, generator):
    xy = torch.rand(n, 2, generator=generator) * 100
    wh = torch.rand(n, 2, generator=generator) * 40 + 2
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("iou", [0.3, 0.5, 0.7])
def test_greedy_nms_matches_brute_force(seed, iou):
    g = torch.Generator().manual_seed(seed)
    boxes, scores = random_boxes(120, g), torch.rand(120, generator=g)
    assert greedy_nms(boxes, scores, iou).tolist() == brute_force_nms(boxes, scores, iou)


@pytest.mark.parametrize("block", [1, 7 * 120, 1 << 22])  # a row, 7 rows, every row at once
def test_greedy_nms_reads_iou_blocks_exactly(block, monkeypatch):
    monkeypatch.setattr(nms, "IOU_BLOCK", block)
    g = torch.Generator().manual_seed(11)
    boxes, scores = random_boxes(120, g), torch.rand(120, generator=g)
    assert greedy_nms(boxes, scores, 0.4).tolist() == brute_force_nms(boxes, scores, 0.4)
    assert greedy_nms(boxes[:0], scores[:0], 0.4).tolist() == []


@pytest.mark.parametrize("max_keep", [None, 15])
def test_class_aware_nms_is_greedy_nms_within_each_class(max_keep):
    g = torch.Generator().manual_seed(5)
    boxes, scores = random_boxes(150, g), torch.rand(150, generator=g)
    scores[10:20] = scores[0]  # ties across classes: the lower index first
    classes = torch.randint(0, 3, (150,), generator=g).float()
    expected = []
    for c in range(3):
        members = [i for i in range(150) if classes[i] == c]
        kept = brute_force_nms(boxes[members], scores[members], 0.5)
        expected += [members[k] for k in kept]
    expected.sort(key=lambda i: (-float(scores[i]), i))
    got = nms.class_aware_nms(boxes, scores, classes, 0.5, max_keep).tolist()
    assert got == expected[:max_keep]


def test_max_keep_is_a_prefix_of_full_nms():
    g = torch.Generator().manual_seed(7)
    boxes, scores = random_boxes(200, g), torch.rand(200, generator=g)
    full = greedy_nms(boxes, scores, 0.5)
    assert greedy_nms(boxes, scores, 0.5, max_keep=10).tolist() == full[:10].tolist()


def test_iou_of_known_boxes():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[50 / 150, 0.0]]))


def test_yolo_nms_is_class_aware_and_multi_label():
    # rows 0 and 1 are the same box; row 2 nearly so. Multi-label gives (box, class) pairs:
    # class 0: 0.81, 0.08, 0.63; class 1: 0.09, 0.72. Class-aware NMS keeps the best per class.
    pred = torch.tensor(
        [
            [
                [50, 50, 20, 20, 0.9, 0.9, 0.1],
                [50, 50, 20, 20, 0.8, 0.1, 0.9],
                [51, 50, 20, 20, 0.7, 0.9, 0.0],
            ]
        ]
    )
    (det,) = non_max_suppression(pred, conf_thres=0.05, iou_thres=0.5)
    assert det[:, 5].tolist() == [0.0, 1.0]
    assert torch.allclose(det[:, 4], torch.tensor([0.81, 0.72]))
    assert torch.allclose(det[0, :4], xywh_to_xyxy(pred[0, 0, :4]))
    # class-agnostic behaviour would have kept one box only: the classes must not interact
    (single,) = non_max_suppression(pred[:, :1], conf_thres=0.05, iou_thres=0.5)
    assert single[:, 5].tolist() == [0.0, 1.0]


def test_max_det_and_conf():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(1, 1000, 8, generator=g)
    pred[..., :2] *= 200
    pred[..., 2:4] = pred[..., 2:4] * 20 + 1
    (det,) = non_max_suppression(pred, conf_thres=0.2, iou_thres=0.6, max_det=50)
    assert len(det) == 50 and (det[:, 4] > 0.2).all()
    assert (det[:-1, 4] >= det[1:, 4]).all()
