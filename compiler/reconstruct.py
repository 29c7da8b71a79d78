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
time; only the activations later layers read are kept (float16, every image). Each layer runs
once per model: the original in chunks, keeping its convs' outputs at a fixed random sample of
output positions per image; the pruned copy on all images at once, each conv solved in a
pre-forward hook just before it runs, so it sees the inputs the convs fitted before it produce.
Statistics are the Gram matrix of the sampled input patches and their products with the
targets, in two halves (even and odd images) so that each conv's damping is chosen by held-out
error; memory for them grows with the sample, not with the pixels. The fitted bias goes into
the BatchNorm that follows the conv (its running mean), or into the conv's own bias; the
architecture and every shape stay the same, so nothing downstream (export, INT8 calibration,
fine-tuning) needs to know.
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
from tqdm import tqdm

from yoloprune.graphs.errors import PlanError

DEFAULT_IMAGES = 128  # calibration images
# Ridge strengths tried per conv (relative to the mean diagonal of its patch Gram matrix); the
# one with the least error on held-out samples is used.
DEFAULT_DAMPINGS = (0.001, 0.01, 0.1, 1.0, 10.0)
DEFAULT_SAMPLES = 16384  # output positions per conv, spread evenly over the images
BATCH = 16
MAX_DRAWS_PER_POSITION = 4  # sampled positions per image, at most this many per map position
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
        return self.spread(self.settings.images)

    def spread(self, count: int) -> list[Path]:
        """At most ``count`` of the source's images, evenly spread over it in a fixed order."""
        from yoloprune.compiler.quantize import Calibration

        return Calibration(self.folder, self.data, count).files

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
                    raise PlanError(
                        f"reconstruction handles convs of fewer than {_INDEX_BASE} channels, "
                        f"not {max(out, inner)}: compile with --no-reconstruct"
                    )
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
        plain = conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
        if not plain or (conv.groups > 1 and not target.depthwise):
            skipped.append(name)
            continue
        targets[name] = target
    return targets, skipped


def _positions(key: str, shape, count: int) -> tuple[torch.Tensor, ...]:
    """A fixed random sample of ``count`` output positions per image (image, row, column),
    the same for both models (drawn from ``key``)."""
    n, _, h, w = shape
    # drawn with replacement: beyond a few draws per position they add duplicates, not data
    count = min(count, MAX_DRAWS_PER_POSITION * h * w)
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    flat = torch.randint(h * w, (n, count), generator=generator).reshape(-1)
    images = torch.arange(n).repeat_interleave(count)
    return images, flat // w, flat % w


