"""Safe loading of YOLOv5 models: release checkpoints, our pruned checkpoints, and YAMLs.

A yolov5 release ``.pt`` pickles a ``models.yolo.DetectionModel`` from the yolov5 repository.
We never import that code: ``torch.load(weights_only=True)`` runs with an allow-list in which
every yolov5 / torch.nn class the pickle may name is replaced by an inert stand-in record
(:class:`PickledObject`) that only stores its state. The YAML, names, stride and tensors are
read from those records and the network is rebuilt with :mod:`graphs.yolov5`. Any global
outside the allow-list stops the load with a one-line error.
"""

from __future__ import annotations

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

from graphs.blocks import drop_blocks, dropped_blocks
from graphs.errors import CheckpointError, ModelError
from graphs.yolov5 import ACTIVATIONS, DetectionModel

CFG_DIR = Path(__file__).parent / "cfg"
WEIGHTS_DIR = Path(__file__).parent / "weights"  # trained models shipped with the package
PRUNED_FORMAT = "yoloprune.v1"
DEFAULT_IMGSZ = 640

_YOLOV5_CLASSES = {
    "models.yolo": ("DetectionModel", "Model", "Detect"),
    "models.common": (
        "Conv",
        "Focus",
        "Bottleneck",
        "BottleneckCSP",
        "C3",
        "SPP",
        "SPPF",
        "Concat",
    ),
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


def safe_torch_load(path: Path) -> Any:
    """``torch.load`` with weights_only and yolov5 stand-ins; errors become CheckpointError."""
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
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({first_line}); the file is truncated or corrupt, "
            "download or copy it again"
        ) from exc


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
    """What the report and the exports need to know about a yolov5 or ultralytics model."""
    from graphs import ultralytics_family

    if ultralytics_family.is_ultralytics_model(model):
        head = ultralytics_family.detect_head(model)
        family, anchors = "ultralytics", ()  # anchor-free
    else:
        head = model.detect
        pixel_anchors = (head.anchors * head.stride.view(-1, 1, 1)).view(head.nl, -1)
        family = "yolov5"
        anchors = tuple(tuple(round(float(v), 4) for v in row) for row in pixel_anchors)
    return ModelInfo(
        family=family,
        source=source,
        nc=int(head.nc),
        names=class_names(model),
        stride=tuple(float(s) for s in head.stride),
        anchors=anchors,
        imgsz=imgsz or DEFAULT_IMGSZ,
        pretrained=pretrained,
        meta=dict(meta or {}),
    )


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
    raise CheckpointError(
        f"{spec}: file not found; nothing is downloaded: get it from the ultralytics/yolov5 "
        f"releases page, put it at ./{path.name} (or anywhere) and pass MODEL=<its path>"
    )


def load_model(spec: str | Path) -> tuple[DetectionModel, ModelInfo]:
    """Load MODEL (a yolov5 release .pt, a yoloprune .pt or a .yaml), fp32, eval mode."""
    from graphs import ultralytics_family

    if ultralytics_family.is_ultralytics_name(spec):
        model, _ = ultralytics_family.build(str(spec))
        return model, describe(model, str(spec), pretrained=False)
    path = resolve_source(spec)
    if path.suffix in (".yaml", ".yml"):
        try:
            # Random init, but the same every time: plans and reports must be reproducible.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = DetectionModel(read_yaml(path))
        except ModelError as exc:
            raise ModelError(f"{path}: {exc}; fix the YAML or use a shipped one") from exc
        info = describe(model, str(spec), pretrained=False)
    else:
        model, info = _load_checkpoint(path, str(spec))
    return model.float().eval(), info


