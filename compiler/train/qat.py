"""Quantization-aware training: the fine-tune with INT8 fake quantizers in the loop.

The model is quantized as PTQ does (compiler.quantize: BatchNorm folded, symmetric int8,
per-channel weights, per-tensor conv inputs, ranges calibrated on images), then fine-tuned by
the same loop as any recovery (compiler.train.finetune: the family's detection loss,
distillation from the unpruned fp32 model, EMA, DDP under torchrun), gradients passing the
rounding straight through (ModelOpt's fake quantization). The ranges stay as calibrated: the
weights learn to live with them. The trained weights are also returned in the model's own form
(every BatchNorm an identity plus the folded bias), which is what the fp32 and fp16 files
and the pruned checkpoint hold: stock yolov5 and ultralytics load them as before.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn

from yoloprune.compiler.quantize import Calibration, post_training_quantized
from yoloprune.compiler.train.data import DataConfig
from yoloprune.compiler.train.finetune import TrainResult, TrainSettings, train, training_device
from yoloprune.graphs.checkpoint import ModelInfo
from yoloprune.graphs.errors import YoloPruneError


@dataclass
class QuantizationAwareTraining:
    quantized: nn.Module  # the fake-quantized model, trained (exports the INT8 file)
    fp32: nn.Module  # its weights in the model's own form (BatchNorm modules kept)
    training: TrainResult
    record: dict  # the INT8 file's ``quantization`` metadata


def quantization_aware_training(
    model: nn.Module,
    info: ModelInfo,
    data: DataConfig,
    settings: TrainSettings,
    calibration: Calibration,
    *,
    teacher: nn.Module | None = None,
    progress: bool = True,
) -> QuantizationAwareTraining:
    """Quantize ``model`` (PTQ on ``calibration``'s images), then fine-tune it on ``data`` with
    the quantizers in the loop; ``model`` itself is untouched. Each epoch's mAP is the fake-
    quantized model's, and the best epoch is kept."""
    imgsz = settings.imgsz or info.imgsz
    settings = _fp32_on_cpu(settings)
    start, record = post_training_quantized(model, imgsz, calibration)
    training = train(start, info, data, settings, teacher=teacher, progress=progress)
    quantized = training.model.eval()
    record = {
        **record,
        "method": record["method"].replace("PTQ", "QAT", 1),
        "qat": (
            f"{settings.epochs} epochs from PTQ, {settings.optimizer} lr0 "
            f"{settings.lr0 or settings.default_lr0}, "
            f"distillation {settings.distill if teacher else 0}"
        ),
    }
    return QuantizationAwareTraining(quantized, own_form(quantized, model), training, record)


def _fp32_on_cpu(settings: TrainSettings) -> TrainSettings:
    """QAT on the CPU trains in fp32: bf16 autocast would round the fake-quantized convs'
    inputs a second time (a mixed precision asked for there is refused)."""
    if training_device(settings).type != "cpu":
        return settings
    if settings.amp:
        raise YoloPruneError(
            "--amp: quantization-aware training runs in fp32 on the CPU (bf16 would round the "
            "fake-quantized inputs again); drop --amp"
        )
    return replace(settings, amp=False)


def own_form(quantized: nn.Module, model: nn.Module) -> nn.Module:
    """A copy of ``model`` carrying ``quantized``'s float weights: convs whose BatchNorm was
    folded get the folded weight, and their BatchNorm becomes an exact identity that adds the
    folded bias (mean 0, variance 1 - eps, scale 1); every other tensor is copied."""
    result = copy.deepcopy(model)
    trained = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in result.named_modules():
            source = trained.get(name)
            conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(bn, nn.BatchNorm2d)
                and isinstance(getattr(source, "bn", None), nn.Identity)
            ):
                _conv_bn_from_folded(conv, bn, source.conv)
        folded = {f"{n}.conv" for n, m in result.named_modules() if _was_folded(m, trained, n)}
        state = quantized.state_dict()
        for key, tensor in result.state_dict().items():
            owner = key.rsplit(".", 1)[0]
            if owner in folded or owner.removesuffix(".bn") + ".conv" in folded:
                continue
            tensor.copy_(state[key])
    return result.eval()


def _was_folded(module: nn.Module, trained: dict, name: str) -> bool:
    return isinstance(getattr(module, "bn", None), nn.BatchNorm2d) and isinstance(
        getattr(trained.get(name), "bn", None), nn.Identity
    )


def _conv_bn_from_folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, folded: nn.Conv2d) -> None:
    conv.weight.copy_(folded.weight)
    bias = folded.bias if folded.bias is not None else torch.zeros_like(bn.bias)
    if conv.bias is not None:  # keep it zero: the BatchNorm carries the bias
        conv.bias.zero_()
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)  # in float32, var + eps rounds to 1 exactly
    bn.weight.fill_(1.0)
    bn.bias.copy_(bias)
