"""The model-YAML validator: real definitions pass unchanged, everything else is named."""

from __future__ import annotations

import copy

import pytest
from torch import nn

from tests.helpers import V50_TINY, needs_ultralytics, shipped_cfg, tiny_cfg
from yoloprune.graphs import ultralytics_family
from yoloprune.graphs.checkpoint import CFG_DIR
from yoloprune.graphs.errors import ModelError
from yoloprune.graphs.model_yaml import canonical_activation, parse_activation, validate_model_yaml

ULTRALYTICS_YAMLS = (
    "yolov8n.yaml",
    "yolo11s.yaml",
    "yolo26n.yaml",
    "yolov8s-p2.yaml",
    "yolo12n.yaml",
)


@pytest.mark.parametrize("name", sorted(p.name for p in CFG_DIR.glob("*.yaml")))
def test_every_shipped_yolov5_yaml_passes_unchanged(name):
    cfg = shipped_cfg(name)
    assert validate_model_yaml(cfg, "yolov5") == cfg
    assert validate_model_yaml(V50_TINY, "yolov5") == V50_TINY


@needs_ultralytics
@pytest.mark.parametrize("name", ULTRALYTICS_YAMLS)
def test_the_ultralytics_package_yamls_pass_unchanged(name):
    from ultralytics.nn.tasks import yaml_model_load

    cfg = yaml_model_load(name)
    assert validate_model_yaml(cfg, "ultralytics") == cfg


def test_the_result_is_a_copy_of_plain_values():
    cfg = tiny_cfg()
    checked = validate_model_yaml(cfg, "yolov5")
    checked["backbone"][0][3][0] = 999
    assert cfg["backbone"][0][3][0] != 999


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("nn.SiLU()", nn.SiLU()),
        ("torch.nn.SiLU()", nn.SiLU()),
        ("nn.LeakyReLU(0.1)", nn.LeakyReLU(0.1)),
        ("nn.LeakyReLU(0.1, inplace=True)", nn.LeakyReLU(0.1, inplace=True)),
        (" nn.Hardswish( ) ", nn.Hardswish()),
    ],
)
def test_activation_specs_are_parsed_by_our_own_code(spec, expected):
    module = parse_activation(spec)
    assert type(module) is type(expected)
    assert getattr(module, "negative_slope", None) == getattr(expected, "negative_slope", None)
    again = parse_activation(canonical_activation(module))  # the spec we write back
    assert type(again) is type(module)
    assert getattr(again, "negative_slope", None) == getattr(module, "negative_slope", None)


@pytest.mark.parametrize(
    "spec",
    [
        "__import__('os').system('true')",
        "nn.SiLU() or __import__('os')",
        "nn.Linear(2, 3)",
        "nn.LeakyReLU(0.1, 0.2)",
        "nn.LeakyReLU(1e999)",
        "nn.LeakyReLU(slope=0.1)",
        "os.system('true')",
        "nn.SiLU",
        "x" * 200,
        12,
    ],
)
def test_anything_else_in_activation_is_refused(spec):
    with pytest.raises(ModelError, match="activation"):
        parse_activation(spec)


def changed(change) -> dict:
    cfg = copy.deepcopy(tiny_cfg())
    change(cfg)
    return cfg


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c.update(nc=True), "key 'nc'"),
        (lambda c: c.update(nc=100_001), "key 'nc'"),
        (lambda c: c.update(depth_multiple=float("nan")), "key 'depth_multiple'"),
        (lambda c: c.update(anchors=[[10, 13, 16]]), "same even number of values"),
        (lambda c: c.update(anchors="anchors"), "key 'anchors'"),
        (lambda c: c.update(activation=["nn.SiLU()"]), "key 'activation'"),
        (lambda c: c.pop("head"), "no 'head' key"),
        (lambda c: c.update(backbone="Conv"), "key 'backbone': expected a list of layers"),
        (lambda c: c["backbone"].__setitem__(0, [-1, 1, "Conv"]), "[from, repeats, module"),
        (lambda c: c["backbone"].__setitem__(0, [0, 1, "Conv", [8, 3]]), "must name earlier"),
        (lambda c: c["backbone"].__setitem__(1, [-1, 1, "Conv", [10_000, 3]]), "channel count"),
        (lambda c: c["backbone"].__setitem__(1, [-1, 1, "Conv", [8, {"k": 3}]]), "not allowed"),
        (lambda c: c["backbone"].__setitem__(1, [-1, 1, "Conv", [8, [[[3]]]]]), "not allowed"),
        (lambda c: c["backbone"].__setitem__(1, [-1, 1, "Conv", [8] * 11]), "at most 10"),
        (lambda c: c["backbone"].__setitem__(1, [-1, 100, "C3", [8]]), "repeats 100"),
        (lambda c: c["head"].__setitem__(1, [-1, 1, "nn.Upsample", [None, 2, "bicubic"]]), "nn."),
        (lambda c: c["head"].__setitem__(2, [[-1, 6], 1, "Concat", [0]]), "Concat joins"),
        (lambda c: c["head"].append([-1, 1, "Conv", [8]]), "last layer must be Detect"),
        (lambda c: c["head"].extend([[-1, 1, "Conv", [8]]] * 600), "expected a list of layers"),
    ],
)
def test_each_bad_value_is_refused_naming_its_place(change, message):
    with pytest.raises(ModelError, match=None) as refused:
        validate_model_yaml(changed(change), "yolov5")
    assert message in str(refused.value)
    assert len(str(refused.value).splitlines()) == 1


def test_the_families_allow_different_blocks():
    cfg = changed(lambda c: c["backbone"].__setitem__(2, [-1, 1, "C2f", [64, True]]))
    with pytest.raises(ModelError, match="'C2f' is not a yolov5 block"):
        validate_model_yaml(cfg, "yolov5")
    with pytest.raises(ModelError, match="unknown model family"):
        validate_model_yaml(cfg, "darknet")


@needs_ultralytics
def test_ultralytics_restricted_parsing_is_a_second_wall(monkeypatch):
    """With our validator bypassed, ultralytics' own restricted parsing (switched on by
    construct) still refuses a function named as a module, and the activation string never
    reaches ultralytics at all."""
    from ultralytics.nn.modules.conv import Conv
    from ultralytics.nn.tasks import yaml_model_load

    monkeypatch.setattr(ultralytics_family, "validate_model_yaml", lambda cfg, family: cfg)
    cfg = yaml_model_load("yolov8n.yaml")
    cfg["backbone"][0] = [-1, 1, "torch_safe_load", ["nothing.pt"]]
    with pytest.raises(ModelError, match="not a permitted model layer"):
        ultralytics_family.construct(cfg, "test.pt")
    cfg = yaml_model_load("yolov8n.yaml")
    cfg["activation"] = "nn.LeakyReLU(0.25)"
    default = Conv.default_act
    model = ultralytics_family.construct(cfg, "test.pt")
    assert Conv.default_act is default  # restored
    acts = [m.act for m in model.modules() if type(m) is Conv]
    assert acts and all(isinstance(a, nn.LeakyReLU) and a.negative_slope == 0.25 for a in acts)
    assert model.yaml["activation"] == "nn.LeakyReLU(0.25)"
