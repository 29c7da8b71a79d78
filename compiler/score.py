"""Score pass: importance of every channel of every prunable group."""

from __future__ import annotations

import hashlib

import torch
import torch_pruning as tp
from torch import nn

from yoloprune.compiler.train.recalibrate import batchnorms
from yoloprune.graphs.dependency import ChannelGroup, CoupledGraph
from yoloprune.graphs.errors import PlanError

TAYLOR_BATCHES = 8  # training batches of 16 images whose loss gradients Taylor scores read


class Importance:
    """Per-channel importance of a model's prunable groups, normalised within each group (mean
    1): ``importance(model, graph, groups, seed) -> {group id: scores}``. One callable per
    criterion, as Torch-Pruning's ``Importance``; planners receive one and call it."""

    name = "?"

    def __call__(self, model, graph, groups, seed: int = 0) -> dict[str, torch.Tensor]:
        scorer = self._scorer()
        scores = {}
        for group in groups:
            if group.protected:
                continue
            root = model.get_submodule(group.id)
            tp_group = graph.get_pruning_group(
                root, tp.prune_conv_out_channels, list(range(group.size))
            )
            with torch.no_grad():
                value = scorer(tp_group)
            if value is None or value.numel() != group.size:
                raise PlanError(f"importance {self.name!r} is undefined for group {group.id}")
            scores[group.id] = value.detach().float().cpu()
        return scores

    def _scorer(self):
        raise NotImplementedError


class MagnitudeImportance(Importance):
    """The Lp norm of every weight a channel owns across its group (torch-pruning's)."""

    def __init__(self, p: int):
        self.p, self.name = p, f"l{p}"

    def _scorer(self):
        return tp.importance.GroupMagnitudeImportance(p=self.p)


class BatchNormImportance(Importance):
    name = "bn"

    def _scorer(self):
        return tp.importance.BNScaleImportance()


class TaylorImportance(Importance):
    """First-order Taylor (|weight x gradient|) of the detection loss on ``data``'s training
    images; the gradients are cleared after scoring."""

    name = "taylor"

    def __init__(self, data, imgsz: int):
        self.data, self.imgsz = data, imgsz

    def __call__(self, model, graph, groups, seed: int = 0) -> dict[str, torch.Tensor]:
        loss_gradients(model, self.data, self.imgsz)
        try:
            return super().__call__(model, graph, groups, seed)
        finally:
            model.zero_grad(set_to_none=True)

    def _scorer(self):
        return tp.importance.GroupTaylorImportance()


class RandomImportance(Importance):
    """Seeded per group (by its id), so plans are reproducible: the baseline criteria beat."""

    name = "random"

    def __call__(self, model, graph, groups, seed: int = 0) -> dict[str, torch.Tensor]:
        return {g.id: _seeded_random(g.id, g.size, seed) for g in groups if not g.protected}


# The criteria by name (``--importance``): each builds its Importance from the data YAML, the
# image size, and the calibration images (an object with ``files``) where it reads images.
IMPORTANCES = {
    "l1": lambda data, imgsz, images: MagnitudeImportance(1),
    "l2": lambda data, imgsz, images: MagnitudeImportance(2),
    "bn": lambda data, imgsz, images: BatchNormImportance(),
    "taylor": lambda data, imgsz, images: TaylorImportance(data, imgsz),
    "random": lambda data, imgsz, images: RandomImportance(),
    "energy": lambda data, imgsz, images: OutputErrorImportance("energy", images, imgsz),
    "obs": lambda data, imgsz, images: OutputErrorImportance("obs", images, imgsz),
}
# The label-free criteria that read calibration images (--calib-images or --data's train split).
IMAGE_IMPORTANCES = ("energy", "obs")


def importance_named(name: str, data=None, imgsz: int = 640, images=None) -> Importance:
    if name not in IMPORTANCES:
        raise PlanError(f"unknown importance {name!r}: use one of {', '.join(IMPORTANCES)}")
    if name == "taylor" and data is None:
        raise PlanError(
            "--importance taylor needs --data data.yaml (it scores channels by the detection "
            "loss's gradients on training images)"
        )
    if name in IMAGE_IMPORTANCES and images is None:
        raise PlanError(
            f"--importance {name} reads unlabeled images: add --calib-images DIR or --data "
            "data.yaml (its train split)"
        )
    return IMPORTANCES[name](data, imgsz, images)


def _seeded_random(group_id: str, size: int, seed: int) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{group_id}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.rand(size, generator=generator)


