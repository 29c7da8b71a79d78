"""YOLO-format datasets: a data YAML (path/train/val/names) pointing at images and labels/*.txt.

Bad samples are counted and reported the way yolov5's val.py does, never fatal: a missing or
empty label file makes a background image; a corrupt image, or a label file with malformed rows,
out-of-range coordinates or unknown classes, drops the sample; duplicate rows are removed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from yoloprune.compiler.train.cache import SampleMemo
from yoloprune.graphs.errors import YoloPruneError
from yoloprune.graphs.model_yaml import MAX_CLASSES
from yoloprune.kernels.preprocess import IMAGE_SUFFIXES, letterbox, open_image

MAX_DATA_YAML_BYTES = 1 << 20


class DataError(YoloPruneError):
    """A data YAML or dataset folder is unusable as a whole."""


@dataclass(frozen=True)
class DataConfig:
    root: Path
    train: tuple[Path, ...]
    val: tuple[Path, ...]
    names: tuple[str, ...]

    @property
    def nc(self) -> int:
        return len(self.names)


def read_data_yaml(path: str | Path) -> DataConfig:
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: data YAML not found; pass --data path/to/data.yaml (`python -m "
            "yoloprune data` writes a synthetic one)"
        )
    if path.stat().st_size > MAX_DATA_YAML_BYTES:
        raise DataError(f"{path}: {path.stat().st_size:,} bytes is too large for a data YAML")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict) or "names" not in raw or "val" not in raw:
        raise DataError(f"{path}: a data YAML needs 'val' and 'names' (and 'train' to fine-tune)")
    folder = raw.get("path")
    if folder is not None and type(folder) is not str:
        raise DataError(f"{path}: 'path' must be a folder name, not {folder!r:.40}")
    root = Path(folder or path.parent)
    if not root.is_absolute():
        root = (path.parent / root).resolve()
    names = _class_names(raw["names"], path)

    def sources(key: str) -> tuple[Path, ...]:
        value = raw.get(key)
        if value is None:
            return ()
        items = value if isinstance(value, list) else [value]
        if not all(type(item) is str and item for item in items):
            raise DataError(f"{path}: '{key}' must be a folder or list file, or a list of them")
        found = tuple(p if p.is_absolute() else root / p for p in map(Path, items))
        for source in found:
            if not source.exists():
                raise DataError(
                    f"{path}: '{key}' names {source}, which does not exist; fix it in this "
                    "data YAML (a folder of images, a list file, or an image)"
                )
        return found

    return DataConfig(root, sources("train"), sources("val"), names)


def _class_names(names, path: Path) -> tuple[str, ...]:
    """Class names from a list, or from a dict keyed 0..nc-1 (yolov5 and ultralytics forms)."""
    if isinstance(names, dict):
        if not all(type(k) is int for k in names) or sorted(names) != list(range(len(names))):
            raise DataError(f"{path}: 'names' as a mapping must be keyed 0, 1, ... nc-1")
        names = [names[k] for k in range(len(names))]
    if not isinstance(names, list) or not 0 < len(names) <= MAX_CLASSES:
        raise DataError(f"{path}: 'names' must list 1 to {MAX_CLASSES} class names")
    if not all(type(n) in (str, int, float) for n in names):
        raise DataError(f"{path}: every class name must be a plain string")
    return tuple(str(n) for n in names)


def image_files(sources: tuple[Path, ...]) -> list[Path]:
    """Images under folders, or listed one per line in .txt files (yolov5 conventions), or
    image files themselves."""
    files: list[Path] = []
    for source in sources:
        source = Path(source)
        if source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:
            files.append(source)
        elif source.is_dir():
            files += sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif source.suffix == ".txt" and source.is_file():
            try:
                listed = source.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{source}: not a UTF-8 list of image paths ({exc.reason})"
                ) from exc
            for line in listed:
                if line.strip():
                    p = Path(line.strip())
                    files.append(p if p.is_absolute() else source.parent / p)
        else:
            raise DataError(f"{source}: no such image folder or list file; fix the data YAML")
    return files


def label_path(image: Path) -> Path:
    """yolov5's convention: .../images/x.jpg -> .../labels/x.txt."""
    parts = list(image.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


@dataclass
class SampleCheck:
    """What checking found across a split; ``messages`` name each bad file."""

    counts: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)

    def summary(self) -> str:
        keys = ("found", "missing", "empty", "corrupt", "duplicates")
        return ", ".join(f"{self.counts.get(k, 0)} {k}" for k in keys)