def read_yaml(path: Path) -> dict:
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
    if not isinstance(pickled, PickledObject) or pickled.type_name not in (
        "DetectionModel",
        "Model",
    ):
        raise CheckpointError(
            f"{path}: not a YOLO checkpoint (expected a dict whose 'model' is a yolov5 or "
            "ultralytics DetectionModel, or a yoloprune pruned checkpoint); pass a .pt or a .yaml"
        )
    meta = {k: ckpt[k] for k in ("epoch", "date", "version") if isinstance(ckpt.get(k), (int, str))}
    if pickled.qualname.startswith("ultralytics."):
        from graphs import ultralytics_family

        model = ultralytics_family.rebuild_release(pickled, _pickled_state(pickled), str(path))
        train_args = ckpt.get("train_args") if isinstance(ckpt.get("train_args"), dict) else {}
        imgsz = train_args.get("imgsz")
        imgsz = imgsz if isinstance(imgsz, int) else None
        return model, describe(model, source, pretrained=True, imgsz=imgsz, meta=meta)
    model = rebuild_release_model(pickled, path)
    return model, describe(model, source, pretrained=True, meta=meta)


def _pickled_modules(obj: PickledObject, prefix: str = "") -> Iterator[tuple[str, PickledObject]]:
    yield prefix, obj
    for name, child in (getattr(obj, "_modules", None) or {}).items():
        if child is not None:
            yield from _pickled_modules(child, f"{prefix}.{name}" if prefix else name)


def _pickled_state(pickled: PickledObject) -> dict[str, torch.Tensor]:
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
            if tensor is not None:
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
    state = _pickled_state(pickled)
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
    model.names = _class_names(getattr(pickled, "names", None), model.nc)
    model.stride = model.detect.stride
    return model


def _copy_module_settings(model: nn.Module, by_path: dict[str, PickledObject]) -> None:
    """Activations and BN eps come from the checkpoint, not from defaults."""
    for name, module in list(model.named_modules()):
        record = by_path.get(name)
        if record is None:
            continue
        if isinstance(module, nn.BatchNorm2d) and hasattr(record, "eps"):
            module.eps = float(record.eps)
        activation = f"nn.{record.type_name}"
        if activation in ACTIVATIONS and type(module).__name__ != record.type_name:
            args = [record.negative_slope] if hasattr(record, "negative_slope") else []
            model.set_submodule(name, ACTIVATIONS[activation](*args))


def _class_names(names: Any, nc: int) -> list[str]:
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    if isinstance(names, (list, tuple)) and len(names) == nc:
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
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _load_pruned(ckpt: dict, path: Path, source: str) -> tuple[DetectionModel, ModelInfo]:
    ultralytics = ckpt.get("family") == "ultralytics"
    if ultralytics:
        from graphs.ultralytics_family import rebuild

        model = rebuild(ckpt["yaml"])
    else:
        model = DetectionModel(ckpt["yaml"])
    state = ckpt["state_dict"]
    try:
        drop_blocks(model, tuple(ckpt.get("dropped_blocks", ())))
    except (AttributeError, ValueError) as exc:
        raise CheckpointError(f"{path}: pruned checkpoint does not fit its YAML ({exc})") from exc
    shrink_to_state(model, state)
    for name, (kind, slope) in ckpt.get("activations", {}).items():
        args = [slope] if slope is not None else []
        model.set_submodule(name, ACTIVATIONS[f"nn.{kind}"](*args))
    for name, eps in ckpt.get("bn_eps", {}).items():
        model.get_submodule(name).eps = eps
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: pruned checkpoint does not fit its YAML ({exc})") from exc
    names = list(ckpt.get("names") or ())
    if ultralytics:
        model.names = dict(enumerate(names))
    else:
        model.names = names or model.names
        model.stride = model.detect.stride
    info = describe(
        model,
        source,
        pretrained=bool(ckpt.get("pretrained", True)),
        imgsz=ckpt.get("imgsz"),
        meta={"pruned": True, **ckpt.get("extra", {})},
    )
    return model, info


def shrink_to_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Resize convs and BNs in place so their shapes match ``state`` (a pruned state dict)."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Conv2d) and f"{prefix}weight" in state:
            weight = state[f"{prefix}weight"]
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