def loss_gradients(
    model: nn.Module, data_yaml, imgsz: int, batches: int = TAYLOR_BATCHES, batch: int = 16
) -> int:
    """Accumulate the detection loss's gradients over ``batches`` training batches (no
    augmentation, fixed order) into every weight's ``.grad``, for first-order Taylor scores
    (|weight x gradient|). BatchNorm runs on its running statistics, which stay untouched;
    weights do not change. Returns the number of images seen."""
    from yoloprune.compiler.train.data import YoloDataset, loader, read_data_yaml
    from yoloprune.compiler.train.objective import objective_for

    data = read_data_yaml(data_yaml)
    if not data.train:
        raise PlanError(f"{data_yaml}: --importance taylor needs a 'train' split")
    dataset = YoloDataset(data.train, data.nc, imgsz)
    objective = objective_for(model, imgsz, epochs=1)
    model.zero_grad(set_to_none=True)
    model.train()
    for module in batchnorms(model):
        module.eval()
    seen = 0
    try:
        for i, (images, targets, _) in enumerate(loader(dataset, batch, shuffle=True)):
            if i == batches:
                break
            loss, _ = objective(model(images), targets)
            loss.backward()
            seen += len(images)
    finally:
        model.eval()
    return seen


def score_groups(
    model: nn.Module,
    graph: CoupledGraph,
    groups: list[ChannelGroup],
    importance: str = "l2",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Scores by a criterion's name, for criteria that need no data."""
    return importance_named(importance)(model, graph, groups, seed)


FULL_GRAM_FEATURES = 2304  # larger consumers keep only each channel's own block (no compensation)
OUTPUT_IMPORTANCE_IMAGES = 64
OUTPUT_IMPORTANCE_POSITIONS = 128  # sampled output positions per image and conv
OBS_DAMPING = 0.01


class OutputErrorImportance(Importance):
    """Label-free, on calibration images: a channel scores the error its removal leaves in the
    outputs of the convs that read it (relative to each conv's output energy, summed over the
    group's consumers). ``energy``: the output a channel carries into its consumers (its weights
    times its input statistics); ``obs``: what is left after the consumers' other weights
    compensate as reconstruction does (Optimal Brain Surgeon on each consumer's input Gram
    matrix, channel by channel), so redundant channels go first."""

    def __init__(self, name: str, images, imgsz: int):
        self.name, self.images, self.imgsz = name, images, imgsz
        self._grams: dict = {}
        self._cache: dict = {}

    def __call__(self, model, graph, groups, seed: int = 0) -> dict[str, torch.Tensor]:
        from yoloprune.compiler.reconstruct import input_grams

        files = self.images.files[:OUTPUT_IMPORTANCE_IMAGES]
        self._grams = input_grams(model, files, self.imgsz, FULL_GRAM_FEATURES, seed)
        try:
            return super().__call__(model, graph, groups, seed)
        finally:
            self._grams, self._cache = {}, {}

    def _scorer(self):
        return self._score

    def _score(self, tp_group) -> torch.Tensor | None:
        scores = None
        for i, (dep, idxs) in enumerate(tp_group):
            layer = dep.target.module
            if dep.handler.__name__ != "prune_in_channels" or layer not in self._grams:
                continue
            if scores is None:
                scores = torch.zeros(len(tp_group[0].root_idxs))
            cost = self._consumer_cost(layer)[torch.as_tensor(list(idxs))]
            scores.scatter_add_(0, torch.as_tensor(tp_group[i].root_idxs), cost)
        if scores is None:
            raise PlanError(f"importance {self.name!r}: a group no conv reads")
        return scores / scores.mean().clamp_min(1e-30)

    def _consumer_cost(self, conv: nn.Conv2d) -> torch.Tensor:
        if conv not in self._cache:
            self._cache[conv] = channel_costs(conv, self._grams[conv], self.name == "obs")
        return self._cache[conv]


def channel_costs(conv: nn.Conv2d, gram: torch.Tensor, compensated: bool) -> torch.Tensor:
    """Per input channel of ``conv``: the relative output error removing it leaves. ``gram`` is
    its input patches' Gram matrix (features x features), or each channel's own block
    (channels x k*k x k*k) where the full one was too large."""
    weight = conv.weight.detach().double()
    out, channels = weight.shape[:2]
    per = weight.reshape(out, channels, -1)  # (out, channel, k*k)
    kk = per.shape[2]
    if gram.dim() == 2:
        energy = torch.einsum("of,fg,og->", weight.reshape(out, -1), gram, weight.reshape(out, -1))
        index = torch.arange(channels * kk).reshape(channels, kk)
        if compensated:
            damped = gram + OBS_DAMPING * gram.diagonal().mean() * torch.eye(len(gram)).double()
            inverse = torch.linalg.inv(damped)
            blocks = torch.linalg.inv(inverse[index[:, :, None], index[:, None, :]])
        else:
            blocks = gram[index[:, :, None], index[:, None, :]]
    else:
        blocks = gram
        energy = torch.einsum("ocj,cjk,ock->", per, blocks, per)
    costs = torch.einsum("ocj,cjk,ock->c", per, blocks, per)
    return (costs / energy.clamp_min(1e-30)).float()
