"""The model-family registry: one interface answers what differs between families."""

import pytest
import torch
from torch import nn

from tests.helpers import needs_ultralytics
from yoloprune.graphs import family as families_module
from yoloprune.graphs.checkpoint import describe, load_model
from yoloprune.graphs.errors import ModelError
from yoloprune.graphs.family import (
    ModelFamily,
    family_for_name,
    family_for_pickled,
    family_named,
    family_of,
    register,
)


def test_yolov5_family_answers_for_its_models(tiny_model):
    family = family_of(tiny_model)
    assert family.name == "yolov5" and family.raw_layout == "yolov5"
    assert family.head_convs(tiny_model) == list(tiny_model.detect.m)
    assert set(family.protected_convs(tiny_model)) == set(tiny_model.detect.m)
    assert len(family.anchors(tiny_model)) == tiny_model.detect.nl
    assert not family.end2end_capable(tiny_model) and family.native_suffix is None
    assert family_for_pickled("models.yolo.DetectionModel") is family
    assert family_for_pickled("evil.module.Model") is None
    assert family_for_name("yolov5s.yaml") is None  # our YAMLs load as files, not names


@needs_ultralytics
def test_ultralytics_family_answers_for_yolo26():
    model, info = load_model("yolo26n.yaml")
    family = family_of(model)
    assert family.name == info.family == "ultralytics" and info.anchors == ()
    assert family_for_name("yolo26n.yaml") is family
    assert family.end2end_capable(model)  # YOLO26's one-to-one head
    reasons = set(family.protected_convs(model).values())
    assert any("attention" in r for r in reasons)  # C2PSA's attention convs stay whole
    halves = family.split_halves(model)
    assert halves and all(kind in ("C2f", "C3k2", "C2PSA") for _, kind, _ in halves)
    assert family_for_pickled("ultralytics.nn.tasks.DetectionModel") is family


def test_unknown_models_and_names_are_refused():
    with pytest.raises(ModelError, match=r"torch\.nn\.modules\.conv\.Conv2d is not a model"):
        family_of(nn.Conv2d(3, 8, 3))
    with pytest.raises(ModelError, match="unknown model family 'yolov9'"):
        family_named("yolov9")


class _ToyHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.m = nn.Conv2d(8, 6, 1)
        self.nc, self.stride = 1, torch.tensor([8.0])


class _ToyDetector(nn.Module):
    """A model of a family the registry does not ship."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=8, padding=1)
        self.head = _ToyHead()
        self.names, self.stride = ["thing"], self.head.stride

    def forward(self, x):
        raw = self.head.m(self.stem(x))
        return raw.flatten(2), [raw]


class _ToyFamily(ModelFamily):
    name, raw_layout = "toy", "yolov5"

    def owns(self, model):
        return isinstance(model, _ToyDetector)

    def owns_pickled(self, qualname):
        return False

    def rebuild_release(self, pickled, ckpt, path):
        raise NotImplementedError

    def rebuild(self, cfg, path):
        return _ToyDetector()

    def detect_head(self, model):
        return model.head

    def head_convs(self, model):
        return [model.head.m]

    def trace_outputs(self, out):
        return out[1]

    def deploy(self, model, mode, runtime_forms):
        return model


def test_a_registered_family_is_used_by_the_passes(monkeypatch):
    """Registering is all a new family needs: describe and grouping ask the registry."""
    from yoloprune.graphs.dependency import build_graph, channel_groups

    monkeypatch.setattr(families_module, "_REGISTRY", dict(families_module.families()))
    toy = register(_ToyFamily())
    model = _ToyDetector().eval()
    assert family_of(model) is toy and family_named("toy") is toy
    info = describe(model, "toy.pt", pretrained=False, imgsz=64)
    assert info.family == "toy" and info.nc == 1 and info.stride == (8.0,)
    groups = channel_groups(model, build_graph(model, imgsz=64))
    protected = [g for g in groups if g.protected]
    assert [g.id for g in protected] == ["head.m"]  # the head's output stays whole
    assert any(not g.protected and g.size == 8 for g in groups)  # the stem is prunable
    with pytest.raises(ValueError, match="already registered"):
        register(type("Other", (_ToyFamily,), {})())


def test_registering_first_keeps_the_built_in_families(monkeypatch):
    monkeypatch.setattr(families_module, "_REGISTRY", {})
    register(_ToyFamily())
    assert set(families_module.families()) == {"yolov5", "ultralytics", "toy"}
    with pytest.raises(ValueError, match="'yolov5' is already registered"):
        register(type("Impostor", (_ToyFamily,), {"name": "yolov5"})())
