"""Residual blocks removed whole: which ones can go, and that removal is exact where the
block's residual branch carries zeros."""

import copy

import pytest
import torch

from tests.helpers import images, needs_ultralytics, outputs
from yoloprune.graphs.blocks import (
    drop_blocks,
    droppable_blocks,
    dropped_blocks,
    hidden_group,
    is_residual_block,
)
from yoloprune.graphs.dependency import build_graph, channel_groups


def silence_branch(model, block: str):
    """A copy whose block adds exactly zero: its last conv's BN outputs 0 and SiLU(0) = 0."""
    model = copy.deepcopy(model)
    bn = model.get_submodule(f"{block}.cv2.bn")
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.zero_()
    return model


def check_exact_drop(model, imgsz: int, outputs=outputs, atol: float = 1e-5):
    groups = channel_groups(model, build_graph(model))
    found = droppable_blocks(model, groups)
    assert found, "the model has residual bottlenecks"
    for gid, block in found.items():
        assert gid == hidden_group(block) and is_residual_block(model.get_submodule(block))
    blocks = sorted(found.values())
    x = images(2, imgsz)
    silenced = model
    for block in blocks:
        silenced = silence_branch(silenced, block)
    dropped = drop_blocks(copy.deepcopy(silenced), blocks)
    assert dropped_blocks(dropped) == tuple(blocks)
    assert all(isinstance(dropped.get_submodule(b), torch.nn.Identity) for b in blocks)
    expected, actual = outputs(silenced, x), outputs(dropped, x)
    assert torch.allclose(actual, expected, atol=atol, rtol=1e-5), (actual - expected).abs().max()
    # negative control: dropping live blocks changes the outputs
    live = outputs(drop_blocks(copy.deepcopy(model), blocks), x)
    assert (live - outputs(model, x)).abs().max() > 1e-2
    return found


def test_yolov5_residual_bottlenecks_drop_exactly(tiny_model):
    found = check_exact_drop(tiny_model, 64)
    # backbone C3s add their input; the head's C3s (shortcut=False) are not residual
    assert all(
        not b.startswith(("model.13.", "model.17.", "model.20.", "model.23."))
        for b in found.values()
    )
    assert "model.2.m.0" in found.values()


@needs_ultralytics
@pytest.mark.parametrize("spec", ["yolov8n.yaml", "yolo11n.yaml"])
def test_ultralytics_bottlenecks_drop_exactly(spec):
    """C2f/C3k2 concatenate every bottleneck's output: a dropped one passes its input on."""
    from tests.graphs.test_ultralytics_family import calibrated, decoded

    model, _ = calibrated(spec)
    found = check_exact_drop(model, 64, decoded, atol=1e-4)  # decoded: pixels
    assert "model.2.m.0" in found.values()


def test_only_residual_blocks_can_be_dropped(tiny_model):
    model = copy.deepcopy(tiny_model)
    with pytest.raises(ValueError, match=r"model\.13\.m\.0: not a residual block"):
        drop_blocks(model, ["model.13.m.0"])  # a head bottleneck without shortcut
    with pytest.raises(ValueError, match=r"model\.1: not a residual block"):
        drop_blocks(model, ["model.1"])
