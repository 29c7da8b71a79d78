"""Release checkpoints load safely and reproduce their outputs; pruned checkpoints round-trip."""

import copy
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import yoloprune.graphs.yolov5 as ours
from tests.helpers import V50_TINY, images, randomized, tiny_cfg
from yoloprune.graphs.checkpoint import describe, load_model, save_pruned
from yoloprune.graphs.errors import CheckpointError
from yoloprune.graphs.yolov5 import DetectionModel

YOLOV5_CLASSES = {
    "models.common": [
        "Conv",
        "Focus",
        "Bottleneck",
        "BottleneckCSP",
        "C3",
        "SPP",
        "SPPF",
        "Concat",
    ],
    "models.yolo": ["Detect", "DetectionModel"],
}


@pytest.fixture
def yolov5_modules(monkeypatch):
    """Classes named as the yolov5 repository names them, registered only while saving."""
    fakes = {}
    package = types.ModuleType("models")
    monkeypatch.setitem(sys.modules, "models", package)
    for module_name, names in YOLOV5_CLASSES.items():
        module = types.ModuleType(module_name)
        monkeypatch.setitem(sys.modules, module_name, module)
        for name in names:
            fake = type(name, (getattr(ours, name),), {"__module__": module_name})
            setattr(module, name, fake)
            fakes[name] = fake
    yield fakes


def as_yolov5_pickle(model: DetectionModel, fakes: dict, *, v50: bool = False) -> nn.Module:
    """Turn our model into what yolov5 pickles: its class names and Detect's attribute layout."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if type(module).__name__ in fakes:
            module.__class__ = fakes[type(module).__name__]
    detect = model.model[-1]
    stride = detect._buffers.pop("stride")
    object.__setattr__(detect, "stride", stride)  # yolov5 keeps stride as a plain attribute
    detect.grid = [torch.empty(0)] * detect.nl
    if v50:  # v5.0 registered anchor_grid as a buffer
        detect.register_buffer(
            "anchor_grid", detect.anchors.clone().view(detect.nl, 1, -1, 1, 1, 2)
        )
    else:
        detect.anchor_grid = [torch.empty(0)] * detect.nl
    model.yaml_file = "yolov5s.yaml"
    model.hyp = {"lr0": 0.01, "box": 0.05}
    model.class_weights = torch.ones(model.nc)
    model.names = {i: f"class{i}" for i in range(model.nc)}
    return model


def save_like_train_py(model: nn.Module, path: Path) -> None:
    """What yolov5's train.py + strip_optimizer leave on disk."""
    ckpt = {
        "epoch": -1,
        "best_fitness": np.array([0.4213]),
        "model": copy.deepcopy(model).half(),
        "ema": None,
        "updates": None,
        "optimizer": None,
        "opt": {"weights": "yolov5s.pt", "epochs": 300, "imgsz": 640},
        "git": {"remote": "", "branch": "master", "commit": "abc"},
        "date": "2025-01-01T00:00:00",
    }
    torch.save(ckpt, path)


def reference_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The checkpoint's own outputs: its half-precision weights, computed in fp32."""
    reference = copy.deepcopy(model).half().float().eval()
    with torch.no_grad():
        decoded, _ = reference(x)
    return decoded


@pytest.mark.parametrize("v50", [False, True])
def test_release_checkpoint_loads_and_reproduces_outputs(tmp_path, yolov5_modules, v50):
    original = randomized(DetectionModel(V50_TINY if v50 else tiny_cfg()))
    path = tmp_path / "yolov5-like.pt"
    save_like_train_py(as_yolov5_pickle(original, yolov5_modules, v50=v50), path)
    for name in ["models", "models.common", "models.yolo"]:
        del sys.modules[name]  # the loader must not need (or import) yolov5 code
    x = images()
    model, info = load_model(path)
    with torch.no_grad():
        decoded, _ = model(x)
    assert torch.allclose(decoded, reference_outputs(original, x), atol=1e-5, rtol=0)
    assert info.pretrained and info.nc == original.nc
    assert info.names == tuple(f"class{i}" for i in range(original.nc))
    assert info.stride == (8.0, 16.0, 32.0)
    assert info.anchors == describe(original, "x", pretrained=False).anchors
    assert "models" not in sys.modules


def test_activation_and_bn_eps_come_from_the_checkpoint(tmp_path, yolov5_modules):
    original = randomized(DetectionModel(tiny_cfg()))
    for module in original.modules():  # an older checkpoint: Hardswish convs, default eps
        if isinstance(module, ours.Conv):
            module.act = nn.Hardswish()
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 1e-5
    save_like_train_py(as_yolov5_pickle(original, yolov5_modules), tmp_path / "old.pt")
    model, _ = load_model(tmp_path / "old.pt")
    assert isinstance(model.model[0].act, nn.Hardswish)
    x = images()
    with torch.no_grad():
        assert torch.allclose(model(x)[0], reference_outputs(original, x), atol=1e-5, rtol=0)


def test_ema_is_preferred_over_model(tmp_path, yolov5_modules):
    a, b = (
        randomized(DetectionModel(tiny_cfg()), seed=1),
        randomized(DetectionModel(tiny_cfg()), seed=2),
    )
    ckpt = {
        "model": as_yolov5_pickle(a, yolov5_modules).half(),
        "ema": as_yolov5_pickle(b, yolov5_modules).half(),
        "epoch": 3,
    }
    torch.save(ckpt, tmp_path / "last.pt")
    model, _ = load_model(tmp_path / "last.pt")
    x = images()
    with torch.no_grad():
        assert torch.allclose(model(x)[0], reference_outputs(b, x), atol=1e-5, rtol=0)


class Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/yoloprune-pwned",))


def test_foreign_code_is_refused_and_never_runs(tmp_path):
    marker = Path("/tmp/yoloprune-pwned")
    marker.unlink(missing_ok=True)
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(
        CheckpointError, match=r"evil\.pt: refused to load: the pickle names \w+\.system"
    ):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()


def test_unknown_yolov5_class_is_refused(tmp_path, monkeypatch):
    package, module = types.ModuleType("models"), types.ModuleType("models.experimental")
    package.experimental = module
    monkeypatch.setitem(sys.modules, "models", package)
    monkeypatch.setitem(sys.modules, "models.experimental", module)
    ensemble = type("Ensemble", (nn.ModuleList,), {"__module__": "models.experimental"})
    module.Ensemble = ensemble
    torch.save({"model": ensemble()}, tmp_path / "ensemble.pt")
    with pytest.raises(CheckpointError, match=r"models\.experimental\.Ensemble"):
        load_model(tmp_path / "ensemble.pt")


def test_missing_file_says_where_to_put_it(tmp_path, monkeypatch):
    """A bare name: nothing is downloaded, put it here; a path: check it."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        CheckpointError, match=r"^yolov5x\.pt: file not found here or among the shipped weights"
    ):
        load_model("yolov5x.pt")
    with pytest.raises(CheckpointError, match=r"^runs/x\.pt: file not found; check the path"):
        load_model("runs/x.pt")


@pytest.mark.parametrize("name", ["model.onnx", "model.ENGINE", "missing/model.onnx"])
def test_an_exported_model_is_refused_by_name(tmp_path, name):
    path = tmp_path / name
    if path.parent.exists():
        path.write_bytes(b"\x08\x07")  # an ONNX file's first bytes, or any
    with pytest.raises(CheckpointError, match="holds no PyTorch modules to prune; MODEL is the"):
        load_model(path)


def test_truncated_file(tmp_path, yolov5_modules):
    path = tmp_path / "cut.pt"
    save_like_train_py(as_yolov5_pickle(DetectionModel(tiny_cfg()), yolov5_modules), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path)


def test_non_yolo_checkpoint(tmp_path):
    torch.save({"state_dict": nn.Conv2d(3, 4, 1).state_dict()}, tmp_path / "resnet.pt")
    with pytest.raises(CheckpointError, match="not a YOLO checkpoint"):
        load_model(tmp_path / "resnet.pt")


def test_pruned_checkpoint_round_trips_with_weights_only(tmp_path, tiny_model):
    from yoloprune.compiler.apply import apply_plan
    from yoloprune.compiler.pipeline import CompileOptions, Prepared, plan_for
    from yoloprune.graphs.dependency import build_graph, channel_groups

    graph = build_graph(tiny_model)
    prepared = Prepared(
        tiny_model,
        describe(tiny_model, "tiny.yaml", pretrained=False, imgsz=64),
        64,
        channel_groups(tiny_model, graph),
        graph,
    )
    pruned = apply_plan(tiny_model, plan_for(prepared, CompileOptions("tiny.yaml", macs=0.5)))
    path = tmp_path / "tiny-pruned.pt"
    save_pruned(pruned, prepared.info, path)
    raw = torch.load(path, weights_only=True)  # plain containers and tensors only
    assert raw["format"] == "yoloprune.v1"
    reloaded, info = load_model(path)
    x = images()
    with torch.no_grad():
        assert torch.equal(reloaded(x)[0], pruned(x)[0])
    assert info.imgsz == 64 and info.meta["pruned"]
    assert [m.weight.shape for m in reloaded.modules() if isinstance(m, nn.Conv2d)] == [
        m.weight.shape for m in pruned.modules() if isinstance(m, nn.Conv2d)
    ]


def test_class_names_from_a_checkpoint_are_checked():
    from yoloprune.graphs.checkpoint import checked_class_names

    many = {i: f"c{i}" for i in reversed(range(12))}
    assert checked_class_names(many, 12) == [f"c{i}" for i in range(12)]
    assert checked_class_names(["a", "b"], 2) == ["a", "b"]
    for odd in ({0: "a", "x": "b"}, {0: "a", 2: "b"}, ["a"], "ab", None, [{"x": 1}, "b"]):
        assert checked_class_names(odd, 2) == ["0", "1"]


@pytest.mark.parametrize("content", [b"", b"# a README\n", b"\x89PNG\r\n"])
def test_a_file_torch_did_not_write_is_named_so_before_unpickling(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.pt: not a PyTorch checkpoint \("):
        load_model(path)


def test_module_records_reused_under_many_names_are_refused_not_walked():
    """A pickle's memo lets one record appear as two children at every level: 2^20 paths
    from 21 records. The walk stops at MAX_MODULE_PATHS with one line (it would hang)."""
    from yoloprune.graphs.checkpoint import (
        MAX_MODULE_PATHS,
        PickledObject,
        _pickled_modules,
    )

    leaf = PickledObject()
    leaf._modules = {}
    node = leaf
    for _ in range(20):
        parent = PickledObject()
        parent._modules = {"a": node, "b": node}
        node = parent
    with pytest.raises(CheckpointError, match="more than 100,000 module paths"):
        sum(1 for _ in _pickled_modules(node))
    small = PickledObject()
    small._modules = {"a": leaf, "b": leaf}  # a shared record (ultralytics' default_act): fine
    assert [p for p, _ in _pickled_modules(small)] == ["", "a", "b"]
    assert MAX_MODULE_PATHS == 100_000