def _patches(x: torch.Tensor, conv: nn.Conv2d, where) -> torch.Tensor:
    """The input patch of each sampled output position, flattened as the weights are:
    (samples, in_channels * kh * kw); zero padding applied by masking (no padded copy)."""
    images, rows, cols = where
    kh, kw = conv.kernel_size
    (sh, sw), (dh, dw), (ph, pw) = conv.stride, conv.dilation, conv.padding
    h, w = x.shape[2:]
    r = rows[:, None] * sh - ph + torch.arange(kh)[None, :] * dh  # (S, kh)
    c = cols[:, None] * sw - pw + torch.arange(kw)[None, :] * dw  # (S, kw)
    inside = ((r >= 0) & (r < h))[:, :, None] & ((c >= 0) & (c < w))[:, None, :]
    picked = x[
        images[:, None, None], :, r.clamp(0, h - 1)[:, :, None], c.clamp(0, w - 1)[:, None, :]
    ]
    picked = picked * inside[..., None]  # (S, kh, kw, C)
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
        each damping."""
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
        eye = torch.eye(sums.gram.shape[0], dtype=torch.float64)
        solutions = {}
        # A Cholesky factorisation per damping: a few times cheaper than one eigh. The Gram is
        # summed in float32, so rounding can leave it slightly indefinite; eigh clamped such
        # eigenvalues to 0, Cholesky factors gram + damping as it is (the damping absorbs them;
        # the oneshot benchmark's mAP moved by at most 0.0003).
        for d in dampings:
            factor, info = torch.linalg.cholesky_ex(sums.gram + d * scale * eye)
            if info:  # not positive definite in floating point: the eigendecomposition's way
                return self._ridge_eigh(sums, dampings, prior, scale)
            solutions[d] = torch.cholesky_solve(sums.cross + d * scale * prior, factor)
        return solutions

    @staticmethod
    def _ridge_eigh(sums: _Sums, dampings, prior: torch.Tensor, scale) -> dict:
        """:meth:`ridge` through one eigendecomposition, negative eigenvalues (rounding)
        clamped to zero."""
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
    """One model's activations for all calibration images, one top-level layer at a time
    (``model.model`` with ``f`` and ``i`` per layer, as both YOLO families build it): only the
    outputs later layers read are kept, stored in float16 (computed in float32)."""

    def __init__(self, model: nn.Module, images: torch.Tensor) -> None:
        self.layers = list(model.model)
        self.save = set(model.save)
        self.current = images
        self.outputs: list = []
        self.offset = 0  # the first image of the chunk running now

    def inputs(self, index: int):
        source = self.layers[index].f
        if source == -1:
            return self.current
        if isinstance(source, int):
            return self.outputs[source]
        return [self.current if j == -1 else self.outputs[j] for j in source]

    def run(self, index: int, hooks: list, chunk: int | None = None) -> None:
        """Run layer ``index`` on every image (``chunk`` images at a time, or all at once)
        with ``hooks`` (module, "pre" | "post", hook)."""
        layer = self.layers[index]
        handles = [
            module.register_forward_pre_hook(hook)
            if kind == "pre"
            else module.register_forward_hook(hook)
            for module, kind, hook in hooks
        ]
        x = self.inputs(index)
        count = len(x[0] if isinstance(x, list) else x)
        step = count if chunk is None else chunk
        made = []
        try:
            for self.offset in range(0, count, step):
                part = _map(x, lambda t, o=self.offset: t[o : o + step].float())
                made.append(_map(layer(part), lambda t: t.to(STORAGE)))
        finally:
            for handle in handles:
                handle.remove()
        joined = None
        if all(isinstance(m, torch.Tensor) for m in made):  # one part: all images, no copy
            joined = made[0] if len(made) == 1 else torch.cat(made)
        self.current = joined
        self.outputs.append(joined if layer.i in self.save else None)

    def held_mib(self) -> float:
        held = [self.current, *self.outputs]
        tensors = {id(t): t for t in held if isinstance(t, torch.Tensor)}
        return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


STORAGE = torch.float16  # activations held between layers


def _map(x, function):
    """``function`` applied to a tensor, or to each tensor of a list or tuple."""
    if isinstance(x, torch.Tensor):
        return function(x)
    if isinstance(x, list | tuple):
        return type(x)(_map(item, function) for item in x)
    return x


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
    ``fixed`` modules are left as they are.

    Each top-level layer runs once on all images in each model: the original's keeps its
    convs' outputs at the sampled positions; in the pruned copy each conv is re-fitted just
    before it runs (a pre-forward hook), on inputs that the convs fitted before it produced."""
    chunks = list(batches)
    if not chunks or not sum(len(b) for b in chunks):
        raise PlanError("reconstruction got no calibration images")
    # channels-last convolutions run about 1.5x faster on CPU (oneDNN); the pruned model is
    # returned in the ordinary layout, the original is not touched (a copy runs)
    original = copy.deepcopy(original).eval().to(memory_format=torch.channels_last)
    pruned.eval().to(memory_format=torch.channels_last)
    try:
        return _reconstruct(original, pruned, kept, chunks, settings, fixed, progress)
    finally:
        pruned.to(memory_format=torch.contiguous_format)


