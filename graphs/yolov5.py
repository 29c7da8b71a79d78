"""Compact YOLOv5 (v5.0 to v7.0) building blocks and the YAML model builder.

Module and attribute names mirror the ultralytics/yolov5 repository (``model.<i>.cv1.conv``,
``bn``, ``m.<k>``...) so that a release checkpoint's tensors map one to one onto these modules
by their state-dict keys. Nothing here imports yolov5 code.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from yoloprune.graphs.errors import ModelError
from yoloprune.graphs.model_yaml import ACTIVATIONS, parse_activation, validate_model_yaml

__all__ = ["ACTIVATIONS", "DetectionModel", "parse_activation"]


def autopad(kernel: int | Sequence[int], padding: int | None = None, dilation: int = 1):
    """Padding that keeps the spatial size ('same') for odd kernels."""
    if dilation > 1:
        kernel = (
            dilation * (kernel - 1) + 1
            if isinstance(kernel, int)
            else [dilation * (k - 1) + 1 for k in kernel]
        )
    if padding is None:
        padding = kernel // 2 if isinstance(kernel, int) else [k // 2 for k in kernel]
    return padding


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + activation."""

    default_act: nn.Module = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        if act is True:
            self.act = copy.deepcopy(Conv.default_act)
        elif isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Focus(nn.Module):
    """Space-to-depth stem of v5.0 (a 2x2 pixel shuffle into channels, then a Conv)."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act=act)

    def forward(self, x):
        return self.conv(
            torch.cat(
                (x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1
            )
        )


class Bottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class BottleneckCSP(nn.Module):
    """CSP bottleneck of v5.0 (two plain convs, a shared BN over their concatenation)."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = nn.Conv2d(c1, c_, 1, 1, bias=False)
        self.cv3 = nn.Conv2d(c_, c_, 1, 1, bias=False)
        self.cv4 = Conv(2 * c_, c2, 1, 1)
        self.bn = nn.BatchNorm2d(2 * c_)
        self.act = nn.SiLU()
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x):
        y1 = self.cv3(self.m(self.cv1(x)))
        y2 = self.cv2(x)
        return self.cv4(self.act(self.bn(torch.cat((y1, y2), 1))))


