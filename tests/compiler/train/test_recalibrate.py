import re

import pytest
import torch
from torch import nn

from tests.helpers import tiny_cfg
from yoloprune.compiler.train.data import read_data_yaml
from yoloprune.compiler.train.recalibrate import (
    batchnorms,
    recalibrate_batchnorm,
    recalibrate_on_data,
)
from yoloprune.compiler.train.synthetic import SyntheticSpec, generate
from yoloprune.graphs.errors import PlanError
from yoloprune.graphs.yolov5 import DetectionModel


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8, momentum=0.03),
        nn.SiLU(),
        nn.Conv2d(8, 4, 1, bias=False),
        nn.BatchNorm2d(4, momentum=0.03),
    ).eval()


def test_statistics_are_the_average_over_the_batches():
    net = small_net()
    batches = [torch.randn(4, 3, 8, 8) * 2 + 1 for _ in range(3)]
    # what each BN sees in train mode: the layers before it normalise by batch statistics
    seen = {id(bn): [] for bn in batchnorms(net)}
    hooks = [
        bn.register_forward_pre_hook(lambda m, x: seen[id(m)].append(x[0].detach().clone()))
        for bn in batchnorms(net)
    ]
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k}
    assert recalibrate_batchnorm(net, batches) == 12
    for h in hooks:
        h.remove()
    for bn in batchnorms(net):
        inputs = seen[id(bn)]
        mean = torch.stack([x.mean((0, 2, 3)) for x in inputs]).mean(0)
        var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in inputs]).mean(0)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
        assert bn.momentum == 0.03  # restored
    for k, v in weights.items():
        if "num_batches" not in k:
            assert torch.equal(net.state_dict()[k], v), k  # no weight changed
    assert not net.training


def test_recalibrated_model_normalises_what_it_sees():
    """Negative control included: stale statistics (a shifted input) leave BN outputs off-centre,
    re-estimated ones bring them back to mean 0, variance 1."""
    net = small_net()
    recalibrate_batchnorm(net, [torch.randn(64, 3, 8, 8)])
    shifted = torch.randn(64, 3, 8, 8) * 3 + 2
    with torch.no_grad():
        stale = net[:2](shifted)
        assert stale.mean((0, 2, 3)).abs().max() > 0.1
        recalibrate_batchnorm(net, [shifted])
        fresh = net[:2](shifted)
    torch.testing.assert_close(fresh.mean((0, 2, 3)), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(fresh.var((0, 2, 3)), torch.ones(8), atol=2e-3, rtol=0)


def test_no_images_is_an_error_that_leaves_the_statistics_as_they_were():
    net = small_net()
    recalibrate_batchnorm(net, [torch.randn(8, 3, 8, 8) + 1])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(PlanError, match="saw no images"):
        recalibrate_batchnorm(net, [])

    def failing():
        yield torch.randn(4, 3, 8, 8)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        recalibrate_batchnorm(net, failing())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not net.training and all(bn.momentum == 0.03 for bn in batchnorms(net))


def test_one_value_per_channel_is_a_clear_error_that_leaves_the_statistics():
    net = small_net()
    recalibrate_batchnorm(net, [torch.randn(8, 3, 8, 8) + 1])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(PlanError, match=r"one value per channel.*--no-recalibrate"):
        recalibrate_batchnorm(net, [torch.randn(4, 3, 2, 2), torch.randn(1, 3, 1, 1)])
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert recalibrate_batchnorm(net, [torch.randn(2, 3, 1, 1)]) == 2  # two values: fine


def test_recalibrate_on_data_names_the_file_in_its_errors(tmp_path):
    data_yaml = generate(tmp_path / "d", SyntheticSpec(train=1, val=1, imgsz=32), progress=False)
    cfg = tiny_cfg()
    cfg["nc"] = read_data_yaml(data_yaml).nc
    model = DetectionModel(cfg).eval()
    with pytest.raises(PlanError, match=f"^{re.escape(str(data_yaml))}: .*one value per channel"):
        recalibrate_on_data(model, data_yaml, 32, batches=1, batch=4)


def test_recalibrate_on_data_reads_training_images(tmp_path):
    data_yaml = generate(tmp_path / "d", SyntheticSpec(train=12, val=2, imgsz=64), progress=False)
    cfg = tiny_cfg()
    cfg["nc"] = read_data_yaml(data_yaml).nc
    model = DetectionModel(cfg).eval()
    before = [bn.running_mean.clone() for bn in batchnorms(model)]
    assert recalibrate_on_data(model, data_yaml, 64, batches=2, batch=5) == 10
    assert all(
        not torch.equal(bn.running_mean, b) for bn, b in zip(batchnorms(model), before, strict=True)
    )
    assert recalibrate_on_data(model, data_yaml, 64, batches=20, batch=5) == 12  # one pass