def _reconstruct(original, pruned, kept, chunks, settings, fixed, progress) -> ReconstructRecord:
    start = time.perf_counter()
    images = torch.cat(chunks).contiguous(memory_format=torch.channels_last)
    count = len(images)
    fixed_ids = {id(c) for m in fixed for c in m.modules()}
    targets, skipped = _targets(original, pruned, kept, fixed_ids)
    per_image = max(1, -(-settings.samples // count))
    flows = _Flow(original, images), _Flow(pruned, images)
    last = len(flows[1].layers) - 1
    fits: dict[str, tuple] = {}
    peak = 0.0
    bar = tqdm(
        total=len(targets),
        desc="reconstruct",
        unit="conv",
        leave=False,
        disable=not progress or None,
    )
    with bar:
        for index in range(last + 1):
            here = {n: t for n, t in targets.items() if n.startswith(f"model.{index}.")}
            wanted: dict[str, list] = {n: [] for n in here}
            keepers = [
                _keeper(n, t, wanted, per_image, settings.seed, flows[0]) for n, t in here.items()
            ]
            flows[0].run(index, keepers, chunk=BATCH)
            wanted = {n: _joined(parts) for n, parts in wanted.items() if parts}
            ran = len(wanted)  # convs that do not run in eval mode are not fitted
            fitters = [
                _fitter(n, t, wanted, fits, settings, bar) for n, t in here.items() if n in wanted
            ]
            flows[1].run(index, fitters)
            peak = max(peak, flows[0].held_mib() + flows[1].held_mib())
            bar.update(len(here) - ran)
    head = [fits[n] for n in fits if n.startswith(f"model.{last}.")]
    chosen: dict[str, int] = {}
    for *_, damping in fits.values():
        key = "kept" if damping is None else f"{damping:g}"
        chosen[key] = chosen.get(key, 0) + 1
    return ReconstructRecord(
        images=count,
        convs_fitted=len(fits),
        convs_skipped=tuple(skipped),
        positions_per_image=per_image,
        dampings_chosen=dict(sorted(chosen.items())),
        seconds=time.perf_counter() - start,
        peak_activation_mib=peak,
        output_error_before=sum(e[0] for e in head) / max(1, len(head)),
        output_error_after=sum(e[1] for e in head) / max(1, len(head)),
    )


SAMPLE_CHUNK = 8192  # patches gathered at once


def _keeper(name: str, target: _Target, wanted: dict, per_image: int, seed: int, flow: _Flow):
    """A forward hook on the original conv: its outputs at the sampled positions, chunk by
    chunk (positions drawn per chunk of the fixed calibration order)."""

    def keep(_, __, output):
        where = _positions(f"{seed}:{name}:{flow.offset}", output.shape, per_image)
        images, rows, cols = where
        picked = output[images, :, rows, cols][:, target.out_index]
        wanted[name].append(((images + flow.offset, rows, cols), picked))

    return target.original, "post", keep


def _joined(parts: list) -> tuple:
    where = tuple(torch.cat([w[i] for w, _ in parts]) for i in range(3))
    return where, torch.cat([picked for _, picked in parts])


def _fitter(name: str, target: _Target, wanted: dict, fits: dict, settings, bar):
    """A pre-forward hook on the pruned conv: accumulate its normal equations on the inputs it
    is about to get (even and odd images apart), solve, and set its weights before it runs."""

    def fit(conv, args):
        where, picked = wanted.pop(name)
        normal = _Normal(target)
        images = where[0]
        for start in range(0, len(images), SAMPLE_CHUNK):
            part = slice(start, start + SAMPLE_CHUNK)
            chunk = tuple(t[part] for t in where)
            patches = _patches(args[0], conv, chunk)
            for half in (0, 1):
                mask = chunk[0] % 2 == half
                if mask.any():
                    normal.add(patches[mask], picked[part][mask], half)
        fits[name] = normal.solve(settings.dampings)
        bar.update()

    return target.pruned, "pre", fit


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

    refuse_beyond_memory(original, pruned, imgsz, len(reconstruction.files))
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


# Working memory of one unchunked layer of the pruned pass, in float32 copies of its output
# beyond the input's copy and the output itself (a C3's branches, concat, conversions).
# Calibrated on YOLOv5s at 640 with 256 images: estimate 17.1 GiB, measured peak RSS 13.7 GiB.
LAYER_WORK_COPIES = 3
BASE_BYTES = 1.5 * 2**30  # the interpreter, torch and both models


def _elements(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, list | tuple):
        return sum(_elements(t) for t in x)
    return 0


@torch.no_grad()
def memory_estimate(original: nn.Module, pruned: nn.Module, imgsz: int, images: int) -> float:
    """Bytes reconstruction needs for ``images`` calibration images at ``imgsz``, from a
    one-image probe of both models: per layer, the float16 activations both flows hold plus
    the pruned pass's float32 working set for all images at once; the images themselves; and
    the largest conv's float64 normal equations (:func:`normal_equation_bytes`)."""
    probe = torch.zeros(1, 3, imgsz, imgsz)
    flows = _Flow(copy.deepcopy(original).eval(), probe), _Flow(copy.deepcopy(pruned).eval(), probe)
    per_image = 0.0
    for index in range(len(flows[1].layers)):
        inputs = _elements(flows[1].inputs(index))
        for flow in flows:
            flow.run(index, [])
        outputs = _elements(flows[1].current) or inputs
        held = (flows[0].held_mib() + flows[1].held_mib()) * 2**20
        work = 4 * (inputs + (1 + LAYER_WORK_COPIES) * outputs)
        per_image = max(per_image, held + work)
    image_bytes = 2 * 4 * 3 * imgsz * imgsz  # the decoded batches and their concatenation
    return BASE_BYTES + normal_equation_bytes(pruned) + images * (per_image + image_bytes)


# float64 (features x features) matrices one conv's solve holds at once: the Gram sums of two
# halves and their total, the damped copy, its factor and the identity
NORMAL_EQUATION_COPIES = 6


def normal_equation_bytes(pruned: nn.Module) -> int:
    """The largest conv's least-squares working set, whatever the images: its Gram matrix
    over the kept input features (in channels x kernel area, plus the bias) in float64."""
    largest = 0
    for conv in pruned.modules():
        if isinstance(conv, nn.Conv2d):
            kh, kw = conv.kernel_size
            largest = max(largest, conv.in_channels // conv.groups * kh * kw + 1)
    return NORMAL_EQUATION_COPIES * 8 * largest**2


def available_bytes() -> float | None:
    """MemAvailable from /proc/meminfo (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def refuse_beyond_memory(original, pruned, imgsz: int, images: int) -> None:
    """A one-line refusal, before any image is decoded, where the estimate exceeds the memory
    available (rather than the process being killed half-way)."""
    available = available_bytes()
    if available is None:
        return
    need = memory_estimate(original, pruned, imgsz, images)
    if need <= available:
        return
    fixed = BASE_BYTES + normal_equation_bytes(pruned)  # whatever the number of images
    per_image = (need - fixed) / images
    fits = int((available - fixed) // per_image)
    hint = f"--reconstruct-images {fits}" if fits >= 1 else "a smaller --imgsz"
    raise PlanError(
        f"reconstruction on {images} images at {imgsz} px needs about {need / 2**30:.1f} GiB "
        f"and {available / 2**30:.1f} GiB is available: give {hint}, or --no-reconstruct"
    )


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
        key = f"{seed}:{convs[conv]}:{counter['batch']}"
        where = _positions(key, output.shape, OUTPUT_IMPORTANCE_POSITIONS)
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
