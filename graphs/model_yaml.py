"""Validation of model YAMLs: every definition is checked here before any parser sees it.

A model YAML comes from a file the user names, from inside a checkpoint (a release ``.pt`` or a
yoloprune pruned one) or from the ultralytics package. ultralytics' own parser ``eval``s the
``activation`` string and resolves module names through its module's globals (where a loader
that unpickles without restriction also lives), so nothing from a file may reach it unchecked.
:func:`validate_model_yaml` accepts only:

- known top-level keys, each of its expected type and within sane bounds (``nc``, depth and
  width multiples, scales, input channels, anchors);
- layers ``[from, repeats, module, args]`` whose module is a block class of the family's
  allow-list (never a function, never any other name), whose ``from`` indices point backwards,
  whose repeats and channel counts are bounded, and whose arguments are literals (numbers,
  booleans, ``None``, short lists of numbers) or one of the family's known symbols;
- an ``activation`` of a fixed set, parsed by :func:`parse_activation` (no ``eval``).

It returns a validated deep copy made of plain Python values only. Anything else is refused
with a :class:`ModelError` naming the key.
"""

from __future__ import annotations

import math
import re
from typing import Any

from torch import nn

from yoloprune.graphs.errors import ModelError

FAMILIES = ("yolov5", "ultralytics")

# yolov5's blocks of models/common.py (also the classes its checkpoints pickle from there).
YOLOV5_COMMON = ("Conv", "Focus", "Bottleneck", "BottleneckCSP", "C3", "SPP", "SPPF", "Concat")
# Block classes a YAML layer may name, per family. Everything else is refused.
MODULES = {
    "yolov5": frozenset({*YOLOV5_COMMON, "Detect", "nn.Upsample", "nn.BatchNorm2d"}),
    "ultralytics": frozenset(
        {
            "Conv",
            "DWConv",
            "Focus",
            "Bottleneck",
            "C3",
            "C2f",
            "C3k2",
            "C2PSA",
            "A2C2f",
            "SPP",
            "SPPF",
            "Concat",
            "Detect",
            "nn.Upsample",
        }
    ),
}
# Heads of other tasks (segmentation, pose, ...): named in the refusal, never built.
OTHER_HEADS = frozenset(
    {"Segment", "Pose", "OBB", "Classify", "WorldDetect", "YOLOEDetect", "v10Detect"}
    | {"Segment26", "Pose26", "OBB26", "RTDETRDecoder", "YOLOESegment", "YOLOESegment26"}
)
# Layers whose first argument is an output channel count (scaled by the width multiple).
_NO_CHANNEL_ARG = frozenset({"Concat", "Detect", "nn.Upsample", "nn.BatchNorm2d"})
# Strings an argument may hold: names the parser resolves, and nn.Upsample's mode.
SYMBOLS = {
    "yolov5": frozenset({"nc", "anchors", "nearest", "None"}),
    "ultralytics": frozenset({"nc", "nearest", "None"}),
}
# Top-level keys and what each may hold ("layers" and "activation" are checked on their own).
_COMMON_KEYS = {
    "nc": "classes",
    "depth_multiple": "multiple",
    "width_multiple": "multiple",
    "activation": "activation",
    "backbone": "layers",
    "head": "layers",
    "ch": "input_channels",
    "channels": "input_channels",
    "inplace": "bool",
}
TOP_KEYS = {
    "yolov5": {**_COMMON_KEYS, "anchors": "anchors"},
    "ultralytics": {
        **_COMMON_KEYS,
        "scales": "scales",
        "scale": "scale",
        "end2end": "optional_bool",
        "reg_max": "reg_max",
        "yaml_file": "text",
    },
}

MAX_CLASSES = 10_000
MAX_MULTIPLE = 4.0  # depth/width multiples: released models use at most 1.33 / 1.5
MAX_CHANNELS = 8192  # any conv's channel count, after width scaling
MAX_REPEATS = 64  # a layer's repeats, after depth scaling
MAX_LAYERS = 512
MAX_ARGS = 10
MAX_LIST = 32  # a list argument (SPP kernels, anchors)
MAX_INT = 65_536
MAX_FLOAT = 1e4
MAX_ANCHORS = 16  # anchors per level, and levels
MAX_TEXT = 4096

