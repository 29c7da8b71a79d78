"""Model families behind one interface, registered by name: everything that differs between
yolov5 and the ultralytics detectors (YOLOv8, YOLO11, YOLO26) is answered here, so the passes
ask ``family_of(model)`` instead of branching on the family themselves.

A family says how its models are loaded (a package YAML name, a release checkpoint's pickled
model, a pruned checkpoint's YAML), what tracing must keep (head and protected convs, the
tensors to trace through, split halves to tie), how the model is deployed (head form, output
layout, the ONNX metadata its own exporter writes) and whether a file in its own native format
can be written beside ours. Lookups register the built-in families on first use (no side
effects at import); ``register`` adds another, as onnx-graphsurgeon's ``Graph.register`` does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from yoloprune.graphs.errors import ModelError

# How output0 of each exported form is laid out (the ONNX records its own in ``layout``).
OUTPUT_LAYOUTS = {
    "yolov5": "(batch, anchors, 5 + nc): cx, cy, w, h in input pixels, objectness, class scores "
    "(sigmoid applied); NMS not included",
    "anchor_free": "(batch, 4 + nc, anchors): cx, cy, w, h in input pixels, then class scores "
    "(sigmoid applied), no objectness; NMS not included",
    "end2end": "(batch, max_det, 6): x1, y1, x2, y2 in input pixels, score, class; the "
    "one-to-one head needs no NMS",
}
ATTENTION_REASON = "inside an attention block (channels reshaped into heads)"


class ModelFamily(ABC):
    """One family of detectors. Stateless: one registered instance per family."""

    name: ClassVar[str]
    raw_layout: ClassVar[str]  # output0 of a raw export: "yolov5" or "anchor_free"
    native_suffix: ClassVar[str | None] = None  # file the family's own tools load, if written

    @abstractmethod
    def owns(self, model: nn.Module) -> bool:
        """Whether ``model`` (as loaded or rebuilt by yoloprune) belongs to this family."""

    def owns_name(self, spec: str | Path) -> bool:
        """Whether ``spec`` names one of the family's package YAMLs (``yolov8n.yaml``)."""
        return False

    @abstractmethod
    def owns_pickled(self, qualname: str) -> bool:
        """Whether a release checkpoint whose model pickles as ``qualname`` is this family's."""

    def from_name(self, spec: str) -> nn.Module:
        raise ModelError(f"{spec}: {self.name} models are not built from a package name")

    @abstractmethod
    def rebuild_release(self, pickled, ckpt: dict, path: Path) -> tuple[nn.Module, int | None]:
        """The model of a release checkpoint's stand-in record (no pickle code ran), and the
        image size it was trained at where the checkpoint records one."""

    @abstractmethod
    def rebuild(self, cfg: dict, path: Path) -> nn.Module:
        """The unpruned architecture of a pruned checkpoint's YAML (tensors loaded after)."""

    def adopt_names(self, model: nn.Module, names: list[str]) -> None:
        """Set the class names a pruned checkpoint stored, in the family's own container."""
        model.names = list(names) or model.names

    @abstractmethod
    def detect_head(self, model: nn.Module) -> nn.Module: ...

    def anchors(self, model: nn.Module) -> tuple[tuple[float, ...], ...]:
        """Anchors in pixels per level; () for anchor-free heads."""
        return ()

    @abstractmethod
    def head_convs(self, model: nn.Module) -> list[nn.Conv2d]:
        """The head's output convs: their outputs are the model interface, never pruned."""

    def protected_convs(self, model: nn.Module) -> dict[nn.Conv2d, str]:
        """Convs whose output channels are never pruned, with the reason."""
        return {conv: "detection head output (model interface)" for conv in self.head_convs(model)}

    @abstractmethod
    def trace_outputs(self, out: Any) -> list:
        """What tracing back-propagates through, from the model's eval-mode output."""

    def split_halves(self, model: nn.Module) -> list[tuple[str, str, tuple[str, str]]]:
        """(block, class, (first-half conv, second-half conv)) of blocks whose native class
        needs equal halves; none by default."""
        return []

    def end2end_capable(self, model: nn.Module) -> bool:
        """Whether the head has an NMS-free one-to-one branch (exportable end to end)."""
        return False

    def undeployed_convs(self, model: nn.Module, mode: str) -> set[str]:
        """Names of the convs an export in ``mode`` leaves out of the graph (a head branch
        used in training only); none by default."""
        return set()

    def unquantized(self, model: nn.Module) -> list[nn.Module]:
        """Modules INT8 quantization leaves in float (fixed arithmetic, not learned features)."""
        return []

    @abstractmethod
    def deploy(self, model: nn.Module, mode: str, runtime_forms: bool) -> nn.Module:
        """Set, in place on a copy, the head's export form for ``mode`` (output0 only);
        ``runtime_forms`` swaps in faster modules with the same values."""

    def export_metadata(self, base: dict, mode: str, imgsz: int, dynamic: bool) -> dict:
        """ONNX metadata as the family's own exporter writes it, from ``base`` (stride, names
        as Python literals)."""
        return {**base, "imgsz": str([imgsz, imgsz])}

    def save_native(self, model: nn.Module, names, imgsz: int, path: Path) -> list[str]:
        """Write ``path`` in the family's own format; returns blocks that still need
        yoloprune to load."""
        raise NotImplementedError(f"{self.name} models have no native format yoloprune writes")


