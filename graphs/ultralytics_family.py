"""Ultralytics detectors (YOLOv8, YOLO11, YOLO26) through the optional extra.

The ``ultralytics`` package is AGPL-3.0, so it is an optional extra and imported lazily: without
it, naming an ultralytics model gives one line saying how to install it. Models are built
offline from the package's YAMLs (``yolov8n.yaml`` ...), seeded, then **canonicalised** before
tracing: every C2f-style block's ``cv1(x).chunk(2, 1)`` becomes two convs (``cv1a``, ``cv1b``),
exactly (their weights are the two halves of ``cv1``'s), because torch-pruning 1.6.1 infers
wrong chunk offsets and cannot model one chunk piece feeding two consumers.

Attention blocks (C2PSA's and YOLO26's PSABlock, YOLO12's area attention) are **protected** by
their inner convs (qkv, proj, pe): their channels are reshaped into heads, which torch-pruning
cannot map (tracing them unprotected grows group building past 20 GB), so every group touching
them is left whole. The residual stream around them is therefore kept; the rest of each block
(its split halves, the feed-forward hidden layer) is pruned as usual.

Detect keeps its interface: the last box/class convs of both branches (one-to-many and YOLO26's
one-to-one) and the DFL conv are protected, and tracing follows both branches.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from yoloprune.graphs.errors import ModelError, YoloPruneError, first_line
from yoloprune.graphs.files import atomic_path
from yoloprune.graphs.model_yaml import parse_activation, validate_model_yaml

EXTRA_HINT = (
    "it needs the optional 'ultralytics' extra (AGPL-3.0): run `make install-ultralytics` "
    "(pip install --no-deps ultralytics opencv-python-headless, plus torchvision --no-deps, "
    "whose metadata ultralytics reads at import; torchvision itself is never imported)"
)
# Names of the package's detection YAMLs (scale letter optional): yolov8n.yaml, yolo11s.yaml ...
NAME_PATTERN = re.compile(
    r"^(yolov8|yolov9|yolov10|yolo11|yolo12|yolo26)[nsmlxtcbe]?(-\w+)?\.ya?ml$"
)
CSP_SPLIT_BLOCKS = ("C2f", "C3k2")  # blocks whose forward is C2f's chunk-then-extend
# Modules whose inner convs feed head-reshaped attention; protected, never pruned.
ATTENTION_MODULES = ("Attention", "AAttn")
# Attention-style blocks yoloprune has not been checked on: refused rather than mis-pruned.
UNSUPPORTED_BLOCKS = ("C2fAttn", "ImagePoolingAttn", "MaxSigmoidAttnBlock", "BNContrastiveHead")


class UltralyticsMissing(YoloPruneError):
    pass


def require_ultralytics(spec: str = "this model"):
    """The ``ultralytics`` module, or a one-line error naming the extra."""
    try:
        import ultralytics
        from ultralytics.nn import tasks  # noqa: F401  (fails where its metadata checks fail)
    except ImportError as exc:
        raise UltralyticsMissing(f"{spec}: an ultralytics model; {EXTRA_HINT}") from exc
    except Exception as exc:  # e.g. PackageNotFoundError for torchvision's metadata
        raise UltralyticsMissing(
            f"{spec}: the ultralytics package failed to import ({type(exc).__name__}: {exc}); "
            f"{EXTRA_HINT}"
        ) from exc
    return ultralytics


def is_ultralytics_name(spec: str | Path) -> bool:
    path = Path(spec)
    return len(path.parts) == 1 and not path.exists() and bool(NAME_PATTERN.match(path.name))


LAYER_BOOKKEEPING = ("f", "i", "type", "np")  # ultralytics' per-layer attributes


def _copy_bookkeeping(source: nn.Module, target: nn.Module) -> None:
    for attr in LAYER_BOOKKEEPING:
        if hasattr(source, attr):
            setattr(target, attr, getattr(source, attr))


class _SplitBlock(nn.Module):
    """A block whose ``cv1`` output is split in two, held as two convs ``cv1a``/``cv1b``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.cv1a, self.cv1b = _split_conv(block.cv1, block.c)
        self.m = block.m
        self.cv2 = block.cv2
        self.c = block.c
        _copy_bookkeeping(block, self)
        self.source_type = type(block).__name__


class SplitCSP(_SplitBlock):
    """A C2f/C3k2 block with ``cv1`` split in two convs: same outputs, no chunk."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1a(x), self.cv1b(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SplitPSA(_SplitBlock):
    """A C2PSA block with ``cv1`` split in two convs: the half that bypasses attention then
    prunes on its own, while the attention half stays whole (protected)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(torch.cat((self.cv1a(x), self.m(self.cv1b(x))), 1))


