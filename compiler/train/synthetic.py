"""A synthetic detection dataset, generated in code, in the YOLO format users already have.

Shapes of several classes with varied scale, aspect, colour and overlap on cluttered
backgrounds (gradients, noise, distractor strokes). Every image depends only on (seed, split,
index), so any subset regenerates identically. No public dataset can be downloaded here; this is
the project's test bed for accuracy.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

CLASSES = ("circle", "rectangle", "triangle", "cross", "ring", "diamond")
MIN_VISIBLE = 0.35  # fraction of an object's pixels that must stay visible to be labelled


@dataclass(frozen=True)
class SyntheticSpec:
    train: int = 2000
    val: int = 300
    imgsz: int = 256
    seed: int = 0
    max_objects: int = 6


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0 if split == "train" else 1, index])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Linear gradient + coloured noise: never a flat colour, so shapes must be recognised."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    low, high = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    image = low + (high - low) * ramp[..., None]
    image += rng.normal(0, rng.uniform(4, 20), (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _colour(rng: np.random.Generator, background: np.ndarray, box) -> tuple[int, int, int]:
    """A colour that differs from the background under the box by a visible margin."""
    x0, y0, x1, y1 = (int(v) for v in box)
    patch = background[max(y0, 0) : max(y1, 1), max(x0, 0) : max(x1, 1)]
    mean = patch.reshape(-1, 3).mean(0) if patch.size else np.full(3, 128.0)
    for _ in range(20):
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - mean).sum() > 150:
            break
    return tuple(int(c) for c in colour)


def _shape_points(kind: str, cx: float, cy: float, w: float, h: float, rotation: float):
    if kind == "triangle":
        pts = [(0.0, -0.5), (0.5, 0.5), (-0.5, 0.5)]
    elif kind == "diamond":
        pts = [(0.0, -0.5), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0)]
    elif kind == "cross":
        a = 0.17
        pts = [
            (-a, -0.5),
            (a, -0.5),
            (a, -a),
            (0.5, -a),
            (0.5, a),
            (a, a),
            (a, 0.5),
            (-a, 0.5),
            (-a, a),
            (-0.5, a),
            (-0.5, -a),
            (-a, -a),
        ]
    else:
        raise ValueError(kind)
    cos, sin = math.cos(rotation), math.sin(rotation)
    return [
        (cx + (x * w) * cos - (y * h) * sin, cy + (x * w) * sin + (y * h) * cos) for x, y in pts
    ]


def _draw(draw, kind: str, cx, cy, w, h, rotation, colour, width_px: int):
    """Draw one object with ``draw`` (an image or a mask)."""
    if kind in ("circle", "ring"):
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        if kind == "circle":
            draw.ellipse(box, fill=colour)
        else:
            draw.ellipse(box, outline=colour, width=width_px)
        return
    if kind == "rectangle":
        points = [
            (cx - w / 2, cy - h / 2),
            (cx + w / 2, cy - h / 2),
            (cx + w / 2, cy + h / 2),
            (cx - w / 2, cy + h / 2),
        ]
        cos, sin = math.cos(rotation), math.sin(rotation)
        points = [
            (cx + (x - cx) * cos - (y - cy) * sin, cy + (x - cx) * sin + (y - cy) * cos)
            for x, y in points
        ]
    else:
        points = _shape_points(kind, cx, cy, w, h, rotation)
    draw.polygon(points, fill=colour)


def render(spec: SyntheticSpec, split: str, index: int):
    """One image (H, W, 3 uint8) and its labels [(cls, xc, yc, w, h) normalised].

    Occlusion is resolved per pixel: an object keeps its label while at least
    ``MIN_VISIBLE`` of its pixels stay visible, boxed to its visible extent.
    """
    from PIL import Image, ImageDraw

    rng = _rng(spec.seed, split, index)
    size = spec.imgsz
    background = _background(rng, size)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 6)):  # distractor strokes: clutter, not objects
        points = rng.uniform(0, size, 4).tolist()
        draw.line(
            points,
            fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
            width=int(rng.integers(1, 4)),
        )
    owner = np.full((size, size), -1, dtype=np.int16)  # which object each pixel shows
    objects = []
    for _ in range(rng.integers(1, spec.max_objects + 1)):
        kind_id = int(rng.integers(0, len(CLASSES)))
        kind = CLASSES[kind_id]
        scale = size * rng.uniform(0.08, 0.45)
        aspect = rng.uniform(0.6, 1.6) if kind in ("rectangle", "circle", "diamond") else 1.0
        w, h = scale * math.sqrt(aspect), scale / math.sqrt(aspect)
        cx, cy = rng.uniform(w / 3, size - w / 3), rng.uniform(h / 3, size - h / 3)
        rotation = rng.uniform(-0.5, 0.5) if kind != "ring" else 0.0
        colour = _colour(rng, background, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
        geometry = (kind, cx, cy, w, h, rotation)
        _draw(draw, *geometry, colour, max(2, int(scale / 8)))
        mask_image = Image.new("1", (size, size), 0)
        _draw(ImageDraw.Draw(mask_image), *geometry, 1, max(2, int(scale / 8)))
        mask = np.asarray(mask_image, dtype=bool)
        owner[mask] = len(objects)
        objects.append((kind_id, int(mask.sum())))
    labels = []
    for i, (kind_id, area) in enumerate(objects):
        ys, xs = np.nonzero(owner == i)
        if area == 0 or len(xs) < MIN_VISIBLE * area or len(xs) < 16:
            continue
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        labels.append(
            (
                kind_id,
                (x0 + x1) / 2 / size,
                (y0 + y1) / 2 / size,
                (x1 - x0) / size,
                (y1 - y0) / size,
            )
        )
    return np.asarray(image), labels


# PNG compression level: 1 encodes the noisy backgrounds several times faster than PIL's
# default 6 for files about 6 % larger; the pixels are the same.
PNG_COMPRESS_LEVEL = 1
# With workers, splits at least this large are rendered in worker processes; smaller ones
# (the tests') are not worth the processes' start-up.
PARALLEL_FROM = 256


def _write_samples(staging: Path, spec: SyntheticSpec, split: str, indices: range) -> int:
    """Render and write images and labels ``indices`` of ``split``; returns how many."""
    from PIL import Image

    for index in indices:
        image, labels = render(spec, split, index)
        stem = f"{index:06d}"
        Image.fromarray(image).save(
            staging / "images" / split / f"{stem}.png", compress_level=PNG_COMPRESS_LEVEL
        )
        (staging / "labels" / split / f"{stem}.txt").write_text(
            "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in labels)
        )
    return len(indices)


def available_cores() -> int:
    """The cores this process may run on (its affinity, where the system reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _chunks(count: int, size: int) -> list[range]:
    return [range(i, min(i + size, count)) for i in range(0, count, size)]


def _write_split(
    staging: Path, spec: SyntheticSpec, split: str, count: int, workers: int, bar
) -> None:
    """Every sample of ``split``: in ``workers`` spawned processes for large splits (each image
    depends only on (seed, split, index), so the files are the same however the work is
    divided). Spawned workers import the caller's main module: a script calling this with
    workers > 1 needs an ``if __name__ == "__main__":`` guard."""
    if count < PARALLEL_FROM or workers < 2:
        for chunk in _chunks(count, 1):
            bar.update(_write_samples(staging, spec, split, chunk))
        return
    context = multiprocessing.get_context("spawn")  # never fork a process holding torch threads
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        jobs = [pool.submit(_write_samples, staging, spec, split, c) for c in _chunks(count, 32)]
        try:
            for job in as_completed(jobs):
                bar.update(job.result())
        except BaseException:
            pool.shutdown(cancel_futures=True)  # a failed or interrupted split stops at once
            raise


DATASET_ENTRIES = {"data.yaml", "images", "labels"}


def _refuse_foreign_folder(root: Path) -> None:
    """``root`` may be new, empty, or an earlier dataset of :func:`generate` (replaced whole);
    anything else is refused before any work, never deleted."""
    from yoloprune.compiler.train.data import DataError  # imports torch: not in the workers

    if root.exists() and not root.is_dir():
        raise DataError(f"--out {root}: is a file; the dataset is written to a folder")
    if not root.is_dir() or not any(root.iterdir()):
        return
    entries = {p.name for p in root.iterdir()}
    earlier = entries <= DATASET_ENTRIES and _is_synthetic(root / "data.yaml")
    if not earlier:
        raise DataError(
            f"--out {root}: holds files that are not an earlier synthetic dataset (it would be "
            "replaced whole); give a new or empty folder"
        )


def _is_synthetic(path: Path) -> bool:
    """Whether ``path`` is the data.yaml :func:`generate` writes (its ``synthetic`` record)."""
    if not path.is_file() or path.stat().st_size > 1 << 16:
        return False
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("synthetic"), dict)


def generate(
    root: Path, spec: SyntheticSpec | None = None, progress: bool = True, workers: int = 1
) -> Path:
    """Write ``root/{images,labels}/{train,val}`` and ``root/data.yaml``; return the YAML path.
    ``workers`` > 1 renders large splits in that many processes (see :func:`_write_split`;
    ``python -m yoloprune data`` uses one per available core).

    Written to a temporary sibling folder and renamed, so a half-written dataset never exists.
    """
    from tqdm import tqdm

    spec = spec or SyntheticSpec()
    root = Path(root)
    _refuse_foreign_folder(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for split, count in (("train", spec.train), ("val", spec.val)):
            (staging / "images" / split).mkdir(parents=True)
            (staging / "labels" / split).mkdir(parents=True)
            with tqdm(total=count, desc=f"synthetic {split}", disable=not progress or None) as bar:
                _write_split(staging, spec, split, count, workers, bar)
        data = {
            "path": str(root.resolve()),
            "train": "images/train",
            "val": "images/val",
            "names": dict(enumerate(CLASSES)),
            "synthetic": {
                "seed": spec.seed,
                "imgsz": spec.imgsz,
                "train": spec.train,
                "val": spec.val,
            },
        }
        (staging / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root / "data.yaml"