def _check_labels(path: Path, nc: int, check: SampleCheck) -> np.ndarray | None:
    """Rows (cls, xc, yc, w, h) normalised; None drops the sample as corrupt."""
    if not path.is_file():
        check.counts["missing"] += 1
        return np.zeros((0, 5), np.float32)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        check.counts["corrupt"] += 1
        check.messages.append(f"{path}: ignoring corrupt label file: not UTF-8 text")
        return None
    rows = [line.split() for line in text.splitlines() if line.strip()]
    if not rows:
        check.counts["empty"] += 1
        return np.zeros((0, 5), np.float32)
    problem = None
    if any(len(r) != 5 for r in rows):
        problem = "rows must have 5 columns (class xc yc w h)"
    else:
        try:
            labels = np.array(rows, dtype=np.float32)
        except ValueError:
            labels, problem = None, "non-numeric values"
        if problem is None:
            if not np.isfinite(labels).all():
                problem = "non-finite values (nan or inf)"
            elif (labels[:, 1:] < 0).any() or (labels[:, 1:] > 1).any():
                problem = "coordinates outside [0, 1] (labels must be normalised)"
            elif (
                (labels[:, 0] < 0).any()
                or (labels[:, 0] >= nc).any()
                or (labels[:, 0] % 1 != 0).any()
            ):
                problem = f"class ids must be integers in [0, {nc})"
    if problem:
        check.counts["corrupt"] += 1
        check.messages.append(f"{path}: ignoring corrupt label file: {problem}")
        return None
    check.counts["found"] += 1
    unique = np.unique(labels, axis=0)
    if len(unique) < len(labels):
        check.counts["duplicates"] += 1
        check.messages.append(f"{path}: {len(labels) - len(unique)} duplicate labels removed")
    return unique


def _check_image(path: Path, check: SampleCheck) -> tuple[int, int] | None:

    try:
        with open_image(path) as image:
            image.verify()
        with open_image(path) as image:
            width, height = image.size
    except Exception as exc:  # PIL raises many types for bad files; each is a corrupt sample
        check.counts["corrupt"] += 1
        check.messages.append(f"{path}: ignoring corrupt image: {type(exc).__name__}: {exc}")
        return None
    if width < 10 or height < 10:
        check.counts["corrupt"] += 1
        check.messages.append(f"{path}: ignoring image smaller than 10 px ({width}x{height})")
        return None
    return height, width


class YoloDataset(torch.utils.data.Dataset):
    """Letterboxed images and labels; ``augment`` adds flip, HSV and scale jitter (training)."""

    def __init__(
        self,
        sources: tuple[Path, ...],
        nc: int,
        imgsz: int,
        augment: bool = False,
        seed: int = 0,
        memo: SampleMemo | None = None,
        memo_kind: str = "val",
    ):
        """``memo`` keeps decoded, letterboxed samples (as uint8) between epochs when they do
        not change (no augmentation), under ``(memo_kind, index)``."""
        self.imgsz, self.augment, self.seed = imgsz, augment, seed
        self.memo = None if augment else memo
        self.memo_kind = memo_kind
        self.check = SampleCheck()
        self.files: list[Path] = []
        self.labels: list[np.ndarray] = []
        self.shapes: list[tuple[int, int]] = []
        files = image_files(sources)
        if not files:
            raise DataError(f"{', '.join(map(str, sources))}: no images found")
        for image in files:
            labels = _check_labels(label_path(image), nc, self.check)
            if labels is None:
                continue
            shape = _check_image(image, self.check)
            if shape is None:
                continue
            self.files.append(image)
            self.labels.append(labels)
            self.shapes.append(shape)
        if not self.files:
            raise DataError(f"{sources[0]}: every sample is corrupt ({self.check.summary()})")
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        key = (self.memo_kind, index)
        kept = self.memo.get(key) if self.memo is not None else None
        boxed, labels, ratio, pad = kept if kept is not None else self._letterboxed(index)
        if kept is None and self.memo is not None:
            self.memo.put(key, (boxed, labels, ratio, pad))
        meta = {
            "file": str(self.files[index]),
            "shape": self.shapes[index],
            "ratio": ratio,
            "pad": pad,
            "index": index,
        }
        return boxed.float() / 255, labels.clone(), meta

    def _letterboxed(self, index: int):
        """The letterboxed image (uint8, CHW), its labels normalised to it, the resize ratio
        and the (left, top) padding."""
        with open_image(self.files[index]) as image:
            pixels = np.asarray(image.convert("RGB"))
        labels = self.labels[index].copy()
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.augment else None
        if rng is not None:
            pixels, labels = _augment(pixels, labels, rng)
        boxed, ratio, (left, top) = letterbox(pixels, self.imgsz)
        h, w = pixels.shape[:2]
        out = labels.copy()
        if len(out):
            out[:, 1] = (labels[:, 1] * w * ratio + left) / self.imgsz
            out[:, 2] = (labels[:, 2] * h * ratio + top) / self.imgsz
            out[:, 3] = labels[:, 3] * w * ratio / self.imgsz
            out[:, 4] = labels[:, 4] * h * ratio / self.imgsz
        chw = torch.from_numpy(np.ascontiguousarray(boxed.transpose(2, 0, 1)))
        return chw, torch.from_numpy(out), ratio, (left, top)


