"""Safe loading of every model file: release checkpoints, our pruned checkpoints, and YAMLs.

A release ``.pt`` pickles its model (yolov5's ``models.yolo.DetectionModel``, ultralytics'
``ultralytics.nn.tasks.DetectionModel``). We never import that code: ``torch.load
(weights_only=True)`` runs with an allow-list in which every yolov5 / ultralytics / torch.nn
class the pickle may name is replaced by an inert stand-in record (:class:`PickledObject`) that
only stores its state. Any global outside the allow-list stops the load with a one-line error.
The model's family (:mod:`graphs.family`, chosen by the pickled class, a pruned checkpoint's
``family`` field or a package YAML name) rebuilds the network from the validated YAML and the
tensors; this module reads the files, the family builds the model.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from yoloprune.graphs.blocks import drop_blocks, dropped_blocks
from yoloprune.graphs.errors import CheckpointError, ModelError, first_line
from yoloprune.graphs.family import (
    families,
    family_for_name,
    family_for_pickled,
    family_named,
    family_of,
)
from yoloprune.graphs.files import atomic_path
from yoloprune.graphs.model_yaml import ACTIVATIONS, YOLOV5_COMMON
from yoloprune.graphs.yolov5 import DetectionModel

CFG_DIR = Path(__file__).parent / "cfg"
WEIGHTS_DIR = Path(__file__).parent / "weights"  # trained models shipped with the package
PRUNED_FORMAT = "yoloprune.v1"
DEFAULT_IMGSZ = 640
MIN_IMGSZ, MAX_IMGSZ = 32, 4096  # image sizes a checkpoint or the user may ask for

_YOLOV5_CLASSES = {
    "models.yolo": ("DetectionModel", "Model", "Detect"),
    "models.common": YOLOV5_COMMON,
}
# Ultralytics checkpoints (yolov8*.pt, yolo11*.pt, yolo26*.pt, yolov5*u.pt) pickle their modules;
# read as inert stand-ins, the YAML and tensors extracted, and the network rebuilt by the extra.
_ULTRALYTICS_BLOCKS = (
    "Attention",
    "Bottleneck",
    "C2f",
    "C2PSA",
    "C3",
    "C3k",
    "C3k2",
    "DFL",
    "PSABlock",
    "SPPF",
    "SPP",
    "A2C2f",
    "ABlock",
    "AAttn",
)
_ULTRALYTICS_CONVS = ("Conv", "DWConv", "Concat", "Focus", "RepConv", "Conv2", "LightConv")
_ULTRALYTICS_CLASSES = {
    "ultralytics.nn.tasks": ("DetectionModel",),
    "ultralytics.nn.modules.block": _ULTRALYTICS_BLOCKS,
    "ultralytics.nn.modules.conv": _ULTRALYTICS_CONVS,
    "ultralytics.nn.modules.head": ("Detect",),
    "ultralytics.utils": ("IterableSimpleNamespace",),
}
_TORCH_CLASSES = {
    "torch.nn.modules.conv": ("Conv2d",),
    "torch.nn.modules.batchnorm": ("BatchNorm2d",),
    "torch.nn.modules.activation": (
        "SiLU",
        "ReLU",
        "ReLU6",
        "LeakyReLU",
        "Hardswish",
        "Mish",
        "GELU",
        "Sigmoid",
    ),
    "torch.nn.modules.linear": ("Identity",),
    "torch.nn.modules.container": ("Sequential", "ModuleList"),
    "torch.nn.modules.pooling": ("MaxPool2d",),
    "torch.nn.modules.upsampling": ("Upsample",),
}
# numpy values appear in training metadata (best_fitness is an ndarray); they are kept opaque.
_NUMPY_CLASSES = {
    "numpy": ("ndarray", "dtype"),
    "numpy.dtypes": ("Float64DType", "Float32DType", "Int64DType"),
}
_NUMPY_FUNCTIONS = (
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
)


class PickledObject:
    """Inert stand-in for a class a pickle names: it records arguments and state, nothing else."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self._state = state

    @property
    def type_name(self) -> str:
        return self.qualname.rsplit(".", 1)[-1]

    def __repr__(self) -> str:
        return f"<pickled {self.qualname}>"


def _stand_in(qualname: str) -> type[PickledObject]:
    return type(qualname.rsplit(".", 1)[-1], (PickledObject,), {"qualname": qualname})