# Activations a YAML may name; parsed by our own code, never evaluated.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "nn.SiLU": nn.SiLU,
    "nn.ReLU": nn.ReLU,
    "nn.LeakyReLU": nn.LeakyReLU,
    "nn.Hardswish": nn.Hardswish,
    "nn.ReLU6": nn.ReLU6,
    "nn.Mish": nn.Mish,
    "nn.GELU": nn.GELU,
    "nn.Sigmoid": nn.Sigmoid,
    "nn.Identity": nn.Identity,
}
_ACTIVATION = re.compile(r"\s*(?:torch\.)?(nn\.[A-Za-z0-9]+)\s*\(\s*(.*?)\s*\)\s*")
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
_INPLACE = re.compile(r"inplace\s*=\s*(True|False)")


def parse_activation(text: Any) -> nn.Module:
    """A module for an ``activation:`` spec such as ``nn.LeakyReLU(0.1)`` or
    ``torch.nn.SiLU()``: one allow-listed class, at most one number and ``inplace=``."""
    if type(text) is not str or len(text) > 80:
        raise ModelError(f"activation {text!r:.80} is not an activation spec string")
    match = _ACTIVATION.fullmatch(text)
    if not match or match.group(1) not in ACTIVATIONS:
        raise ModelError(
            f"unsupported activation {text!r}: use one of "
            + ", ".join(f"{name}()" for name in ACTIVATIONS)
        )
    args: list[float] = []
    kwargs: dict[str, bool] = {}
    for part in filter(None, (p.strip() for p in match.group(2).split(","))):
        inplace = _INPLACE.fullmatch(part)
        if inplace:
            kwargs["inplace"] = inplace.group(1) == "True"
        elif _NUMBER.fullmatch(part) and not args and math.isfinite(float(part)):
            args.append(float(part))
        else:
            raise ModelError(f"activation {text!r}: argument {part!r} is not a number")
    try:
        return ACTIVATIONS[match.group(1)](*args, **kwargs)
    except TypeError as exc:
        raise ModelError(f"activation {text!r}: {exc}") from exc


def canonical_activation(module: nn.Module) -> str:
    """The spec string of an allow-listed activation module (``nn.LeakyReLU(0.1)``)."""
    name = f"nn.{type(module).__name__}"
    if ACTIVATIONS.get(name) is not type(module):
        raise ModelError(f"activation {name} is not one yoloprune supports")
    slope = getattr(module, "negative_slope", None)
    return f"{name}({slope!r})" if slope is not None else f"{name}()"


def validate_model_yaml(cfg: Any, family: str) -> dict:
    """A checked deep copy of the model definition ``cfg`` of ``family`` (plain values only).

    Raises:
        ModelError: naming the first key that is unknown, of the wrong type or out of bounds.
    """
    if family not in FAMILIES:
        raise ModelError(f"unknown model family {family!r}: expected one of {', '.join(FAMILIES)}")
    if type(cfg) is not dict:
        raise ModelError(f"a model definition must be a mapping, not {type(cfg).__name__}")
    return _Validator(family).run(cfg)


