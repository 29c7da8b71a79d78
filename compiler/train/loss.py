"""The YOLOv5 detection loss: anchor matching, CIoU box loss, objectness and class BCE.

Follows yolov5's formulation: a target matches an anchor when their width and height ratios
are within ``anchor_t``; each target is also assigned to the two neighbouring cells nearest
its centre; objectness targets are the (detached) IoU of the matched prediction; the
objectness loss of each level is weighted (P3 4.0, P4 1.0, P5 0.4, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

LEVEL_BALANCE = {3: (4.0, 1.0, 0.4), 4: (4.0, 1.0, 0.25, 0.06), 5: (4.0, 1.0, 0.25, 0.06, 0.02)}


@dataclass(frozen=True)
class LossWeights:
    """yolov5's hyp.scratch-low gains, before scaling by levels, classes and image size."""

    box: float = 0.05
    obj: float = 1.0
    cls: float = 0.5
    anchor_t: float = 4.0

    def scaled(self, nl: int, nc: int, imgsz: int) -> LossWeights:
        return LossWeights(
            self.box * 3 / nl,
            self.obj * (imgsz / 640) ** 2 * 3 / nl,
            self.cls * nc / 80 * 3 / nl,
            self.anchor_t,
        )


def ciou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of paired xywh boxes (N, 4) x (N, 4) -> (N,)."""
    (x1, y1, w1, h1), (x2, y2, w2, h2) = box1.unbind(-1), box2.unbind(-1)
    b1x0, b1x1, b1y0, b1y1 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    b2x0, b2x1, b2y0, b2y1 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    inter = (torch.min(b1x1, b2x1) - torch.max(b1x0, b2x0)).clamp(0) * (
        torch.min(b1y1, b2y1) - torch.max(b1y0, b2y0)
    ).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.max(b1x1, b2x1) - torch.min(b1x0, b2x0)
    ch = torch.max(b1y1, b2y1) - torch.min(b1y0, b2y0)
    c2 = cw**2 + ch**2 + eps
    rho2 = (x2 - x1) ** 2 + (y2 - y1) ** 2
    v = (4 / math.pi**2) * (torch.atan(w2 / (h2 + eps)) - torch.atan(w1 / (h1 + eps))).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


class YoloV5Loss:
    """``loss(raw_outputs, targets) -> (total, parts)``; targets are (N, 6) = (image, class,
    xc, yc, w, h) normalised to the input image, as :func:`~yoloprune.compiler.train.data.collate`
    makes them."""

    def __init__(self, detect: nn.Module, imgsz: int, weights: LossWeights | None = None):
        self.detect = detect
        self.na, self.nc, self.nl = detect.na, detect.nc, detect.nl
        self.weights = (weights or LossWeights()).scaled(self.nl, self.nc, imgsz)
        self.balance = LEVEL_BALANCE.get(self.nl, (4.0, 1.0, 0.4) + (0.25,) * (self.nl - 3))
        self.bce = nn.BCEWithLogitsLoss()

    def __call__(self, raw: list[torch.Tensor], targets: torch.Tensor):
        device = raw[0].device
        lbox, lobj, lcls = (torch.zeros(1, device=device) for _ in range(3))
        tcls, tbox, indices, anchors = self.build_targets(raw, targets.to(device))
        for i, pred in enumerate(raw):
            b, a, gj, gi = indices[i]
            tobj = torch.zeros(pred.shape[:4], dtype=pred.dtype, device=device)
            if b.shape[0]:
                ps = pred[b, a, gj, gi]
                pxy = ps[:, :2].sigmoid() * 2 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anchors[i]
                iou = ciou(torch.cat((pxy, pwh), 1), tbox[i])
                lbox += (1.0 - iou).mean()
                tobj[b, a, gj, gi] = iou.detach().clamp(0).to(tobj.dtype)
                if self.nc > 1:
                    t = torch.zeros_like(ps[:, 5:])
                    t[range(b.shape[0]), tcls[i]] = 1.0
                    lcls += self.bce(ps[:, 5:], t)
            lobj += self.bce(pred[..., 4], tobj) * self.balance[i]
        w = self.weights
        lbox, lobj, lcls = lbox * w.box, lobj * w.obj, lcls * w.cls
        batch = raw[0].shape[0]
        return (lbox + lobj + lcls) * batch, torch.cat((lbox, lobj, lcls)).detach()

    def build_targets(self, raw, targets):
        na, nt = self.na, targets.shape[0]
        tcls, tbox, indices, anch = [], [], [], []
        gain = torch.ones(7, device=targets.device)
        ai = torch.arange(na, device=targets.device).float().view(na, 1).repeat(1, nt)
        targets = torch.cat((targets.repeat(na, 1, 1), ai[..., None]), 2)  # (na, nt, 7)
        g = 0.5
        offsets = (
            torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=targets.device).float()
            * g
        )
        for i in range(self.nl):
            anchors, shape = self.detect.anchors[i], raw[i].shape
            gain[2:6] = torch.tensor(shape)[[3, 2, 3, 2]]
            t = targets * gain
            if nt:
                ratio = t[..., 4:6] / anchors[:, None]
                t = t[torch.max(ratio, 1 / ratio).max(2)[0] < self.weights.anchor_t]
                gxy = t[:, 2:4]
                gxi = gain[[2, 3]] - gxy
                j, k = ((gxy % 1 < g) & (gxy > 1)).T
                left, up = ((gxi % 1 < g) & (gxi > 1)).T
                j = torch.stack((torch.ones_like(j), j, k, left, up))
                t = t.repeat((5, 1, 1))[j]
                off = (torch.zeros_like(gxy)[None] + offsets[:, None])[j]
            else:
                t, off = targets[0], 0
            bc, gxy, gwh, a = _split(t)
            a, (b, c) = a.long().view(-1), bc.long().T
            gij = (gxy - off).long()
            gi = gij[:, 0].clamp(0, shape[3] - 1)
            gj = gij[:, 1].clamp(0, shape[2] - 1)
            indices.append((b, a, gj, gi))
            tbox.append(torch.cat((gxy - torch.stack((gi, gj), 1), gwh), 1))
            anch.append(anchors[a])
            tcls.append(c)
        return tcls, tbox, indices, anch


def _split(t: torch.Tensor):
    """(image, class), xy, wh, anchor index from a (n, 7) target table."""
    return t[:, 0:2], t[:, 2:4], t[:, 4:6], t[:, 6:7]
