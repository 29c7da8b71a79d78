import pytest
import torch
from torch import nn

from tests.helpers import V50_TINY, shipped_cfg, tiny_cfg
from yoloprune.graphs.checkpoint import load_model
from yoloprune.graphs.errors import ModelError
from yoloprune.graphs.yolov5 import DetectionModel, parse_activation

# Parameter counts printed by the ultralytics/yolov5 v7.0 model summaries (unfused).
PUBLISHED_PARAMS = {
    "yolov5n.yaml": 1_872_157,
    "yolov5s.yaml": 7_235_389,
    "yolov5m.yaml": 21_190_557,
    "yolov5l.yaml": 46_563_709,
    "yolov5x.yaml": 86_749_405,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_shipped_yaml_matches_published_parameter_count(name):
    model = DetectionModel(shipped_cfg(name))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", ["yolov5n6.yaml", "yolov5s6.yaml"])
def test_p6_models_have_four_levels(name):
    model, info = load_model(name)
    assert info.stride == (8.0, 16.0, 32.0, 64.0)
    decoded, raw = model(torch.zeros(1, 3, 128, 128))
    assert len(raw) == 4
    assert decoded.shape == (1, 3 * (16 * 16 + 8 * 8 + 4 * 4 + 2 * 2), 85)


def test_detect_interface_and_anchor_units():
    model = DetectionModel(tiny_cfg()).eval()
    detect = model.detect
    assert detect.stride.tolist() == [8.0, 16.0, 32.0]
    # anchors are stored in grid units: YAML pixels / stride
    assert torch.allclose(detect.anchors[0, 0] * 8, torch.tensor([10.0, 13.0]))
    decoded, raw = model(torch.rand(2, 3, 64, 64))
    assert decoded.shape == (2, 3 * (64 + 16 + 4), 8)
    assert [r.shape for r in raw] == [(2, 3, 8, 8, 8), (2, 3, 4, 4, 8), (2, 3, 2, 2, 8)]
    assert ((decoded[..., 4:] >= 0) & (decoded[..., 4:] <= 1)).all()


def test_v50_blocks_and_activation_key(tiny_v50_model):
    kinds = {type(m).__name__ for m in tiny_v50_model.modules()}
    assert {"Focus", "BottleneckCSP", "SPP"} <= kinds
    conv_acts = [m.act for m in tiny_v50_model.modules() if type(m).__name__ == "Conv"]
    assert conv_acts
    assert all(isinstance(a, nn.LeakyReLU) and a.negative_slope == 0.1 for a in conv_acts)


def test_activation_parsing_never_evaluates():
    assert isinstance(parse_activation("nn.Hardswish()"), nn.Hardswish)
    assert parse_activation("nn.LeakyReLU(0.2)").negative_slope == 0.2
    with pytest.raises(ModelError, match="unsupported activation"):
        parse_activation("__import__('os').system('true')")


def test_unknown_module_is_a_clear_error():
    cfg = tiny_cfg()
    cfg["backbone"][2] = [-1, 1, "Transformer", [128]]
    with pytest.raises(ModelError, match="layer 2: module 'Transformer' is not a yolov5 block"):
        DetectionModel(cfg)


def test_missing_keys_are_a_clear_error():
    cfg = tiny_cfg()
    del cfg["anchors"]
    with pytest.raises(ModelError, match="no 'anchors' key"):
        DetectionModel(cfg)


def test_v50_config_builds_with_expected_strides():
    model = DetectionModel(V50_TINY)
    assert model.detect.stride.tolist() == [8.0, 16.0, 32.0]