def _with_channels(template: nn.Module, channels) -> nn.Module:
    """A copy of an ultralytics ``Conv`` (conv + BN + act) whose every per-output-channel
    tensor is ``channels(getter)``, ``getter`` reading that tensor off a source Conv."""
    import copy

    result = copy.deepcopy(template)
    with torch.no_grad():
        result.conv.weight = nn.Parameter(channels(lambda c: c.conv.weight))
        if template.conv.bias is not None:
            result.conv.bias = nn.Parameter(channels(lambda c: c.conv.bias))
        result.conv.out_channels = result.conv.weight.shape[0]
        result.bn.weight = nn.Parameter(channels(lambda c: c.bn.weight))
        result.bn.bias = nn.Parameter(channels(lambda c: c.bn.bias))
        result.bn.running_mean = channels(lambda c: c.bn.running_mean)
        result.bn.running_var = channels(lambda c: c.bn.running_var)
        result.bn.num_features = result.conv.out_channels
    return result


def _split_conv(conv: nn.Module, first: int) -> tuple[nn.Module, nn.Module]:
    """Two copies of an ultralytics ``Conv`` keeping output channels [0, first) and
    [first, out) of the original."""
    return (
        _with_channels(conv, lambda get: get(conv)[:first].clone()),
        _with_channels(conv, lambda get: get(conv)[first:].clone()),
    )


def _concat_convs(first: nn.Module, second: nn.Module) -> nn.Module:
    """One ultralytics Conv whose outputs are ``first``'s then ``second``'s (the inverse of
    _split_conv)."""
    return _with_channels(first, lambda get: torch.cat((get(first), get(second))))


def canonicalize(model: nn.Module) -> nn.Module:
    """Rewrite, in place, every chunk-based CSP block into :class:`SplitCSP` and every C2PSA
    into :class:`SplitPSA` (both exact)."""
    from ultralytics.nn.modules.block import C2PSA, C2f

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = type(child)
            if kind.__name__ in CSP_SPLIT_BLOCKS and kind.forward is C2f.forward:
                setattr(parent, name, SplitCSP(child))
            elif kind is C2PSA:
                setattr(parent, name, SplitPSA(child))
    return model


def check_supported(model: nn.Module, spec: str) -> None:
    from ultralytics.nn.modules.head import Detect

    found = sorted({type(m).__name__ for m in model.modules()} & set(UNSUPPORTED_BLOCKS))
    if found:
        raise ModelError(
            f"{spec}: has blocks yoloprune does not prune ({', '.join(found)}); "
            "supported: YOLOv8, YOLO11 and YOLO26 detection models"
        )
    head = detect_head(model)
    if type(head) is not Detect:
        raise ModelError(
            f"{spec}: its head is {type(head).__name__}; yoloprune prunes detection models "
            "(Detect head) only"
        )


def build(spec: str, nc: int | None = None) -> tuple[nn.Module, dict]:
    """Build an ultralytics model from its package YAML (``nc`` classes, default the YAML's),
    seeded, canonicalised, eval mode."""
    require_ultralytics(spec)
    from ultralytics.nn.tasks import yaml_model_load

    try:
        cfg = yaml_model_load(spec)  # the package's own YAML, read with yaml's safe loader
    except FileNotFoundError as exc:
        raise ModelError(f"{spec}: not a model YAML of the ultralytics package") from exc
    if nc is not None:
        cfg["nc"] = nc
    model = construct(cfg, spec)
    check_supported(model, spec)
    canonicalize(model)
    return model.float().eval(), model.yaml


def rebuild(cfg: dict, source: str = "a pruned ultralytics checkpoint") -> nn.Module:
    """The canonical architecture of a saved model's YAML dict (weights to be loaded)."""
    return canonicalize(construct(cfg, source)).float().eval()


