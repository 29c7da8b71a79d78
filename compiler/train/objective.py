"""Training objectives per family: the detection loss, output-level distillation, loss names.

YOLOv5 models train with the project's own YOLOv5 loss (compiler/loss.py). Ultralytics models
(YOLOv8/11/26) train with the anchor-free loss of the ``ultralytics`` extra itself: task-aligned
assignment, CIoU + DFL box loss, class BCE, and for YOLO26's NMS-free head the one-to-many plus
one-to-one sum with ultralytics' decaying weights. The model object is trained as it is, never
rebuilt from YAML, so pruned shapes stay (the known trap of driving ultralytics' trainer).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from yoloprune.compiler.train.loss import YoloV5Loss
from yoloprune.graphs.errors import ModelError
from yoloprune.graphs.family import family_of
from yoloprune.graphs.ultralytics_family import head_branches

# ultralytics' default.yaml gains for the anchor-free loss.
ANCHOR_FREE_GAINS = {"box": 7.5, "cls": 0.5, "dfl": 1.5}
BRANCHES = ("one2many", "one2one")
# The YOLOv5 box distillation term is a squared error of sigmoid outputs summed over xywh,
# about a tenth of the 1 - CIoU the box gain was tuned for at the same miss.
BOX_DISTILL_GAIN = 10.0


def bernoulli_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of independent Bernoulli outputs given as logits, elementwise:
    the soft-target BCE minus the teacher's own entropy, so it is zero where they agree."""
    target = teacher_logits.sigmoid()
    cross = F.binary_cross_entropy_with_logits(student_logits, target, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher_logits, target, reduction="none")
    return (cross - entropy).clamp(min=0)


class YoloV5Objective:
    part_names = ("box", "obj", "cls")

    def __init__(self, model: nn.Module, imgsz: int):
        self.loss = YoloV5Loss(model.detect, imgsz)

    def __call__(self, raw, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss(raw, targets)

    def distill_targets(self, teacher_out):
        """What ``distill`` reads of the teacher's eval output: its raw levels, batch first."""
        return None, [level.detach() for level in teacher_out[1]]

    def distill(self, student_raw, teacher_out) -> torch.Tensor:
        """Objectness-weighted distillation, on the detection loss's own scale (its gains and
        level balance), zero when the outputs agree:
        - objectness: Bernoulli KL from the teacher's probability, every anchor;
        - classes: Bernoulli KL per class, weighted by the teacher's objectness;
        - box: squared error of the sigmoid xywh outputs, weighted by the teacher's objectness.
        KL keeps its pull where the student's logits saturate (a squared error on sigmoids
        vanishes there), and the weights put the box and class terms where the teacher sees
        objects instead of averaging them over background anchors."""
        w, balance = self.loss.weights, self.loss.balance
        lbox, lobj, lcls = (torch.zeros((), device=student_raw[0].device) for _ in range(3))
        for level, (s, t) in enumerate(zip(student_raw, teacher_out[1], strict=True)):
            s, t = s.float(), t.detach().float()
            objectness = t[..., 4].sigmoid()
            lobj = lobj + bernoulli_kl(s[..., 4], t[..., 4]).mean() * balance[level]
            where = objectness.unsqueeze(-1) / objectness.sum().clamp(min=1.0)
            lcls = (
                lcls + (bernoulli_kl(s[..., 5:], t[..., 5:]).mean(-1, keepdim=True) * where).sum()
            )
            box_error = (s[..., :4].sigmoid() - t[..., :4].sigmoid()).pow(2)
            lbox = lbox + (box_error * where).sum()
        return lbox * w.box * BOX_DISTILL_GAIN + lobj * w.obj + lcls * w.cls

    def end_epoch(self) -> None:
        """The YOLOv5 loss has no schedule."""


class AnchorFreeObjective:
    """Ultralytics' own detection loss on our batches; ``model.args`` carries its gains."""

    def __init__(self, model: nn.Module, epochs: int):
        model.args = SimpleNamespace(**ANCHOR_FREE_GAINS, epochs=epochs)
        self.criterion = model.init_criterion()
        self.reg_max = model.model[-1].reg_max
        single = getattr(self.criterion, "one2one", self.criterion)
        self._item_names = tuple(single.loss_names)
        self.part_names = tuple(n.removesuffix("_loss") for n in self._item_names)

    def __call__(self, raw, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = {"batch_idx": targets[:, 0], "cls": targets[:, 1:2], "bboxes": targets[:, 2:6]}
        loss, items = self.criterion(raw, batch)  # items: the one-to-one branch's, if any
        return loss.sum(), torch.stack([items[n] for n in self._item_names]).detach()

    def distill_targets(self, teacher_out):
        """What ``distill`` reads of the teacher's eval output: each branch's raw boxes and
        scores, batch first (not its feature maps)."""
        raw = teacher_out[1]

        def read(branch: dict) -> dict:
            return {key: branch[key].detach() for key in ("boxes", "scores")}

        if any(k in raw for k in BRANCHES):
            return None, {k: read(raw[k]) for k in BRANCHES if k in raw}
        return None, read(raw)

    def distill(self, student_raw: dict, teacher_out) -> torch.Tensor:
        """Per head branch: MSE of class probabilities, plus MSE of the DFL bin
        distributions (reg_max > 1) or smooth L1 of the box distances (reg_max 1)."""
        student, teacher = head_branches(student_raw), head_branches(teacher_out[1])
        terms = []
        for s, t in zip(student, teacher, strict=True):
            terms.append((s["scores"].sigmoid() - t["scores"].sigmoid()).pow(2).mean())
            terms.append(self._box_term(s["boxes"], t["boxes"]))
        return torch.stack(terms).mean()

    def _box_term(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.reg_max == 1:
            return F.smooth_l1_loss(student, teacher)
        batch, _, anchors = student.shape
        bins = (batch, 4, self.reg_max, anchors)
        return (student.view(bins).softmax(2) - teacher.view(bins).softmax(2)).pow(2).mean()

    def end_epoch(self) -> None:
        """YOLO26's one-to-many weight decays per epoch, as in ultralytics' trainer."""
        if hasattr(self.criterion, "update"):
            self.criterion.update()


# The training objective of each model family (graphs.family), by family name.
OBJECTIVES = {
    "yolov5": lambda model, imgsz, epochs: YoloV5Objective(model, imgsz),
    "ultralytics": lambda model, imgsz, epochs: AnchorFreeObjective(model, epochs),
}


def objective_for(model: nn.Module, imgsz: int, epochs: int):
    family = family_of(model).name
    if family not in OBJECTIVES:
        raise ModelError(f"no training objective for {family} models yet")
    return OBJECTIVES[family](model, imgsz, epochs)