class Yolov5Family(ModelFamily):
    name = "yolov5"
    raw_layout = "yolov5"

    def owns(self, model: nn.Module) -> bool:
        from yoloprune.graphs.yolov5 import DetectionModel

        return isinstance(model, DetectionModel)

    def owns_pickled(self, qualname: str) -> bool:
        return qualname.startswith("models.yolo.")

    def rebuild_release(self, pickled, ckpt: dict, path: Path) -> tuple[nn.Module, int | None]:
        from yoloprune.graphs.checkpoint import rebuild_release_model

        return rebuild_release_model(pickled, path), None

    def rebuild(self, cfg: dict, path: Path) -> nn.Module:
        from yoloprune.graphs.yolov5 import DetectionModel

        return DetectionModel(cfg)

    def adopt_names(self, model: nn.Module, names: list[str]) -> None:
        super().adopt_names(model, names)
        model.stride = model.detect.stride

    def detect_head(self, model: nn.Module) -> nn.Module:
        return model.detect

    def anchors(self, model: nn.Module) -> tuple[tuple[float, ...], ...]:
        head = model.detect
        pixels = (head.anchors * head.stride.view(-1, 1, 1)).view(head.nl, -1)
        return tuple(tuple(round(float(v), 4) for v in row) for row in pixels)

    def head_convs(self, model: nn.Module) -> list[nn.Conv2d]:
        return list(model.detect.m)

    def trace_outputs(self, out: Any) -> list:
        return out[1]  # eval mode returns (decoded, raw per-level maps)

    def deploy(self, model: nn.Module, mode: str, runtime_forms: bool) -> nn.Module:
        model.detect.export = True  # output0 only: (batch, anchors, 5 + nc), as yolov5 exports
        return model


