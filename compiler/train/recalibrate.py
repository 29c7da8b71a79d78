"""Recalibrate pass: re-estimate BatchNorm statistics of a pruned model on training images.

Removing a channel removes its contribution to every consumer conv, so the consumers' outputs
shift in mean and shrink in variance while their BatchNorm layers still normalise with the
original model's running statistics. Evaluated as it is, a pruned model is therefore far worse
than its kept weights can do (the embedded yolov5n at MACs 0.3: mAP@.5:.95 0.008). Forward
passes in train mode with no gradient re-estimate those statistics (EagleEye's "adaptive
BatchNorm", Li et al. 2020): the same model scores 0.25 without a single weight update. Only
BatchNorm buffers change; weights, shapes and the architecture do not.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch import nn

from yoloprune.graphs.errors import PlanError

RECALIBRATE_BATCHES = 20  # training batches of RECALIBRATE_BATCH images
RECALIBRATE_BATCH = 32


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> int:
    """Replace every BatchNorm's running mean and variance with their averages over ``batches``
    (an iterable of image tensors, or of tuples whose first item is one), as the model sees
    them in train mode. The model is left in eval mode. Returns the number of images seen."""
    norms = batchnorms(model)
    momenta = [m.momentum for m in norms]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches, not an exponential one
    seen = 0
    model.train()
    try:
        for item in batches:
            images = item[0] if isinstance(item, (tuple, list)) else item
            _forward(model, images)
            seen += len(images)
        if norms and not seen:
            raise PlanError("BatchNorm recalibration saw no images: the training split is empty")
    except BaseException:
        for m, state in zip(norms, before, strict=True):
            m.load_state_dict(state)  # a failed recalibration leaves the statistics as they were
        raise
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return seen


def _forward(model: nn.Module, images: torch.Tensor) -> None:
    try:
        model(images)
    except ValueError as err:  # BatchNorm in train mode on a single value per channel
        if "more than 1 value per channel" not in str(err):
            raise
        raise PlanError(
            f"BatchNorm recalibration got a batch of {len(images)} image(s) whose smallest "
            "feature map has one value per channel: recalibrate on more images (a larger "
            "training split), a larger --imgsz, or pass --no-recalibrate"
        ) from err


def recalibrate_on_data(
    model: nn.Module,
    data_yaml: str | Path,
    imgsz: int,
    batches: int = RECALIBRATE_BATCHES,
    batch: int = RECALIBRATE_BATCH,
    seed: int = 0,
) -> int:
    """:func:`recalibrate_batchnorm` on ``batches`` shuffled, augmented training batches of the
    data YAML (augmented as fine-tuning sees them; the order is fixed by ``seed``)."""
    from yoloprune.compiler.train.data import YoloDataset, loader, read_data_yaml

    data = read_data_yaml(data_yaml)
    if not data.train:
        raise PlanError(f"{data_yaml}: BatchNorm recalibration needs a 'train' split")
    dataset = YoloDataset(data.train, data.nc, imgsz, augment=True, seed=seed)
    source = loader(dataset, batch, shuffle=True, seed=seed)
    try:
        return recalibrate_batchnorm(model, itertools.islice(source, batches))
    except PlanError as err:
        raise PlanError(f"{data_yaml}: {err}") from err
