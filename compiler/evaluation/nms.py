"""Non-maximum suppression (ours: torchvision's ops do not load here), and the step from each
output layout to per-image detections."""

from __future__ import annotations

import numpy as np
import torch

IOU_BLOCK = 1 << 22  # IoU values computed at once in NMS (16 MiB of float32)


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    out = boxes.clone()
    out[..., 0] = boxes[..., 0] - boxes[..., 2] / 2
    out[..., 1] = boxes[..., 1] - boxes[..., 3] / 2
    out[..., 2] = boxes[..., 0] + boxes[..., 2] / 2
    out[..., 3] = boxes[..., 1] + boxes[..., 3] / 2
    return out


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: (N, 4) x (M, 4) -> (N, M)."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(2)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def greedy_nms(
    boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_keep: int | None = None
) -> torch.Tensor:
    """Indices kept by greedy NMS, highest score first. Stopping at ``max_keep`` gives the same
    result as full NMS truncated, because boxes are kept in score order. The IoUs of a block
    of ranked boxes with all others are computed at once (up to ``IOU_BLOCK`` values), and the
    greedy pass only reads their rows: a tensor call per kept box cost a third of an
    evaluation."""
    order = torch.argsort(scores, descending=True, stable=True)
    ranked = boxes[order]
    count = len(order)
    rows = max(1, IOU_BLOCK // max(count, 1))
    suppressed = np.zeros(count, dtype=bool)
    keep: list[int] = []
    block_start, over = 0, np.zeros((0, count), dtype=bool)
    for i in range(count):
        if suppressed[i]:
            continue
        keep.append(i)
        if max_keep is not None and len(keep) >= max_keep:
            break
        if i >= block_start + len(over):
            block_start = i
            over = (box_iou(ranked[i : i + rows], ranked) > iou_threshold).numpy()
        suppressed |= over[i - block_start]
    return order[torch.tensor(keep, dtype=torch.long)]


def class_aware_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    iou_threshold: float,
    max_keep: int | None = None,
) -> torch.Tensor:
    """Greedy NMS within each class, kept indices in score order (ties: lower index first)
    and truncated to ``max_keep``: what one greedy pass over all classes keeps when boxes of
    different classes never suppress each other, at a fraction of its IoUs (each class against
    itself only; offsetting boxes per class, the previous way, rounded far-off classes'
    coordinates)."""
    kept = []
    for label in classes.unique():
        members = (classes == label).nonzero().view(-1)
        kept.append(members[greedy_nms(boxes[members], scores[members], iou_threshold, max_keep)])
    if not kept:
        return torch.zeros(0, dtype=torch.long)
    kept = torch.cat(kept).sort().values  # index order, so the stable sort breaks ties by it
    ranked = kept[torch.argsort(scores[kept], descending=True, stable=True)]
    return ranked[:max_keep] if max_keep is not None else ranked


def non_max_suppression(
    prediction: torch.Tensor,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 300,
    multi_label: bool = True,
    max_nms: int = 30000,
) -> list[torch.Tensor]:
    """yolov5 conventions: score = objectness x class probability; one row per (box, class)
    above conf_thres when multi_label; class-aware NMS. Returns per image (n, 6) rows of
    (x0, y0, x1, y1, score, class)."""
    if not (0 <= conf_thres <= 1 and 0 <= iou_thres <= 1):
        raise ValueError("conf_thres and iou_thres must lie in [0, 1]")
    output = []
    for pred in prediction:
        pred = pred[pred[:, 4] > conf_thres]
        if not len(pred):
            output.append(torch.zeros(0, 6))
            continue
        scores = pred[:, 5:] * pred[:, 4:5]
        boxes = xywh_to_xyxy(pred[:, :4])
        if multi_label:
            i, j = (scores > conf_thres).nonzero(as_tuple=True)
            det = torch.cat([boxes[i], scores[i, j, None], j[:, None].float()], 1)
        else:
            best, j = scores.max(1, keepdim=True)
            det = torch.cat([boxes, best, j.float()], 1)[best.view(-1) > conf_thres]
        if len(det) > max_nms:
            det = det[det[:, 4].argsort(descending=True, stable=True)[:max_nms]]
        keep = class_aware_nms(det[:, :4], det[:, 4], det[:, 5], iou_thres, max_det)
        output.append(det[keep])
    return output


def detections(
    outputs: torch.Tensor,
    layout: str,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 300,
) -> list[torch.Tensor]:
    """Per image (n, 6) rows of (x0, y0, x1, y1, score, class) from output0 in ``layout``:

    - ``yolov5``: (B, anchors, 5 + nc), objectness times class probability, then NMS;
    - ``anchor_free``: (B, 4 + nc, anchors) of ultralytics, class probabilities alone (an
      objectness of 1), then the same NMS;
    - ``end2end``: (B, max_det, 6) already NMS-free top-k (YOLO26); only ``conf_thres`` and
      ``max_det`` apply.
    """
    if layout == "yolov5":
        return non_max_suppression(outputs, conf_thres, iou_thres, max_det)
    if layout == "anchor_free":
        rows = outputs.transpose(1, 2)
        ones = torch.ones_like(rows[..., :1])
        with_objectness = torch.cat((rows[..., :4], ones, rows[..., 4:]), -1)
        return non_max_suppression(with_objectness, conf_thres, iou_thres, max_det)
    if layout == "end2end":
        return [image[image[:, 4] > conf_thres][:max_det] for image in outputs]
    raise ValueError(f"unknown output layout {layout!r}: use yolov5, anchor_free or end2end")
