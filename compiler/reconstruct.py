"""Reconstruct pass: re-fit a pruned model's remaining weights so each layer's outputs match the
original model's, on unlabeled calibration images (one-shot, no training).

Removing channels changes what every later conv sees. Each conv that remains is re-fitted by
ridge least squares (ThiNet's reconstruction, the layer-wise step of post-training pruning:
Kwon et al. 2022, Frantar & Alistarh 2022): its kept weights and a bias are solved so that its
output on the *pruned* model's inputs matches the original conv's output on the *original*
model's inputs, pulled towards the kept original weights by a small damping term. The layers
are fitted in network order and each one sees inputs from the already re-fitted layers before
it, so errors are corrected where they arise instead of compounding.

How it runs: the calibration images are carried through both models one top-level layer at a
time (the activations a later layer reads are kept, for every image); inside a layer each conv
is fitted in execution order, re-running the layer's pruned copy up to that conv. Statistics
are accumulated on a fixed random sample of output positions per image (the Gram matrix of the
input patches and their products with the targets), so memory and time grow with the number of
images, not with their pixels. The fitted bias goes into the BatchNorm that follows the conv
(its running mean), or into the conv's own bias; the architecture and every shape stay the
same, so nothing downstream (export, INT8 calibration, fine-tuning) needs to know.
"""

from __future__ import annotations

import copy
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from yoloprune.graphs.errors import PlanError

DEFAULT_IMAGES = 128  # calibration images
# Ridge strengths tried per conv (relative to the mean diagonal of its patch Gram matrix); the
# one with the least error on held-out samples is used.
DEFAULT_DAMPINGS = (0.001, 0.01, 0.1, 1.0, 10.0)
DEFAULT_SAMPLES = 16384  # output positions per conv, spread evenly over the images
BATCH = 16
_INDEX_BASE = 4096  # the probe encodes (out, in) channel indices as out * base + in


@dataclass(frozen=True)
class ReconstructSettings:
    images: int = DEFAULT_IMAGES
    dampings: tuple[float, ...] = DEFAULT_DAMPINGS
    samples: int = DEFAULT_SAMPLES
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images < 1 or self.samples < 1 or not all(d > 0 for d in self.dampings):
            raise PlanError("reconstruction needs images >= 1, samples >= 1 and dampings > 0")


@dataclass(frozen=True)
class Reconstruction:
    """Where reconstruction's images come from (a folder, or a data YAML's train split; no
    labels are read) and how it runs."""

    folder: Path | None
    data: Path | None
    settings: ReconstructSettings = ReconstructSettings()

    @cached_property
    def files(self) -> list[Path]:
        from yoloprune.compiler.quantize import Calibration

        return Calibration(self.folder, self.data, self.settings.images).files

    @property
    def source(self) -> str:
        return f"{self.folder} (folder)" if self.folder else f"{self.data} (train split)"


@dataclass(frozen=True)
class ReconstructRecord:
    """What a reconstruction did: plain data for the report."""

    images: int
    convs_fitted: int
    convs_skipped: tuple[str, ...]  # grouped convs other than depthwise, fixed modules
    positions_per_image: int  # sampled output positions per image and conv (at most)
    dampings_chosen: dict[str, int]  # damping -> convs it was chosen for ("kept": none helped)
    seconds: float
    peak_activation_mib: float  # the activations held for all images at once, at most
    output_error_before: float  # relative L2 error of the last layer's convs, before / after
    output_error_after: float

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "convs_fitted": self.convs_fitted,
            "convs_skipped": list(self.convs_skipped),
            "positions_per_image": self.positions_per_image,
            "dampings_chosen": dict(self.dampings_chosen),
            "seconds": round(self.seconds, 2),
            "peak_activation_mib": round(self.peak_activation_mib, 1),
            "head_error_before": round(self.output_error_before, 4),
            "head_error_after": round(self.output_error_after, 4),
        }


@dataclass
class _Target:
    """One conv of the pruned model and where its channels came from in the original."""

    name: str
    original: nn.Conv2d
    pruned: nn.Conv2d
    out_index: torch.Tensor  # original output channel of each pruned output channel
    in_index: torch.Tensor  # original input channel (within its group) of each pruned input
    bias_into: nn.Module | None  # the BatchNorm that absorbs a fitted bias, else None

    @property
    def depthwise(self) -> bool:
        conv = self.pruned
        return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels

    @property
    def fits_bias(self) -> bool:
        return self.bias_into is not None or self.pruned.bias is not None