class _Validator:
    def __init__(self, family: str):
        self.family = family
        self.keys = TOP_KEYS[family]

    def run(self, cfg: dict) -> dict:
        checked: dict[str, Any] = {}
        for key, value in cfg.items():
            if type(key) is not str or key not in self.keys:
                raise ModelError(
                    f"model YAML key {key!r:.40} is not one yoloprune understands for "
                    f"{self.family} models (known: {', '.join(sorted(self.keys))})"
                )
            checked[key] = getattr(self, f"_{self.keys[key]}")(key, value)
        for key in ("nc", "backbone", "head"):
            if key not in checked:
                raise ModelError(f"model YAML has no {key!r} key: not a model definition")
        if self.family == "yolov5" and "anchors" not in checked:
            raise ModelError("model YAML has no 'anchors' key: not a YOLOv5 model definition")
        self._check_layers(checked)
        return checked

    # --- top-level values --------------------------------------------------------------------

    @staticmethod
    def _int(key: str, value: Any, low: int, high: int) -> int:
        if type(value) is not int or not low <= value <= high:
            raise ModelError(
                f"model YAML key {key!r}: {value!r:.40} is not an integer in [{low}, {high}]"
            )
        return value

    @staticmethod
    def _number(key: str, value: Any, low: float, high: float) -> float:
        if type(value) not in (int, float) or not (low < value <= high):
            raise ModelError(
                f"model YAML key {key!r}: {value!r:.40} is not a number in ({low:g}, {high:g}]"
            )
        return value

    def _classes(self, key: str, value: Any) -> int:
        return self._int(key, value, 1, MAX_CLASSES)

    def _multiple(self, key: str, value: Any) -> float:
        return self._number(key, value, 0.0, MAX_MULTIPLE)

    def _input_channels(self, key: str, value: Any) -> int:
        return self._int(key, value, 1, 16)

    def _reg_max(self, key: str, value: Any) -> int:
        return self._int(key, value, 1, 64)

    @staticmethod
    def _bool(key: str, value: Any) -> bool:
        if type(value) is not bool:
            raise ModelError(f"model YAML key {key!r}: {value!r:.40} is not true or false")
        return value

    def _optional_bool(self, key: str, value: Any) -> bool | None:
        return None if value is None else self._bool(key, value)

    @staticmethod
    def _text(key: str, value: Any) -> str:
        if type(value) is not str or len(value) > MAX_TEXT:
            raise ModelError(f"model YAML key {key!r}: expected a short string")
        return value

    @staticmethod
    def _activation(key: str, value: Any) -> str | None:
        if value is None:
            return None
        try:
            return canonical_activation(parse_activation(value))
        except ModelError as exc:
            raise ModelError(f"model YAML key {key!r}: {exc}") from None

    def _scales(self, key: str, value: Any) -> dict:
        if type(value) is not dict or not 0 < len(value) <= 16:
            raise ModelError(f"model YAML key {key!r}: expected a mapping of scale letters")
        scales = {}
        for letter, row in value.items():
            where = f"{key}.{letter}"
            if type(letter) is not str or not re.fullmatch(r"[a-z]", letter):
                raise ModelError(f"model YAML key {where!r:.40}: scale names are single letters")
            if type(row) is not list or len(row) != 3:
                raise ModelError(f"model YAML key {where!r}: expected [depth, width, max_channels]")
            scales[letter] = [
                self._multiple(where, row[0]),
                self._multiple(where, row[1]),
                self._int(where, row[2], 8, MAX_CHANNELS),
            ]
        return scales

    @staticmethod
    def _scale(key: str, value: Any) -> str:
        if type(value) is not str or not re.fullmatch(r"[a-z]?", value):
            raise ModelError(f"model YAML key {key!r}: {value!r:.40} is not a scale letter")
        return value

    def _anchors(self, key: str, value: Any) -> list | int:
        if type(value) is int:
            return self._int(key, value, 1, MAX_ANCHORS)
        if type(value) is not list or not 0 < len(value) <= MAX_ANCHORS:
            raise ModelError(f"model YAML key {key!r}: expected a list of anchor rows per level")
        rows = []
        for row in value:
            if (
                type(row) is not list
                or not 0 < len(row) <= 2 * MAX_ANCHORS
                or len(row) % 2
                or len(row) != len(value[0])
            ):
                raise ModelError(
                    f"model YAML key {key!r}: each level needs the same even number of values"
                )
            rows.append([self._number(key, v, 0.0, MAX_FLOAT) for v in row])
        return rows

    @staticmethod
    def _layers(key: str, value: Any) -> list:
        if type(value) is not list or len(value) > MAX_LAYERS:
            raise ModelError(f"model YAML key {key!r}: expected a list of layers")
        return value  # each layer is checked, in network order, by _check_layers

    # --- layers ------------------------------------------------------------------------------

    def _check_layers(self, cfg: dict) -> None:
        depth, width, max_channels = self._gains(cfg)
        layers = cfg["backbone"] + cfg["head"]
        self.layer_count = len(layers)
        if not 0 < len(layers) <= MAX_LAYERS:
            raise ModelError(f"model YAML: {len(layers)} layers (1 to {MAX_LAYERS} allowed)")
        checked = [
            self._layer(i, layer, depth, width, max_channels) for i, layer in enumerate(layers)
        ]
        if checked[-1][2] != "Detect":
            raise ModelError("model YAML: the last layer must be Detect")
        split = len(cfg["backbone"])
        cfg["backbone"], cfg["head"] = checked[:split], checked[split:]

    def _gains(self, cfg: dict) -> tuple[float, float, int]:
        depth = cfg.get("depth_multiple", 1.0)
        width = cfg.get("width_multiple", 1.0)
        max_channels = MAX_CHANNELS
        scales = cfg.get("scales")
        if scales:
            scale = cfg.get("scale") or next(iter(scales))
            if scale not in scales:
                raise ModelError(
                    f"model YAML key 'scale': {scale!r} is not one of {sorted(scales)}"
                )
            depth, width, max_channels = scales[scale]
        return depth, width, max_channels

    def _layer(self, i: int, layer: Any, depth: float, width: float, max_channels: int) -> list:
        where = f"layer {i}"
        if type(layer) is not list or len(layer) != 4:
            raise ModelError(f"model YAML {where}: expected [from, repeats, module, args]")
        source, repeats, module, args = layer
        if type(module) is str and module in OTHER_HEADS and i == self.layer_count - 1:
            raise ModelError(
                f"model YAML {where}: its head is {module}; yoloprune prunes detection models "
                "(Detect head) only"
            )
        if type(module) is not str or module not in MODULES[self.family]:
            raise ModelError(
                f"model YAML {where}: module {module!r:.60} is not a {self.family} block "
                f"yoloprune accepts (allowed: {', '.join(sorted(MODULES[self.family]))})"
            )
        sources = source if type(source) is list else [source]
        if not 0 < len(sources) <= 16 or any(
            type(f) is not int or not (f == -1 or -i <= f < i) for f in sources
        ):
            raise ModelError(
                f"model YAML {where}: 'from' {source!r:.60} must name earlier layers (-1 is the "
                "previous one)"
            )
        if type(repeats) is not int or not 1 <= repeats <= MAX_REPEATS:
            raise ModelError(
                f"model YAML {where}: repeats {repeats!r:.40} not in [1, {MAX_REPEATS}]"
            )
        if repeats > 1 and max(round(repeats * depth), 1) > MAX_REPEATS:
            raise ModelError(f"model YAML {where}: repeats x depth multiple exceeds {MAX_REPEATS}")
        if type(args) is not list or len(args) > MAX_ARGS:
            raise ModelError(
                f"model YAML {where}: args must be a list of at most {MAX_ARGS} values"
            )
        args = [self._arg(f"{where} ({module}) argument {j}", a) for j, a in enumerate(args)]
        self._check_module_args(where, module, sources, args, width, max_channels)
        return [source if type(source) is int else list(sources), repeats, module, args]

    def _arg(self, where: str, value: Any, depth: int = 0) -> Any:
        kind = type(value)
        if value is None or kind is bool:
            return value
        if kind is int and abs(value) <= MAX_INT:
            return value
        if kind is float and math.isfinite(value) and abs(value) <= MAX_FLOAT:
            return value
        if kind is str and value in SYMBOLS[self.family]:
            return value
        if kind is list and depth < 2 and len(value) <= MAX_LIST:
            items = [self._arg(where, v, depth + 1) for v in value]
            if all(type(v) in (int, float) for v in items) or all(type(v) is list for v in items):
                return items
        allowed = ", ".join(sorted(SYMBOLS[self.family]))
        raise ModelError(
            f"model YAML {where}: {value!r:.60} is not allowed (numbers, booleans, short lists "
            f"of numbers, or one of: {allowed})"
        )

    @staticmethod
    def _check_module_args(where, module, sources, args, width, max_channels) -> None:
        if module not in _NO_CHANNEL_ARG:
            if len(sources) != 1:
                raise ModelError(f"model YAML {where}: {module} takes one input")
            channels = args[0] if args else None
            if type(channels) is not int or not 1 <= channels <= MAX_CHANNELS:
                raise ModelError(
                    f"model YAML {where}: {module} needs an output channel count in "
                    f"[1, {MAX_CHANNELS}] as its first argument"
                )
            if min(channels, max_channels) * width > MAX_CHANNELS:
                raise ModelError(f"model YAML {where}: channels x width exceed {MAX_CHANNELS}")
        elif module == "Concat" and args not in ([], [1]):
            raise ModelError(f"model YAML {where}: Concat joins channels: its argument must be 1")
        elif module == "nn.Upsample" and not (
            len(args) == 3
            and args[0] in (None, "None")
            and type(args[1]) in (int, float)
            and 1 <= args[1] <= 8
            and args[2] == "nearest"
        ):
            raise ModelError(
                f"model YAML {where}: nn.Upsample takes [None, scale (1 to 8), 'nearest']"
            )