def _augment(pixels: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
    """Horizontal flip, HSV jitter and a random zoom (crop or pad), boxes kept consistent."""
    from PIL import Image

    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
        if len(labels):
            labels = labels.copy()
            labels[:, 1] = 1 - labels[:, 1]
    hsv = np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).convert("HSV"))
    gains = rng.uniform(-1, 1, 3) * (0.015, 0.7, 0.4) + 1
    pixels = np.asarray(Image.fromarray(_hsv_jitter(hsv, gains), "HSV").convert("RGB"))
    scale = rng.uniform(0.7, 1.3)
    h, w = pixels.shape[:2]
    new_h, new_w = max(8, round(h * scale)), max(8, round(w * scale))
    resized = np.asarray(Image.fromarray(pixels).resize((new_w, new_h), Image.BILINEAR))
    canvas = np.full((h, w, 3), 114, np.uint8)
    # place the resized image at a random offset (negative = crop)
    off_x = int(rng.integers(min(0, w - new_w), max(0, w - new_w) + 1))
    off_y = int(rng.integers(min(0, h - new_h), max(0, h - new_h) + 1))
    src_x0, src_y0 = max(0, -off_x), max(0, -off_y)
    dst_x0, dst_y0 = max(0, off_x), max(0, off_y)
    cw, ch = min(new_w - src_x0, w - dst_x0), min(new_h - src_y0, h - dst_y0)
    canvas[dst_y0 : dst_y0 + ch, dst_x0 : dst_x0 + cw] = resized[
        src_y0 : src_y0 + ch, src_x0 : src_x0 + cw
    ]
    if not len(labels):
        return canvas, labels
    x0 = (labels[:, 1] - labels[:, 3] / 2) * new_w + off_x
    x1 = (labels[:, 1] + labels[:, 3] / 2) * new_w + off_x
    y0 = (labels[:, 2] - labels[:, 4] / 2) * new_h + off_y
    y1 = (labels[:, 2] + labels[:, 4] / 2) * new_h + off_y
    cx0, cx1, cy0, cy1 = x0.clip(0, w), x1.clip(0, w), y0.clip(0, h), y1.clip(0, h)
    area_kept = (cx1 - cx0) * (cy1 - cy0) / np.maximum((x1 - x0) * (y1 - y0), 1e-9)
    keep = (area_kept > 0.4) & (cx1 - cx0 > 2) & (cy1 - cy0 > 2)
    out = np.stack(
        [labels[:, 0], (cx0 + cx1) / 2 / w, (cy0 + cy1) / 2 / h, (cx1 - cx0) / w, (cy1 - cy0) / h],
        1,
    )[keep]
    return canvas, out.astype(np.float32)


def _hsv_jitter(hsv: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """Hue scaled modulo 256, saturation and value scaled and clipped: one lookup table per
    channel (the per-pixel float arithmetic cost about 2 ms an image; same values)."""
    levels = np.arange(256, dtype=np.float32)
    tables = (
        ((levels * gains[0]) % 256).astype(np.float32).astype(np.uint8),
        np.clip(levels * gains[1], 0, 255).astype(np.float32).astype(np.uint8),
        np.clip(levels * gains[2], 0, 255).astype(np.float32).astype(np.uint8),
    )
    return np.stack([table[hsv[..., c]] for c, table in enumerate(tables)], axis=-1)


def collate(batch):
    """Images (B,3,S,S); targets (N,6) = (image index, class, xc, yc, w, h) normalised; metas."""
    images, labels, metas = zip(*batch, strict=True)
    targets = [
        torch.cat([torch.full((len(lb), 1), i, dtype=torch.float32), lb], 1)
        for i, lb in enumerate(labels)
    ]
    return torch.stack(images), torch.cat(targets) if targets else torch.zeros(0, 6), list(metas)


def loader(
    dataset: YoloDataset, batch: int, shuffle: bool = False, workers: int = 0, seed: int = 0
) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate,
        generator=generator,
        drop_last=False,
    )