def kept_channels(original: nn.Module, pruned_like) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For every conv: which original output and input channels its pruned copy kept, read off
    a probe model whose weights encode their own indices, pruned by ``pruned_like`` (a function
    from a model to its pruned copy: the same surgery that made the pruned model)."""
    probe = copy.deepcopy(original)
    with torch.no_grad():
        for conv in probe.modules():
            if isinstance(conv, nn.Conv2d):
                out, inner = conv.weight.shape[:2]
                if max(out, inner) >= _INDEX_BASE:
                    raise PlanError(f"reconstruction: a conv with {max(out, inner)} channels")
                code = torch.arange(out)[:, None] * _INDEX_BASE + torch.arange(inner)[None, :]
                conv.weight.copy_(code[:, :, None, None].expand_as(conv.weight).float())
    probed = pruned_like(probe)
    kept = {}
    for name, conv in probed.named_modules():
        if isinstance(conv, nn.Conv2d):
            code = conv.weight.detach()[:, :, 0, 0].round().long()
            kept[name] = (code[:, 0] // _INDEX_BASE, code[0, :] % _INDEX_BASE)
    return kept


def _bias_homes(model: nn.Module) -> dict[nn.Conv2d, nn.Module]:
    """Each conv whose output goes straight into its own BatchNorm (``Conv``: conv, bn, act)."""
    homes = {}
    for module in model.modules():
        conv, norm = getattr(module, "conv", None), getattr(module, "bn", None)
        paired = isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
        if paired and norm.num_features == conv.out_channels:
            homes[conv] = norm
    return homes


def _targets(original, pruned, kept, fixed: set[int]) -> tuple[dict[str, _Target], list[str]]:
    originals = dict(original.named_modules())
    homes = _bias_homes(pruned)
    targets, skipped = {}, []
    for name, conv in pruned.named_modules():
        if not isinstance(conv, nn.Conv2d) or name not in originals:
            continue
        if id(conv) in fixed:
            skipped.append(name)
            continue
        target = _Target(name, originals[name], conv, *kept[name], homes.get(conv))
        if conv.groups > 1 and not target.depthwise:
            skipped.append(name)
            continue
        targets[name] = target
    return targets, skipped


class _Stop(Exception):  # control flow: the capture is done
    pass


def _capture(module: nn.Module, inputs, conv: nn.Conv2d, what: str) -> torch.Tensor:
    """Run ``module`` on ``inputs`` until ``conv`` runs; return its input or output."""
    caught = []

    def pre(_, args):
        if what == "input":
            caught.append(args[0])
            raise _Stop

    def post(_, __, output):
        caught.append(output)
        raise _Stop

    handles = [conv.register_forward_pre_hook(pre), conv.register_forward_hook(post)]
    try:
        module(inputs)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if not caught:
        raise PlanError(f"reconstruction: a conv did not run in {type(module).__name__}")
    return caught[0]


def _execution_order(module: nn.Module, inputs, names: dict[nn.Module, str]) -> list[str]:
    order = []
    handles = [m.register_forward_pre_hook(lambda m, _: order.append(names[m])) for m in names]
    try:
        module(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(order))


def _positions(key: str, batch: int, shape, count: int) -> tuple[torch.Tensor, ...]:
    """A fixed sample of ``count`` output positions per image (the same for both models)."""
    n, _, h, w = shape
    generator = torch.Generator().manual_seed(zlib.crc32(f"{key}:{batch}".encode()))
    per_image = min(count, h * w)
    flat = torch.stack([torch.randperm(h * w, generator=generator)[:per_image] for _ in range(n)])
    images = torch.arange(n)[:, None].expand_as(flat).reshape(-1)
    flat = flat.reshape(-1)
    return images, flat // w, flat % w


def _patches(x: torch.Tensor, conv: nn.Conv2d, where) -> torch.Tensor:
    """The input patch of each sampled output position, flattened as the weights are:
    (samples, in_channels * kh * kw)."""
    images, rows, cols = where
    kh, kw = conv.kernel_size
    (sh, sw), (dh, dw), (ph, pw) = conv.stride, conv.dilation, conv.padding
    padded = F.pad(x, (pw, pw, ph, ph))
    r = rows[:, None] * sh + torch.arange(kh)[None, :] * dh  # (S, kh)
    c = cols[:, None] * sw + torch.arange(kw)[None, :] * dw  # (S, kw)
    picked = padded[images[:, None, None], :, r[:, :, None], c[:, None, :]]  # (S, kh, kw, C)
    return picked.permute(0, 3, 1, 2).reshape(len(images), -1)


@dataclass
class _Sums:
    """Normal-equation sums over some samples: patches' Gram matrix, patches x targets, and
    the targets' squares (per output channel)."""

    gram: torch.Tensor
    cross: torch.Tensor
    wanted_sq: torch.Tensor

    def __add__(self, other: _Sums) -> _Sums:
        return _Sums(
            self.gram + other.gram, self.cross + other.cross, self.wanted_sq + other.wanted_sq
        )