def _allow_list() -> list[tuple[Any, str]]:
    entries: list[tuple[Any, str]] = []
    for table in (_YOLOV5_CLASSES, _ULTRALYTICS_CLASSES, _TORCH_CLASSES, _NUMPY_CLASSES):
        for module, names in table.items():
            entries += [(_stand_in(f"{module}.{n}"), f"{module}.{n}") for n in names]
    opaque_value = _stand_in("numpy.opaque")
    entries.append((opaque_value, "numpy.opaque"))

    def opaque(*args: Any) -> PickledObject:
        return opaque_value(*args)

    entries += [(opaque, name) for name in _NUMPY_FUNCTIONS]
    return entries


MAX_INFLATION = 64  # a compressed entry may declare at most this many times its stored size


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` with weights_only and yolov5 stand-ins; errors become CheckpointError."""
    _check_checkpoint_magic(path)
    _check_declared_sizes(path)
    try:
        with torch.serialization.safe_globals(_allow_list()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        match = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"names {match.group(1)}" if match else "holds an object"
        raise CheckpointError(
            f"{path}: refused to load: the pickle {what}, which is not on yoloprune's allow-list "
            "of YOLOv5/ultralytics/torch classes; only load checkpoints you trust, re-saved by "
            "yolov5 or ultralytics"
        ) from exc
    except Exception as exc:  # anything else torch.load meets in a damaged file: one line
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(exc).__name__}: {first_line(exc)}); the file "
            "is truncated or corrupt, download or copy it again"
        ) from exc


# torch.save writes a zip archive (torch >= 1.6) or, before, a pickle (protocol 2+: 0x80)
CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")


def _check_checkpoint_magic(path: Path) -> None:
    """A file torch.save wrote, by its first bytes; anything else (a text file, an image, an
    empty file) is named as not a checkpoint, before the unpickler sees it."""
    with open(path, "rb") as file:
        head = file.read(4)
    if not head.startswith(CHECKPOINT_MAGIC):
        found = "empty" if not head else "neither a zip archive nor a pickle"
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint ({found}); MODEL is a .pt saved by yolov5, "
            "ultralytics or yoloprune, or a model .yaml"
        )


def _check_declared_sizes(path: Path) -> None:
    """Refuse a zip checkpoint whose entries declare far more bytes than they store, before
    anything is inflated (torch.save writes entries uncompressed; a deflate bomb does not)."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip (a legacy torch.save file): torch.load reads it or says why
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED and entry.file_size > MAX_INFLATION * max(
            entry.compress_size, 1
        ):
            raise CheckpointError(
                f"{path}: refused to load: entry {entry.filename!r:.80} declares "
                f"{entry.file_size:,} bytes from {entry.compress_size:,} compressed (a "
                "decompression bomb?); torch.save never writes that: re-save the checkpoint"
            )


@dataclass(frozen=True)
class ModelInfo:
    """What we know about a loaded model, beyond its modules."""

    family: str
    source: str
    nc: int
    names: tuple[str, ...]
    stride: tuple[float, ...]
    anchors: tuple[tuple[float, ...], ...]
    imgsz: int = DEFAULT_IMGSZ
    pretrained: bool = True
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return Path(self.source).name.rsplit(".", 1)[0]


def class_names(model: nn.Module) -> tuple[str, ...]:
    """A model's class names in class order, whether a list (yolov5) or a dict (ultralytics)."""
    names = getattr(model, "names", None) or ()
    if isinstance(names, dict):
        return tuple(str(names[k]) for k in sorted(names))
    return tuple(str(n) for n in names)


def describe(
    model: nn.Module,
    source: str,
    *,
    pretrained: bool,
    imgsz: int | None = None,
    meta: dict | None = None,
) -> ModelInfo:
    """What the report and the exports need to know about a model of any family."""
    family = family_of(model)
    head = family.detect_head(model)
    return ModelInfo(
        family=family.name,
        source=source,
        nc=int(head.nc),
        names=class_names(model),
        stride=tuple(float(s) for s in head.stride),
        anchors=family.anchors(model),
        imgsz=imgsz or DEFAULT_IMGSZ,
        pretrained=pretrained,
        meta=dict(meta or {}),
    )


# Deployment formats a MODEL cannot be (refused by name, before any byte is read)
EXPORTED_SUFFIXES = (".onnx", ".engine", ".plan", ".torchscript", ".tflite", ".mlmodel")


def resolve_source(spec: str | Path) -> Path:
    """A path on disk, or the name of a YAML we ship (``yolov5s.yaml``)."""
    path = Path(spec)
    if path.exists():
        if path.is_dir():
            raise CheckpointError(
                f"{path}: is a directory; MODEL must be a .pt checkpoint or a .yaml"
            )
        return path
    bundled = (CFG_DIR if path.suffix in (".yaml", ".yml") else WEIGHTS_DIR) / path.name
    if bundled.exists() and len(path.parts) == 1:
        return bundled
    if path.suffix in (".yaml", ".yml"):
        shipped = ", ".join(sorted(p.name for p in CFG_DIR.glob("*.yaml")))
        raise CheckpointError(f"{spec}: no such model YAML; shipped ones are: {shipped}")
    if len(path.parts) > 1:  # a path given: no shipped file is meant
        raise CheckpointError(
            f"{spec}: file not found; check the path (MODEL is a .pt checkpoint or a .yaml)"
        )
    raise CheckpointError(
        f"{spec}: file not found here or among the shipped weights; nothing is downloaded: "
        "put the checkpoint (a yolov5 or ultralytics release file, or your own) in this folder "
        "or give its path as MODEL"
    )


def load_model(spec: str | Path) -> tuple[DetectionModel, ModelInfo]:
    """Load MODEL (a yolov5 release .pt, a yoloprune .pt or a .yaml), fp32, eval mode."""
    suffix = Path(spec).suffix.lower()
    if suffix in EXPORTED_SUFFIXES:
        raise CheckpointError(
            f"{spec}: an exported {suffix} file holds no PyTorch modules to prune; MODEL is the "
            ".pt checkpoint it was exported from, or its .yaml"
        )
    named = family_for_name(spec)
    if named is not None:
        model = named.from_name(str(spec))
        return model, describe(model, str(spec), pretrained=False)
    path = resolve_source(spec)
    if path.suffix in (".yaml", ".yml"):
        with _errors_named(path):
            cfg = read_yaml(path)
            # Random init, but the same every time: plans and reports must be reproducible.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = DetectionModel(cfg)
        info = describe(model, str(spec), pretrained=False)
    else:
        with _errors_named(path):
            model, info = _load_checkpoint(path, str(spec))
    return model.float().eval(), info


@contextlib.contextmanager
def _errors_named(path: Path) -> Iterator[None]:
    """Every error of loading ``path`` names it, once."""
    try:
        yield
    except (CheckpointError, ModelError) as exc:
        if str(exc).startswith(str(path)):
            raise
        raise type(exc)(f"{path}: {exc}") from exc


MAX_YAML_BYTES = 1 << 20  # model definitions are a few kB


def read_yaml(path: Path) -> dict:
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ModelError(f"{path}: {path.stat().st_size:,} bytes is too large for a model YAML")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ModelError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(cfg, dict):
        raise ModelError(
            f"{path}: expected a YOLOv5 model definition (a mapping), got {type(cfg).__name__}"
        )
    return cfg


def _load_checkpoint(path: Path, source: str) -> tuple[DetectionModel, ModelInfo]:
    ckpt = safe_torch_load(path)
    if isinstance(ckpt, dict) and ckpt.get("format") == PRUNED_FORMAT:
        return _load_pruned(ckpt, path, source)
    pickled = None
    if isinstance(ckpt, dict):
        pickled = ckpt.get("ema") or ckpt.get("model")
    family = family_for_pickled(pickled.qualname) if isinstance(pickled, PickledObject) else None
    if family is None or pickled.type_name not in ("DetectionModel", "Model"):
        raise CheckpointError(
            f"{path}: not a YOLO checkpoint (expected a dict whose 'model' is a yolov5 or "
            "ultralytics DetectionModel, or a yoloprune pruned checkpoint); pass a .pt or a .yaml"
        )
    meta = {k: ckpt[k] for k in ("epoch", "date", "version") if isinstance(ckpt.get(k), (int, str))}
    model, imgsz = family.rebuild_release(pickled, ckpt, path)
    if imgsz is not None and not MIN_IMGSZ <= imgsz <= MAX_IMGSZ:
        raise CheckpointError(
            f"{path}: its train_args imgsz {imgsz} is not in [{MIN_IMGSZ}, {MAX_IMGSZ}]"
        )
    return model, describe(model, source, pretrained=True, imgsz=imgsz, meta=meta)


MAX_MODULE_DEPTH = 32  # nesting of pickled modules; real models nest fewer than 10 deep
# module paths walked: yolov5x and yolo11x have a few thousand; a pickle can reuse one record
# under two names at every level (its memo), which would make 2^depth paths
MAX_MODULE_PATHS = 100_000


def _pickled_modules(
    obj: PickledObject, prefix: str = "", depth: int = 0, walked: list | None = None
) -> Iterator[tuple[str, PickledObject]]:
    """Every module record under ``obj`` with its path; a pickle whose modules nest too deep
    (or in a cycle, which a pickle can express) or fan out into too many paths is refused."""
    walked = [0] if walked is None else walked
    walked[0] += 1
    if walked[0] > MAX_MODULE_PATHS:
        raise CheckpointError(
            f"the pickled model has more than {MAX_MODULE_PATHS:,} module paths (records "
            "reused under many names); not a YOLO checkpoint"
        )
    if depth > MAX_MODULE_DEPTH:
        raise CheckpointError(
            f"the pickled model nests modules more than {MAX_MODULE_DEPTH} deep (at {prefix!r:.80})"
            "; not a YOLO checkpoint"
        )
    yield prefix, obj
    children = getattr(obj, "_modules", None) or {}
    if not isinstance(children, dict):
        raise CheckpointError(f"the pickled module {prefix!r:.80} has malformed children")
    for name, child in children.items():
        if not isinstance(child, PickledObject | type(None)) or type(name) is not str:
            raise CheckpointError(f"the pickled module {prefix!r:.80} holds a non-module child")
        if child is not None:
            path = f"{prefix}.{name}" if prefix else name
            yield from _pickled_modules(child, path, depth + 1, walked)


def pickled_state(pickled: PickledObject) -> dict[str, torch.Tensor]:
    state = {}
    for path, module in _pickled_modules(pickled):
        non_persistent = getattr(module, "_non_persistent_buffers_set", set()) or set()
        tensors = {**(getattr(module, "_parameters", None) or {})}
        tensors.update(
            {
                k: v
                for k, v in (getattr(module, "_buffers", None) or {}).items()
                if k not in non_persistent
            }
        )
        for name, tensor in tensors.items():
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"the pickled {path}.{name} is not a tensor")
            state[f"{path}.{name}" if path else name] = tensor.detach().float()
    return state


def rebuild_release_model(pickled: PickledObject, path: Path) -> DetectionModel:
    """Rebuild a yolov5 DetectionModel from its stand-in record, reproducing its outputs."""
    cfg = getattr(pickled, "yaml", None)
    if not isinstance(cfg, dict):
        raise CheckpointError(
            f"{path}: the pickled model carries no 'yaml' dict; re-save it with yolov5"
        )
    try:
        model = DetectionModel(cfg)
    except ModelError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    by_path = dict(_pickled_modules(pickled))
    _copy_module_settings(model, by_path)
    state = pickled_state(pickled)
    detect_path = f"model.{len(model.model) - 1}"
    detect_stride = getattr(by_path.get(detect_path), "stride", None)
    if detect_stride is None:
        detect_stride = getattr(pickled, "stride", None)
    if isinstance(detect_stride, torch.Tensor):
        state.setdefault(f"{detect_path}.stride", detect_stride.float())
    state.pop(f"{detect_path}.anchor_grid", None)  # v5.0 kept a derived buffer; ours is computed
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (
            (missing and f"missing {missing[:3]}")
            or (unexpected and f"unexpected {unexpected[:3]}")
            or f"shape mismatch at {wrong[:3]}"
        )
        raise CheckpointError(
            f"{path}: tensors do not fit the architecture in its own YAML ({detail}); "
            "is it an unmodified yolov5 v5.0-v7.0 detection checkpoint?"
        )
    model.load_state_dict(state, strict=True)
    model.names = checked_class_names(getattr(pickled, "names", None), model.nc)
    model.stride = model.detect.stride
    return model


def _copy_module_settings(model: nn.Module, by_path: dict[str, PickledObject]) -> None:
    """Activations and BN eps come from the checkpoint, not from defaults."""
    for name, module in list(model.named_modules()):
        record = by_path.get(name)
        if record is None:
            continue
        if isinstance(module, nn.BatchNorm2d) and hasattr(record, "eps"):
            module.eps = _setting(record.eps, f"{name}.eps")
            if not 0 < module.eps < 1:
                raise CheckpointError(
                    f"the pickled model's {name}.eps {module.eps:g} is not in (0, 1)"
                )
        activation = f"nn.{record.type_name}"
        replaceable = f"nn.{type(module).__name__}" in ACTIVATIONS  # only an activation's slot
        if activation in ACTIVATIONS and replaceable and type(module).__name__ != record.type_name:
            slope = getattr(record, "negative_slope", None)
            args = [_setting(slope, f"{name}.negative_slope")] if slope is not None else []
            model.set_submodule(name, ACTIVATIONS[activation](*args))


def _setting(value: Any, where: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise CheckpointError(f"the pickled model's {where} is {value!r:.40}, not a number")
    return float(value)


def checked_class_names(names: Any, nc: int) -> list[str]:
    """A checkpoint's class names as a list of ``nc`` strings: from a list, or a dict keyed
    0..nc-1 (ultralytics); anything else (missing, wrong length, odd keys or values) gives the
    numbered names a model built from its YAML has."""
    numbered = isinstance(names, dict) and all(type(k) is int for k in names)
    if numbered and set(names) == set(range(len(names))):
        names = [names[k] for k in range(len(names))]
    fits = isinstance(names, list | tuple) and len(names) == nc
    if fits and all(type(n) in (str, int, float) for n in names):
        return [str(n) for n in names]
    return [str(i) for i in range(nc)]


# --- our own pruned checkpoints -------------------------------------------------------------


def save_pruned(
    model: DetectionModel,
    info: ModelInfo,
    path: Path,
    extra: dict | None = None,
    train_state: dict | None = None,
) -> None:
    """Write a self-describing checkpoint: plain containers and tensors only (weights_only safe).

    The architecture is the original YAML; channel counts come from the stored tensor shapes,
    so the file reloads without torch-pruning and without the plan.
    """
    payload = {
        "format": PRUNED_FORMAT,
        "family": info.family,
        "yaml": model.yaml,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "bn_eps": {n: m.eps for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)},
        "activations": {
            n: [type(m).__name__, getattr(m, "negative_slope", None)]
            for n, m in model.named_modules()
            if f"nn.{type(m).__name__}" in ACTIVATIONS and not isinstance(m, nn.Identity)
        },
        "names": list(info.names),
        "dropped_blocks": list(dropped_blocks(model)),  # residual blocks removed whole
        "imgsz": info.imgsz,
        "source": info.source,
        "pretrained": info.pretrained,
        "extra": dict(extra or {}),
    }
    if train_state is not None:  # optimizer/EMA state of a resumable fine-tune (last.pt)
        payload["train_state"] = train_state
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_pruned(ckpt: dict, path: Path, source: str) -> tuple[DetectionModel, ModelInfo]:
    ckpt = _checked_pruned(ckpt, path)
    family = family_named(ckpt["family"])
    try:
        model = family.rebuild(ckpt["yaml"], path)
    except ModelError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    state = ckpt["state_dict"]
    misfit = f"{path}: pruned checkpoint does not fit its YAML"
    try:
        drop_blocks(model, tuple(ckpt["dropped_blocks"]))
        shrink_to_state(model, state)
        for name, (kind, slope) in ckpt["activations"].items():
            args = [slope] if slope is not None else []
            model.get_submodule(name)  # the module must exist before it is replaced
            model.set_submodule(name, ACTIVATIONS[f"nn.{kind}"](*args))
        for name, eps in ckpt["bn_eps"].items():
            module = model.get_submodule(name)
            if not isinstance(module, nn.BatchNorm2d):
                raise ValueError(f"{name} is not a BatchNorm2d")
            module.eps = eps
        model.load_state_dict(state, strict=True)
        with torch.no_grad():  # channel counts must agree from layer to layer
            model.float().eval()(torch.zeros(1, 3, 64, 64))
    except (AttributeError, ValueError, RuntimeError, IndexError) as exc:
        raise CheckpointError(f"{misfit} ({first_line(exc)})") from exc
    family.adopt_names(model, ckpt["names"])
    info = describe(
        model,
        source,
        pretrained=ckpt["pretrained"],
        imgsz=ckpt["imgsz"],
        meta={"pruned": True, **ckpt["extra"]},
    )
    return model, info


def _checked_pruned(ckpt: dict, path: Path) -> dict:
    """The fields of a pruned checkpoint, each checked for its type (defaults where optional);
    the YAML is validated by the model's constructor, the tensors by loading them."""

    def fail(key: str, expected: str):
        raise CheckpointError(
            f"{path}: pruned checkpoint key {key!r}: expected {expected}; re-create it with "
            "`compile` (the file is damaged or was not written by yoloprune)"
        )

    def mapping(key: str, check, expected: str, required: bool = False) -> dict:
        value = ckpt.get(key, None if required else {})
        if type(value) is not dict or not all(
            type(k) is str and check(v) for k, v in value.items()
        ):
            fail(key, expected)
        return value

    def number(v) -> bool:
        return type(v) in (int, float) and math.isfinite(v)

    family = ckpt.get("family", "yolov5")  # files written before the key existed are yolov5
    if type(family) is not str or family not in families():
        fail("family", f"one of {', '.join(families())}")
    if type(ckpt.get("yaml")) is not dict:
        fail("yaml", "the model definition (a mapping)")
    checked = {
        "family": family,
        "yaml": ckpt["yaml"],
        "state_dict": mapping(
            "state_dict", lambda v: isinstance(v, torch.Tensor), "tensors by name", True
        ),
        "bn_eps": mapping("bn_eps", lambda v: number(v) and 0 < v < 1, "eps in (0, 1) by name"),
        "activations": mapping(
            "activations",
            lambda v: (
                type(v) in (list, tuple)
                and len(v) == 2
                and f"nn.{v[0]}" in ACTIVATIONS
                and (v[1] is None or number(v[1]))
            ),
            f"[activation, slope] by module name, activations among {', '.join(ACTIVATIONS)}",
        ),
        "extra": mapping("extra", lambda v: True, "a mapping"),
    }
    for key, kind, default in (
        ("names", list, []),
        ("dropped_blocks", list, []),
        ("pretrained", bool, True),
        ("source", str, ""),
    ):
        value = ckpt.get(key, default)
        if type(value) is not kind or (kind is list and not all(type(v) is str for v in value)):
            fail(key, f"a {kind.__name__}" + (" of strings" if kind is list else ""))
        checked[key] = value
    imgsz = ckpt.get("imgsz")
    if imgsz is not None and (type(imgsz) is not int or not MIN_IMGSZ <= imgsz <= MAX_IMGSZ):
        fail("imgsz", f"an image size in [{MIN_IMGSZ}, {MAX_IMGSZ}]")
    checked["imgsz"] = imgsz
    return checked


def shrink_to_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Resize convs and BNs in place so their shapes match ``state`` (a pruned state dict)."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Conv2d | nn.BatchNorm2d) and f"{prefix}weight" in state:
            dims = 4 if isinstance(module, nn.Conv2d) else 1
            if state[f"{prefix}weight"].dim() != dims:
                raise ValueError(f"{prefix}weight must have {dims} dimensions")
        if isinstance(module, nn.Conv2d) and f"{prefix}weight" in state:
            weight = state[f"{prefix}weight"]
            if module.groups > 1 and module.groups == module.in_channels:
                # depthwise (YOLO11/YOLO26 heads): pruning shrinks its groups with its channels
                multiplier = module.out_channels // module.groups
                module.groups = max(weight.shape[0] // multiplier, 1)
            module.out_channels = weight.shape[0]
            module.in_channels = weight.shape[1] * module.groups
            module.weight = nn.Parameter(torch.empty_like(weight))
            if module.bias is not None:
                module.bias = nn.Parameter(torch.empty(weight.shape[0]))
        elif isinstance(module, nn.BatchNorm2d) and f"{prefix}weight" in state:
            n = state[f"{prefix}weight"].shape[0]
            module.num_features = n
            module.weight = nn.Parameter(torch.empty(n))
            module.bias = nn.Parameter(torch.empty(n))
            module.running_mean = torch.zeros(n)
            module.running_var = torch.ones(n)