class UltralyticsFamily(ModelFamily):
    name = "ultralytics"
    raw_layout = "anchor_free"
    native_suffix = "-pruned-ultralytics.pt"

    def owns(self, model: nn.Module) -> bool:
        return type(model).__module__.startswith("ultralytics.")

    def owns_name(self, spec: str | Path) -> bool:
        from yoloprune.graphs import ultralytics_family

        return ultralytics_family.is_ultralytics_name(spec)

    def owns_pickled(self, qualname: str) -> bool:
        return qualname.startswith("ultralytics.")

    def from_name(self, spec: str) -> nn.Module:
        from yoloprune.graphs import ultralytics_family

        return ultralytics_family.build(spec)[0]

    def rebuild_release(self, pickled, ckpt: dict, path: Path) -> tuple[nn.Module, int | None]:
        from yoloprune.graphs import ultralytics_family
        from yoloprune.graphs.checkpoint import pickled_state

        model = ultralytics_family.rebuild_release(pickled, pickled_state(pickled), str(path))
        train_args = ckpt.get("train_args") if isinstance(ckpt.get("train_args"), dict) else {}
        imgsz = train_args.get("imgsz")
        return model, imgsz if type(imgsz) is int else None  # a list or missing: the default

    def rebuild(self, cfg: dict, path: Path) -> nn.Module:
        from yoloprune.graphs import ultralytics_family

        return ultralytics_family.rebuild(cfg, str(path))

    def adopt_names(self, model: nn.Module, names: list[str]) -> None:
        model.names = dict(enumerate(names))

    def detect_head(self, model: nn.Module) -> nn.Module:
        return model.model[-1]

    def head_convs(self, model: nn.Module) -> list[nn.Conv2d]:
        from yoloprune.graphs import ultralytics_family

        return ultralytics_family.head_convs(model)

    def protected_convs(self, model: nn.Module) -> dict[nn.Conv2d, str]:
        from yoloprune.graphs import ultralytics_family

        protected = super().protected_convs(model)
        for conv in ultralytics_family.attention_convs(model):
            protected[conv] = ATTENTION_REASON
        return protected

    def trace_outputs(self, out: Any) -> list:
        from yoloprune.graphs import ultralytics_family

        return ultralytics_family.trace_outputs(out)

    def split_halves(self, model: nn.Module) -> list[tuple[str, str, tuple[str, str]]]:
        from yoloprune.graphs import ultralytics_family

        return ultralytics_family.split_halves(model)

    def end2end_capable(self, model: nn.Module) -> bool:
        from yoloprune.graphs import ultralytics_family

        return ultralytics_family.has_one2one(model)

    def undeployed_convs(self, model: nn.Module, mode: str) -> set[str]:
        """A head with a one-to-one branch (YOLO26) exports one branch: end to end the
        one-to-one, raw the one-to-many; the other trains only."""
        from yoloprune.graphs import ultralytics_family

        if not self.end2end_capable(model):
            return set()
        return ultralytics_family.branch_convs(model, one2one=mode != "end2end")

    def unquantized(self, model: nn.Module) -> list[nn.Module]:
        """The DFL: a fixed 1x1 conv with the bin values 0..reg_max-1 as weights, taking
        probabilities (an expectation, not a feature map; TensorRT fuses it as float)."""
        dfl = getattr(self.detect_head(model), "dfl", None)
        return [dfl] if isinstance(dfl, nn.Module) and not isinstance(dfl, nn.Identity) else []

    def deploy(self, model: nn.Module, mode: str, runtime_forms: bool) -> nn.Module:
        from yoloprune.graphs import ultralytics_family

        if runtime_forms:
            ultralytics_family.for_deployment(model)
        head = self.detect_head(model)
        head.export, head.format = True, "onnx"
        if self.end2end_capable(model):
            head.end2end = mode == "end2end"
        return model

    def export_metadata(self, base: dict, mode: str, imgsz: int, dynamic: bool) -> dict:
        """ultralytics' AutoBackend also reads ``imgsz``, ``batch``, ``task``, ``channels`` and
        ``end2end`` (True: output0 is already (batch, k, 6) boxes, no NMS)."""
        import ultralytics

        return {
            "description": "yoloprune pruned Ultralytics YOLO model",
            "author": "yoloprune",
            "version": ultralytics.__version__,
            "license": "AGPL-3.0 (https://ultralytics.com/license)",
            **base,
            "task": "detect",
            "batch": "1" if not dynamic else "-1",
            "imgsz": str([imgsz, imgsz]),
            "channels": "3",
            "end2end": str(mode == "end2end"),
        }

    def save_native(self, model: nn.Module, names, imgsz: int, path: Path) -> list[str]:
        from yoloprune.graphs import ultralytics_family

        return ultralytics_family.save_for_ultralytics(model, names, imgsz, path)


_REGISTRY: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    """Add ``family`` (an instance) under its name; a name is registered once (the built-in
    names included)."""
    if not isinstance(family, ModelFamily):
        raise TypeError(f"register a ModelFamily instance, not {type(family).__name__}")
    _with_builtins()
    if family.name in _REGISTRY and type(_REGISTRY[family.name]) is not type(family):
        raise ValueError(f"model family {family.name!r} is already registered")
    _REGISTRY[family.name] = family
    return family


def _with_builtins() -> dict[str, ModelFamily]:
    for family in (Yolov5Family(), UltralyticsFamily()):
        _REGISTRY.setdefault(family.name, family)
    return _REGISTRY


def families() -> dict[str, ModelFamily]:
    """The registered families by name (the built-in ones first)."""
    return dict(_with_builtins())


def family_named(name: str) -> ModelFamily:
    known = families()
    if name not in known:
        raise ModelError(f"unknown model family {name!r}: expected one of {', '.join(known)}")
    return known[name]


def family_of(model: nn.Module) -> ModelFamily:
    for family in families().values():
        if family.owns(model):
            return family
    raise ModelError(
        f"{type(model).__module__}.{type(model).__name__} is not a model of any family "
        f"yoloprune knows ({', '.join(families())})"
    )


def family_for_name(spec: str | Path) -> ModelFamily | None:
    """The family whose package YAML ``spec`` names, if any."""
    return next((f for f in families().values() if f.owns_name(spec)), None)


def family_for_pickled(qualname: str) -> ModelFamily | None:
    """The family of a release checkpoint whose model pickles as ``qualname``, if any."""
    return next((f for f in families().values() if f.owns_pickled(qualname)), None)