class _Normal:
    """Accumulated normal equations of one conv (per channel for a depthwise conv), in two
    halves (even and odd batches) so the damping can be chosen on held-out samples."""

    def __init__(self, target: _Target) -> None:
        self.target = target
        self.halves: list[_Sums | None] = [None, None]

    def add(self, patches: torch.Tensor, wanted: torch.Tensor, half: int) -> None:
        """``patches`` (samples, features) of the pruned model, ``wanted`` (samples, out) the
        original conv's outputs there."""
        target = self.target
        if target.depthwise:  # each channel its own small problem: (S, C, k*k)
            patches = patches.reshape(len(patches), target.pruned.out_channels, -1)
        if target.fits_bias:
            patches = torch.cat([patches, patches.new_ones(*patches.shape[:-1], 1)], -1)
        if target.depthwise:
            gram = torch.einsum("sci,scj->cij", patches, patches)
            cross = torch.einsum("sci,sc->ci", patches, wanted)
        else:
            gram, cross = patches.T @ patches, patches.T @ wanted
        sums = _Sums(gram.double(), cross.double(), (wanted * wanted).sum(0).double())
        held = self.halves[half]
        self.halves[half] = sums if held is None else held + sums

    def error(self, solution: torch.Tensor, sums: _Sums) -> float:
        """Relative L2 error of the outputs ``solution`` gives on the samples of ``sums``."""
        if self.target.depthwise:  # solution (C, f)
            fit = torch.einsum("cf,cfg,cg->c", solution, sums.gram, solution)
            cross = (solution * sums.cross).sum(1)
        else:  # solution (f, out)
            fit = ((sums.gram @ solution) * solution).sum(0)
            cross = (solution * sums.cross).sum(0)
        residual = (sums.wanted_sq - 2 * cross + fit).sum().clamp_min(0)
        return float((residual / sums.wanted_sq.sum().clamp_min(1e-30)).sqrt())

    def current(self) -> torch.Tensor:
        """The conv's weights (and bias) now, laid out as the solution is."""
        conv, target = self.target.pruned, self.target
        out = conv.out_channels
        weight = conv.weight.detach().double().reshape(out, -1)  # (out, features)
        if target.fits_bias:
            bias = torch.zeros(out, dtype=torch.float64)
            if conv.bias is not None:
                bias = conv.bias.detach().double()
            weight = torch.cat([weight, bias[:, None]], 1)
        return weight if target.depthwise else weight.T

    def ridge(self, sums: _Sums, dampings, prior: torch.Tensor) -> dict[float, torch.Tensor]:
        """The solutions pulled towards ``prior`` with strength damping x mean diagonal, for
        each damping (one eigendecomposition serves them all)."""
        if self.target.depthwise:
            eye = torch.eye(sums.gram.shape[-1], dtype=torch.float64)
            scale = sums.gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)[:, None, None]
            solutions = {}
            for damping in dampings:
                rhs = (sums.cross + damping * scale[:, :, 0] * prior)[..., None]
                solutions[damping] = torch.linalg.solve(sums.gram + damping * scale * eye, rhs)[
                    ..., 0
                ]
            return solutions
        scale = sums.gram.diagonal().mean().clamp_min(1e-12)
        values, vectors = torch.linalg.eigh(sums.gram)
        cross, towards = vectors.T @ sums.cross, vectors.T @ prior
        return {
            d: vectors
            @ ((cross + d * scale * towards) / (values.clamp_min(0) + d * scale)[:, None])
            for d in dampings
        }

    def choose(self, prior: torch.Tensor, dampings: tuple[float, ...]) -> float | None:
        """The damping whose solution, fitted on one half, leaves the least error on the other
        (both ways); None where no solution beats the weights as they are."""
        first, second = self.halves
        if second is None:
            return dampings[len(dampings) // 2]
        scores = {None: self.error(prior, first) + self.error(prior, second)}
        on_first, on_second = (
            self.ridge(first, dampings, prior),
            self.ridge(second, dampings, prior),
        )
        for damping in dampings:
            scores[damping] = self.error(on_first[damping], second) + self.error(
                on_second[damping], first
            )
        return min(scores, key=scores.get)

    def solve(self, dampings: tuple[float, ...]) -> tuple[float, float, float | None]:
        """Set the conv to the ridge solution at the damping chosen on held-out samples;
        returns the relative output error before and after, and the damping (None: the
        weights were left as they were)."""
        prior = self.current()
        sums = self.halves[0] if self.halves[1] is None else self.halves[0] + self.halves[1]
        before = self.error(prior, sums)
        damping = self.choose(prior, dampings)
        if damping is None:
            return before, before, None
        solution = self.ridge(sums, (damping,), prior)[damping]
        if self.target.depthwise:
            weight, bias = solution, solution[:, -1]
        else:
            weight, bias = solution.T, solution[-1]
        conv, fits_bias = self.target.pruned, self.target.fits_bias
        if fits_bias:
            weight = weight[:, :-1]
        with torch.no_grad():
            conv.weight.copy_(weight.reshape(conv.weight.shape).to(conv.weight.dtype))
            if fits_bias:
                shift = bias.to(conv.weight.dtype)
                if conv.bias is not None:
                    conv.bias.copy_(shift)
                else:  # BN(conv(x) + b) is BN with its running mean lowered by b
                    self.target.bias_into.running_mean.sub_(shift)
        return before, self.error(solution, sums), damping


class _Flow:
    """One model's activations for every calibration batch, one top-level layer at a time
    (``model.model`` with ``f`` and ``i`` per layer, as both YOLO families build it)."""

    def __init__(self, model: nn.Module, batches: list[torch.Tensor]) -> None:
        self.layers = list(model.model)
        self.save = set(model.save)
        self.current = list(batches)
        self.outputs: list[list] = [[] for _ in batches]

    def inputs(self, index: int, batch: int):
        source = self.layers[index].f
        if source == -1:
            return self.current[batch]
        held = self.outputs[batch]
        if isinstance(source, int):
            return held[source]
        return [self.current[batch] if j == -1 else held[j] for j in source]

    @torch.no_grad()
    def advance(self, index: int) -> None:
        layer = self.layers[index]
        for batch in range(len(self.current)):
            x = layer(self.inputs(index, batch))
            self.current[batch] = x
            self.outputs[batch].append(x if layer.i in self.save else None)

    def held_mib(self) -> float:
        tensors = {id(t): t for t in self.current if isinstance(t, torch.Tensor)}
        for held in self.outputs:
            tensors.update({id(t): t for t in held if isinstance(t, torch.Tensor)})
        return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


@torch.no_grad()
def reconstruct(
    original: nn.Module,
    pruned: nn.Module,
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]],
    batches: Iterable[torch.Tensor],
    settings: ReconstructSettings = ReconstructSettings(),
    fixed: Iterable[nn.Module] = (),
    progress: bool = True,
) -> ReconstructRecord:
    """Re-fit ``pruned``'s convs in place to reproduce ``original``'s conv outputs on
    ``batches`` (NCHW images as the model takes them); ``kept`` from :func:`kept_channels`;
    ``fixed`` modules (and convs without gradients) are left as they are."""
    start = time.perf_counter()
    original.eval()
    pruned.eval()
    images = [b for b in batches]
    count = sum(len(b) for b in images)
    if not count:
        raise PlanError("reconstruction got no calibration images")
    fixed_ids = {id(c) for m in fixed for c in m.modules()}
    targets, skipped = _targets(original, pruned, kept, fixed_ids)
    per_image = max(1, -(-settings.samples // count))
    flows = _Flow(original, images), _Flow(pruned, images)
    last = len(flows[1].layers) - 1
    fitted, peak, head, chosen = 0, 0.0, [], {}
    bar = tqdm(
        total=len(targets),
        desc="reconstruct",
        unit="conv",
        leave=False,
        disable=not progress or None,
    )
    with bar:
        for index in range(last + 1):
            layer = flows[1].layers[index]
            prefix = f"model.{index}."
            here = {n: t for n, t in targets.items() if n.startswith(prefix)}
            order = []
            if here:
                names = {t.pruned: n for n, t in here.items()}
                order = _execution_order(layer, flows[1].inputs(index, 0), names)
            wanted = _advance_capturing(flows[0], index, here, per_image, settings.seed)
            for name in order:
                *errors, damping = _fit(here[name], index, flows[1], wanted.pop(name), settings)
                key = "kept" if damping is None else f"{damping:g}"
                chosen[key] = chosen.get(key, 0) + 1
                fitted += 1
                if index == last:
                    head.append(errors)
                bar.update()
            bar.update(len(here) - len(order))
            if index < last:
                flows[1].advance(index)
                peak = max(peak, flows[0].held_mib() + flows[1].held_mib())
    before = sum(e[0] for e in head) / max(1, len(head))
    after = sum(e[1] for e in head) / max(1, len(head))
    return ReconstructRecord(
        images=count,
        convs_fitted=fitted,
        convs_skipped=tuple(skipped),
        positions_per_image=per_image,
        dampings_chosen=dict(sorted(chosen.items())),
        seconds=time.perf_counter() - start,
        peak_activation_mib=peak,
        output_error_before=before,
        output_error_after=after,
    )


def _advance_capturing(flow: _Flow, index: int, targets: dict, per_image: int, seed: int):
    """Advance the original model's flow through layer ``index``, keeping each target conv's
    outputs at its sampled positions: ``{name: [(positions, outputs (S, kept out))] per
    batch}``."""
    wanted: dict[str, list] = {name: [] for name in targets}

    def keeper(name: str, target: _Target):
        def keep(_, __, output):
            where = _positions(f"{seed}:{name}", len(wanted[name]), output.shape, per_image)
            images, rows, cols = where
            wanted[name].append((where, output[images, :, rows, cols][:, target.out_index]))

        return keep

    handles = [t.original.register_forward_hook(keeper(n, t)) for n, t in targets.items()]
    try:
        flow.advance(index)
    finally:
        for handle in handles:
            handle.remove()
    return wanted


def _fit(target: _Target, index: int, flow: _Flow, wanted: list, settings) -> tuple:
    """Accumulate ``target``'s normal equations over every batch (its inputs from the pruned
    model's ``flow``, the original's outputs ``wanted``), then solve them: (error before,
    error after, damping chosen or None)."""
    normal = _Normal(target)
    layer = flow.layers[index]
    for batch, (where, picked) in enumerate(wanted):
        x = _capture(layer, flow.inputs(index, batch), target.pruned, "input")
        normal.add(_patches(x, target.pruned, where), picked, batch % 2)
    return normal.solve(settings.dampings)


def reconstruct_pruned(
    original: nn.Module,
    pruned: nn.Module,
    surgery,
    reconstruction: Reconstruction,
    imgsz: int,
    fixed: Iterable[nn.Module] = (),
    progress: bool = True,
) -> dict:
    """:func:`reconstruct` ``pruned`` (made from ``original`` by ``surgery``, a function from a
    model to its pruned copy) on ``reconstruction``'s images, letterboxed to ``imgsz``; returns
    the report's record."""
    from yoloprune.compiler.quantize import CalibrationRecord, calibration_batches

    kept = kept_channels(original, surgery)
    read = CalibrationRecord()
    batches = calibration_batches(reconstruction.files, imgsz, read, batch=BATCH)
    try:
        record = reconstruct(
            original, pruned, kept, batches, reconstruction.settings, fixed, progress
        )
    except PlanError as exc:
        raise PlanError(f"{reconstruction.source}: {exc}") from exc
    return {**record.to_dict(), "source": reconstruction.source, "unreadable": read.unreadable}


@torch.no_grad()
def input_grams(
    model: nn.Module, files: list[Path], imgsz: int, full_features: int, seed: int = 0
) -> dict[nn.Conv2d, torch.Tensor]:
    """Every ungrouped conv's input-patch Gram matrix on ``files`` (letterboxed to ``imgsz``),
    float64, from a fixed sample of output positions per image: the full matrix for up to
    ``full_features`` features, else each input channel's own k*k block."""
    from yoloprune.compiler.quantize import CalibrationRecord, calibration_batches
    from yoloprune.compiler.score import OUTPUT_IMPORTANCE_POSITIONS

    convs = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1}
    grams: dict[nn.Conv2d, torch.Tensor] = {}
    counter = {"batch": 0}

    def collect(conv, args, output):
        where = _positions(
            f"{seed}:{convs[conv]}", counter["batch"], output.shape, OUTPUT_IMPORTANCE_POSITIONS
        )
        patches = _patches(args[0], conv, where)
        if patches.shape[1] <= full_features:
            gram = patches.T @ patches
        else:
            per = patches.reshape(len(patches), conv.in_channels, -1)
            gram = torch.einsum("sci,scj->cij", per, per)
        grams[conv] = gram.double() if conv not in grams else grams[conv] + gram

    handles = [conv.register_forward_hook(collect) for conv in convs]
    model.eval()
    read = CalibrationRecord()
    try:
        for batch in calibration_batches(files, imgsz, read, batch=BATCH):
            model(batch)
            counter["batch"] += 1
    finally:
        for handle in handles:
            handle.remove()
    if not read.used:
        raise PlanError("no calibration image could be read")
    return grams
