import copy

import pytest
import torch

from tests.compiler.test_planner import prepared_for
from tests.helpers import tiny_cfg
from yoloprune.compiler.pipeline import CompileOptions, plan_for
from yoloprune.compiler.score import loss_gradients
from yoloprune.compiler.train.synthetic import SyntheticSpec, generate
from yoloprune.graphs.errors import PlanError
from yoloprune.graphs.yolov5 import DetectionModel


@pytest.fixture(scope="module")
def shapes_yaml(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "data"
    return generate(root, SyntheticSpec(train=32, val=4, imgsz=64), progress=False)


@pytest.fixture
def model(shapes_yaml):
    from yoloprune.compiler.train.data import read_data_yaml

    cfg = tiny_cfg()
    cfg["nc"] = read_data_yaml(shapes_yaml).nc
    torch.manual_seed(0)
    return DetectionModel(cfg).eval()


def test_loss_gradients_fill_grads_and_change_neither_weights_nor_bn_statistics(model, shapes_yaml):
    before = copy.deepcopy(model.state_dict())
    seen = loss_gradients(model, shapes_yaml, 64, batches=2, batch=8)
    assert seen == 16 and not model.training
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    for name, value in model.state_dict().items():  # running means, variances, counts too
        assert torch.equal(value, before[name]), name


def test_taylor_prunes_channels_that_carry_nothing_first(model, shapes_yaml):
    conv = model.get_submodule("model.9.cv2.conv")  # SPPF's output: its own conv + BN group
    bn = model.get_submodule("model.9.cv2.bn")
    dead = [1, 4, 6]
    with torch.no_grad():
        conv.weight[dead] = 0
        bn.weight[dead], bn.bias[dead] = 0, 0  # the channel's output is exactly zero
    options = CompileOptions("t", ratio=0.5, importance="taylor", data=shapes_yaml)
    plan = plan_for(prepared_for(model, 64), options)
    group = next(g for g in plan.groups if g.id == "model.9.cv2.conv")
    assert plan.importance == "taylor" and group.kept < group.size
    assert not set(dead) & set(group.keep)  # zero |weight x gradient|: removed first
    assert all(p.grad is None for p in model.parameters())  # scoring leaves no gradients
    again = plan_for(prepared_for(model, 64), options)
    assert again.groups == plan.groups  # fixed batches: the same plan


def test_taylor_without_data_is_a_clear_error(model):
    with pytest.raises(PlanError, match="needs --data"):
        plan_for(prepared_for(model, 64), CompileOptions("t", ratio=0.5, importance="taylor"))
