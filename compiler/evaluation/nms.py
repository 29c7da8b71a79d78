"""Non-maximum suppression (ours: torchvision's ops do not load here), and the step from each
output layout to per-image detections."""

from __future__ import annotations

import torch

MAX_WH = 7680  # class offset for batched class-aware NMS (larger than any image side)


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
    result as full NMS truncated, because boxes are kept in score order."""
    order = torch.argsort(scores, descending=True, stable=True)
    keep = []
    while order.numel():
        best = order[0]
        keep.append(best)
        if max_keep is not None and len(keep) >= max_keep:
            break
        rest = order[1:]
        if not rest.numel():
            break
        ious = box_iou(boxes[best].unsqueeze(0), boxes[rest])[0]
        order = rest[ious <= iou_threshold]
    return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long)


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
        shifted = det[:, :4] + det[:, 5:6] * MAX_WH  # class-aware in one pass
        keep = greedy_nms(shifted, det[:, 4], iou_thres, max_det)
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