def construct(cfg: dict, source: str) -> nn.Module:
    """ultralytics' ``DetectionModel`` of a model definition, built only after
    :func:`graphs.model_yaml.validate_model_yaml` accepted it, seeded (random init).

    The parser never sees the YAML's ``activation`` string (it would ``eval`` it): our own
    parser turns it into a module that is set as ``Conv.default_act`` while the model is built,
    and the canonical spec is put back into ``model.yaml`` afterwards. Where ultralytics offers
    its restricted (no-eval, known-layer) parsing, it is switched on too, as a second wall.
    """
    try:
        checked = validate_model_yaml(cfg, "ultralytics")
    except ModelError as exc:
        raise ModelError(f"{source}: {exc}") from None
    require_ultralytics(source)
    from ultralytics.nn.modules.conv import Conv
    from ultralytics.nn.tasks import DetectionModel

    activation = checked.pop("activation", None)
    previous = Conv.default_act
    Conv.default_act = parse_activation(activation) if activation else previous
    try:
        with _restricted_parsing(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = DetectionModel(checked, verbose=False)
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
        raise ModelError(
            f"{source}: the model definition does not build ({first_line(exc)})"
        ) from exc
    finally:
        Conv.default_act = previous
    if activation:
        model.yaml["activation"] = activation
    return model


@contextlib.contextmanager
def _restricted_parsing() -> Iterator[None]:
    """ultralytics' own restricted model parsing (no eval, model layers only) for this thread,
    where the installed version has it (8.4.x: ``_SafeLoad``); a no-op elsewhere."""
    from ultralytics.nn import tasks

    safe_load = getattr(tasks, "_SafeLoad", None)
    local = getattr(safe_load, "_local", None)
    if local is None or not getattr(safe_load, "SUPPORTED", False):
        yield
        return
    was_active = getattr(local, "active", False)
    local.active = True
    try:
        yield
    finally:
        local.active = was_active


def split_halves(model: nn.Module) -> list[tuple[str, str, tuple[str, str]]]:
    """(block name, ultralytics class, (cv1a conv, cv1b conv)) of every split block: the two
    halves ultralytics' class holds as one ``cv1`` split in equal parts."""
    return [
        (name, block.source_type, (f"{name}.cv1a.conv", f"{name}.cv1b.conv"))
        for name, block in model.named_modules()
        if isinstance(block, _SplitBlock)
    ]


def native(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy with every rewritten block turned back into ultralytics' own class where its two
    halves keep equal channel counts (as chunk/split require), and the names of the blocks
    left rewritten (their halves differ: they load where yoloprune is importable)."""
    import copy

    result = copy.deepcopy(model)
    kept = []
    for parent_name, parent in list(result.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, SplitCSP | SplitPSA):
                continue
            if child.cv1a.conv.out_channels == child.cv1b.conv.out_channels:
                setattr(parent, name, _merged(child))
            else:
                kept.append(f"{parent_name}.{name}" if parent_name else name)
    return result, kept


def _merged(block: nn.Module) -> nn.Module:
    from ultralytics.nn.modules import block as blocks

    kind = getattr(blocks, block.source_type)
    merged = kind.__new__(kind)
    nn.Module.__init__(merged)
    merged.c = block.cv1a.conv.out_channels
    merged.cv1 = _concat_convs(block.cv1a, block.cv1b)
    merged.cv2, merged.m = block.cv2, block.m
    _copy_bookkeeping(block, merged)
    return merged


def save_for_ultralytics(model: nn.Module, names, imgsz: int, path: Path) -> list[str]:
    """Write ``path`` as ultralytics writes a released checkpoint (the model pickled whole, fp16,
    strip_optimizer's fields), so ``YOLO(path)`` loads, validates and exports it. Returns the
    blocks left as yoloprune classes (see :func:`native`). Written via a temporary file."""
    from datetime import datetime

    ultralytics = require_ultralytics(str(path))
    from ultralytics.cfg import DEFAULT_CFG_DICT

    exported, kept = native(model)
    exported = exported.float().eval()
    exported.names = dict(enumerate(names))
    exported.args = {**DEFAULT_CFG_DICT, "imgsz": imgsz, "task": "detect"}
    for p in exported.parameters():
        p.requires_grad_(False)
    checkpoint = {
        "date": datetime.now().astimezone().isoformat(),
        "version": ultralytics.__version__,
        "license": "AGPL-3.0 (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "epoch": -1,
        "best_fitness": None,
        "model": exported.half(),
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": dict(exported.args),
        "train_metrics": {},
        "train_results": {},
        "producer": "yoloprune",
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return kept


def rebuild_release(pickled, state: dict[str, torch.Tensor], path: str) -> nn.Module:
    """Rebuild an ultralytics checkpoint's model from its stand-in record (read without
    executing pickle code): its YAML through the extra, its tensors loaded strictly, its class
    names kept; then checked and canonicalised like a YAML model."""
    cfg = getattr(pickled, "yaml", None)
    if not isinstance(cfg, dict):
        raise ModelError(f"{path}: the pickled model carries no 'yaml' dict; re-save it")
    model = construct(cfg, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = first_line(exc)
        raise ModelError(
            f"{path}: tensors do not fit the architecture in its own YAML ({first}); is it an "
            f"unmodified ultralytics detection checkpoint?"
        ) from exc
    from yoloprune.graphs.checkpoint import checked_class_names

    names = checked_class_names(getattr(pickled, "names", None), len(model.names))
    model.names = dict(enumerate(names))
    check_supported(model, path)
    return canonicalize(model).float().eval()


def detect_head(model: nn.Module) -> nn.Module:
    return model.model[-1]


def attention_convs(model: nn.Module) -> list[nn.Conv2d]:
    """Every conv inside an attention module (qkv, proj, pe), in module order."""
    convs = []
    for module in model.modules():
        if type(module).__name__ in ATTENTION_MODULES:
            convs.extend(m for m in module.modules() if isinstance(m, nn.Conv2d))
    return convs


def has_one2one(model: nn.Module) -> bool:
    """Whether the head has YOLO26's NMS-free one-to-one branch (end-to-end capable)."""
    return getattr(detect_head(model), "one2one_cv2", None) is not None


def branch_convs(model: nn.Module, one2one: bool) -> set[str]:
    """Names of every conv in the head's one-to-one branches (``one2one_cv2/cv3``), or in its
    one-to-many ones (``cv2/cv3``)."""
    head = detect_head(model)
    prefix = next(name for name, module in model.named_modules() if module is head)
    attrs = ("one2one_cv2", "one2one_cv3") if one2one else ("cv2", "cv3")
    return {
        f"{prefix}.{attr}.{name}"
        for attr in attrs
        for name, module in getattr(head, attr).named_modules()
        if isinstance(module, nn.Conv2d)
    }


def head_branches(raw: dict) -> list[dict]:
    """The raw outputs (boxes, scores, feats) of each head branch: one-to-many, then YOLO26's
    one-to-one where present."""
    return [raw[k] for k in ("one2many", "one2one") if k in raw] or [raw]


def trace_outputs(out) -> list[torch.Tensor]:
    """The raw box and score tensors of every head branch (eval mode returns (decoded, raw)):
    tracing them covers the one-to-one branch even where inference decodes only one."""
    return [branch[key] for branch in head_branches(out[1]) for key in ("boxes", "scores")]


def head_convs(model: nn.Module) -> list[nn.Conv2d]:
    """Convs whose outputs are the model's interface: the last conv of every box and class
    branch (one-to-many and one-to-one) and the DFL conv."""
    head = detect_head(model)
    convs = []
    for attr in ("cv2", "cv3", "one2one_cv2", "one2one_cv3"):
        branches = getattr(head, attr, None)
        if branches is None:
            continue
        for branch in branches:
            convs.append(branch[-1])
    dfl = getattr(head, "dfl", None)
    if dfl is not None and hasattr(dfl, "conv"):
        convs.append(dfl.conv)
    return convs


class DeploymentDFL(nn.Module):
    """Deployment form of ultralytics' ``DFL`` (same result, up to float rounding): the
    expectation over the bins as two weighted sums of max-shifted exponentials, taken on the
    bins' own axis, with no Softmax and no Transpose.

    DFL's own form, ``conv(x.view(b, 4, c1, a).transpose(2, 1).softmax(1))``, exports a Softmax
    over axis 1 of a 4-D tensor, which ONNX Runtime's CPU provider runs by transposing around
    it: 3.5 ms of an 80 ms yolov8s at 640 on 2 cores, the same in the pruned model, which
    pruning cannot shrink. A last-axis softmax (a transpose, then a matmul with the bins) took
    0.66 ms on 8400 anchors; this form takes 0.28 ms."""

    def __init__(self, dfl: nn.Module):
        super().__init__()
        self.c1 = dfl.c1
        bins = dfl.conv.weight.detach().reshape(1, self.c1)
        self.register_buffer("weights", torch.cat((bins, torch.ones_like(bins))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        x = x.view(b, 4, self.c1, a)
        exps = (x - x.amax(2, keepdim=True)).exp()
        sums = self.weights @ exps  # (2, c1) @ (b, 4, c1, a): numerator and normaliser
        return sums[:, :, 0] / sums[:, :, 1]


def for_deployment(model: nn.Module) -> nn.Module:
    """Swap, in place, the head's DFL for :class:`DeploymentDFL` (a no-op where the head has no
    DFL, e.g. YOLO26's reg_max 1). For exported and evaluated copies only: the checkpoint
    keeps ultralytics' own module."""
    head = detect_head(model)
    dfl = getattr(head, "dfl", None)
    if dfl is not None and type(dfl).__name__ == "DFL":
        head.dfl = DeploymentDFL(dfl)
    return model