class C3(nn.Module):
    """CSP bottleneck with three convs (v4.0 onwards)."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPP(nn.Module):
    """Spatial pyramid pooling with parallel max-pools (v3/v5.0)."""

    def __init__(self, c1, c2, k=(5, 9, 13)):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * (len(k) + 1), c2, 1, 1)
        self.m = nn.ModuleList([nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k])

    def forward(self, x):
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


class SPPF(nn.Module):
    """Fast SPP: one max-pool applied three times in sequence (same result as SPP(5, 9, 13))."""

    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Concat(nn.Module):
    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class Detect(nn.Module):
    """Anchored detection head.

    ``anchors`` is a buffer in grid units (pixels / stride), as yolov5 stores it. In training
    mode the head returns the raw per-level maps (bs, na, ny, nx, no); in eval mode
    ``(decoded, raw)``, or only ``decoded`` when ``export`` is set. ``decoded`` is
    (bs, sum(na*ny*nx), no) with xywh in input pixels and sigmoid scores.
    """

    export = False

    def __init__(self, nc=80, anchors=(), ch=(), inplace=True):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))
        self.register_buffer("stride", torch.ones(self.nl))
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)
        self.inplace = inplace

    def forward(self, x):
        x = list(x)
        z = []
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                grid, anchor_grid = self._make_grid(nx, ny, i, x[i])
                xy, wh, conf = x[i].sigmoid().split((2, 2, self.nc + 1), 4)
                xy = (xy * 2 + grid) * self.stride[i]
                wh = (wh * 2) ** 2 * anchor_grid
                y = torch.cat((xy, wh, conf), 4)
                z.append(y.view(bs, self.na * nx * ny, self.no))
        if self.training:
            return x
        return torch.cat(z, 1) if self.export else (torch.cat(z, 1), x)

    def _make_grid(self, nx: int, ny: int, i: int, like: torch.Tensor):
        # Plain ints: the exported graph gets constant grids (spatial size is static), instead
        # of shape arithmetic that simplifiers cannot fold.
        nx, ny = int(nx), int(ny)
        d, t = like.device, like.dtype
        y = torch.arange(ny, device=d, dtype=t)
        x = torch.arange(nx, device=d, dtype=t)
        yv, xv = torch.meshgrid(y, x, indexing="ij")
        grid = torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2) - 0.5
        anchor_grid = (self.anchors[i] * self.stride[i]).to(t).view((1, self.na, 1, 1, 2))
        return grid, anchor_grid


# Modules whose first two YAML args are (c_out, ...) and get c_in prepended.
CONV_LIKE = {
    "Conv": Conv,
    "Focus": Focus,
    "Bottleneck": Bottleneck,
    "BottleneckCSP": BottleneckCSP,
    "C3": C3,
    "SPP": SPP,
    "SPPF": SPPF,
}
# CSP modules take the repeat count as their third constructor argument.
REPEATED_INSIDE = {"BottleneckCSP", "C3"}
MODULES: dict[str, Any] = {
    **CONV_LIKE,
    "Concat": Concat,
    "Detect": Detect,
    "nn.Upsample": nn.Upsample,
    "nn.BatchNorm2d": nn.BatchNorm2d,
}


def make_divisible(x: float, divisor: int) -> int:
    return math.ceil(x / divisor) * divisor


def _resolve_arg(value, names: dict[str, Any]):
    """YAML args may name ``nc``/``anchors`` or hold strings like 'nearest' or 'None'."""
    if isinstance(value, str):
        if value in names:
            return names[value]
        if value == "None":
            return None
    return value


class DetectionModel(nn.Module):
    """A YOLOv5 network built from its YAML dict: ``self.model`` is the layer Sequential."""

    def __init__(self, cfg: dict, ch: int = 3, nc: int | None = None):
        super().__init__()
        self.yaml = validate_model_yaml(cfg, "yolov5")  # before the parser sees any of it
        if nc is not None and nc != self.yaml.get("nc"):
            self.yaml["nc"] = validate_model_yaml({**self.yaml, "nc": nc}, "yolov5")["nc"]
        self.model, self.save = parse_model(self.yaml, ch=[ch])
        self.nc = int(self.yaml["nc"])
        self.names = [str(i) for i in range(self.nc)]
        self.inplace = self.yaml.get("inplace", True)
        detect = self.model[-1]
        detect.inplace = self.inplace
        self._init_strides(detect, ch)
        self._init_weights()

    def _init_strides(self, detect: Detect, ch: int) -> None:
        probe = 256
        was_training = self.training
        self.train()
        try:
            with torch.no_grad():
                outs = self.forward(torch.zeros(1, ch, probe, probe))
        except RuntimeError as exc:  # e.g. a Concat of maps of different sizes
            first = str(exc).strip().splitlines()[0]
            raise ModelError(f"the layers do not fit together ({first})") from exc
        finally:
            self.train(was_training)
        detect.stride = torch.tensor([probe / x.shape[-2] for x in outs])
        detect.anchors /= detect.stride.view(-1, 1, 1)
        _check_anchor_order(detect)
        self.stride = detect.stride
        self._init_detect_biases(detect)

    @staticmethod
    def _init_detect_biases(detect: Detect) -> None:
        # Prior for objectness and class logits, as yolov5 initialises them.
        for conv, s in zip(detect.m, detect.stride, strict=True):
            b = conv.bias.view(detect.na, -1)
            b.data[:, 4] += math.log(8 / (640 / s) ** 2)
            b.data[:, 5 : 5 + detect.nc] += math.log(0.6 / (detect.nc - 0.99999))
            conv.bias = nn.Parameter(b.view(-1), requires_grad=True)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = 1e-3
                m.momentum = 0.03
            elif isinstance(m, (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU)):
                m.inplace = True

    def forward(self, x):
        outputs = []
        for m in self.model:
            if m.f != -1:
                x = (
                    outputs[m.f]
                    if isinstance(m.f, int)
                    else [x if j == -1 else outputs[j] for j in m.f]
                )
            x = m(x)
            outputs.append(x if m.i in self.save else None)
        return x

    @property
    def detect(self) -> Detect:
        return self.model[-1]


def _check_anchor_order(detect: Detect) -> None:
    """Anchors must grow with stride; yolov5 flips them otherwise."""
    area = detect.anchors.prod(-1).mean(-1).view(-1)
    delta_area = area[-1] - area[0]
    delta_stride = detect.stride[-1] - detect.stride[0]
    if delta_area and (delta_area.sign() != delta_stride.sign()):
        detect.anchors[:] = detect.anchors.flip(0)


def parse_model(cfg: dict, ch: list[int]) -> tuple[nn.Sequential, list[int]]:
    """Build the layer list from a yolov5 model dict (backbone + head)."""
    for key in ("backbone", "head", "nc", "anchors"):
        if key not in cfg:
            raise ModelError(f"model YAML has no {key!r} key: not a YOLOv5 model definition")
    anchors, nc = cfg["anchors"], int(cfg["nc"])
    gd, gw = cfg.get("depth_multiple", 1.0), cfg.get("width_multiple", 1.0)
    previous_default = Conv.default_act
    if cfg.get("activation"):
        Conv.default_act = parse_activation(cfg["activation"])
    na = (len(anchors[0]) // 2) if isinstance(anchors, list) else anchors
    no = na * (nc + 5)
    names = {"nc": nc, "anchors": anchors}
    layers, save, c2 = [], [], ch[-1]
    try:
        for i, (f, n, m, args) in enumerate(cfg["backbone"] + cfg["head"]):
            module_cls = MODULES.get(m)
            if module_cls is None:
                raise ModelError(
                    f"layer {i}: unknown module {m!r}; supported: {', '.join(sorted(MODULES))}"
                )
            args = [_resolve_arg(a, names) for a in args]
            n = max(round(n * gd), 1) if n > 1 else n
            if m in CONV_LIKE:
                c1, c2 = ch[f], args[0]
                if c2 != no:
                    c2 = make_divisible(c2 * gw, 8)
                args = [c1, c2, *args[1:]]
                if m in REPEATED_INSIDE:
                    args.insert(2, n)
                    n = 1
            elif m == "nn.BatchNorm2d":
                args = [ch[f]]
            elif m == "Concat":
                c2 = sum(ch[x] for x in f)
            elif m == "Detect":
                args.append([ch[x] for x in f])
                if isinstance(args[1], int):
                    args[1] = [list(range(args[1] * 2))] * len(f)
            else:
                c2 = ch[f]
            module = (
                nn.Sequential(*(module_cls(*args) for _ in range(n)))
                if n > 1
                else module_cls(*args)
            )
            module.i, module.f, module.type = i, f, m
            save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
            layers.append(module)
            if i == 0:
                ch = []
            ch.append(c2)
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise ModelError(f"malformed model definition: {type(exc).__name__}: {exc}") from exc
    finally:
        Conv.default_act = previous_default
    if not isinstance(layers[-1], Detect):
        raise ModelError("the last layer of the model must be Detect")
    return nn.Sequential(*layers), sorted(save)
