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
DEFAULT_DAMPING = 0.01  # ridge strength, relative to the mean diagonal of the patch Gram matrix
DEFAULT_SAMPLES = 16384  # output positions per conv, spread evenly over the images
BATCH = 16
_INDEX_BASE = 4096  # the probe encodes (out, in) channel indices as out * base + in


@dataclass(frozen=True)
class ReconstructSettings:
    images: int = DEFAULT_IMAGES
    damping: float = DEFAULT_DAMPING
    samples: int = DEFAULT_SAMPLES
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images < 1 or self.samples < 1 or not self.damping > 0:
            raise PlanError("reconstruction needs images >= 1, samples >= 1 and damping > 0")


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
    samples_per_conv: int
    damping: float
    seconds: float
    peak_activation_mib: float  # the activations held for all images at once, at most
    output_error_before: float  # relative L2 error of the last layer's convs, before / after
    output_error_after: float

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "convs_fitted": self.convs_fitted,
            "convs_skipped": list(self.convs_skipped),
            "samples_per_conv": self.samples_per_conv,
            "damping": self.damping,
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


class _Normal:
    """Accumulated normal equations of one conv (per channel for a depthwise conv)."""

    def __init__(self, target: _Target) -> None:
        self.target = target
        self.gram = None
        self.cross = None
        self.count = 0

    def add(self, patches: torch.Tensor, wanted: torch.Tensor) -> None:
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
        wanted_sq = (wanted * wanted).sum(0)
        if self.gram is None:
            self.gram, self.cross, self.wanted_sq = (
                gram.double(),
                cross.double(),
                wanted_sq.double(),
            )
        else:
            self.gram += gram
            self.cross += cross
            self.wanted_sq += wanted_sq
        self.count += len(patches)

    def error(self, solution: torch.Tensor) -> float:
        """Relative L2 error of the outputs ``solution`` gives on the accumulated samples."""
        if self.target.depthwise:  # solution (C, f)
            fit = torch.einsum("cf,cfg,cg->c", solution, self.gram, solution)
            cross = (solution * self.cross).sum(1)
        else:  # solution (f, out)
            fit = ((self.gram @ solution) * solution).sum(0)
            cross = (solution * self.cross).sum(0)
        residual = (self.wanted_sq - 2 * cross + fit).sum().clamp_min(0)
        return float((residual / self.wanted_sq.sum().clamp_min(1e-30)).sqrt())

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

    def solve(self, damping: float) -> tuple[float, float]:
        """Set the conv to the ridge solution; returns the relative output error before and
        after."""
        prior = self.current()
        before = self.error(prior)
        eye = torch.eye(self.gram.shape[-1], dtype=torch.float64)
        if self.target.depthwise:
            scale = self.gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)[:, None, None]
            rhs = self.cross + damping * scale[:, :, 0] * prior
            solution = torch.linalg.solve(self.gram + damping * scale * eye, rhs[..., None])[..., 0]
            weight, bias = solution, solution[:, -1]
        else:
            scale = self.gram.diagonal().mean().clamp_min(1e-12)
            rhs = self.cross + damping * scale * prior
            solution = torch.linalg.solve(self.gram + damping * scale * eye, rhs)
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
        return before, self.error(solution)


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
    fitted, peak, head = 0, 0.0, []
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
            names = {t.pruned: n for n, t in targets.items() if n.startswith(prefix)}
            order = _execution_order(layer, flows[1].inputs(index, 0), names) if names else []
            for name in order:
                errors = _fit(targets[name], index, flows, per_image, settings)
                fitted += 1
                if index == last:
                    head.append(errors)
                bar.update()
            bar.update(len(names) - len(order))
            if index < last:
                for flow in flows:
                    flow.advance(index)
                peak = max(peak, flows[0].held_mib() + flows[1].held_mib())
    before = sum(e[0] for e in head) / max(1, len(head))
    after = sum(e[1] for e in head) / max(1, len(head))
    return ReconstructRecord(
        images=count,
        convs_fitted=fitted,
        convs_skipped=tuple(skipped),
        samples_per_conv=min(per_image, 1 << 62) * count,
        damping=settings.damping,
        seconds=time.perf_counter() - start,
        peak_activation_mib=peak,
        output_error_before=before,
        output_error_after=after,
    )


def _fit(target: _Target, index: int, flows, per_image: int, settings) -> tuple[float, float]:
    """Accumulate ``target``'s normal equations over every batch, then solve them."""
    normal = _Normal(target)
    original_flow, pruned_flow = flows
    layer_o, layer_p = original_flow.layers[index], pruned_flow.layers[index]
    for batch in range(len(pruned_flow.current)):
        wanted = _capture(layer_o, original_flow.inputs(index, batch), target.original, "output")
        x = _capture(layer_p, pruned_flow.inputs(index, batch), target.pruned, "input")
        where = _positions(f"{settings.seed}:{target.name}", batch, wanted.shape, per_image)
        images, rows, cols = where
        picked = wanted[images, :, rows, cols][:, target.out_index]  # (S, kept out)
        normal.add(_patches(x, target.pruned, where), picked)
    return normal.solve(settings.damping)


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
