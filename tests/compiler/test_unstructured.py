import pytest
import torch
from torch import nn

from tests.helpers import images, outputs
from yoloprune.compiler.unstructured import sparsify, sparsity
from yoloprune.graphs.errors import PlanError


def test_sparsify_zeroes_the_smallest_weights_and_keeps_shapes(tiny_model):
    sparse = sparsify(tiny_model, 0.3)
    assert sparsity(sparse) == pytest.approx(0.3, abs=0.01)
    assert sparsity(tiny_model) < 0.01  # the input is untouched
    for (name, a), (_, b) in zip(tiny_model.named_modules(), sparse.named_modules(), strict=True):
        if isinstance(a, nn.Conv2d):
            assert a.weight.shape == b.weight.shape, name
            kept = b.weight != 0
            if (~kept).any() and kept.any():  # every zeroed weight was no larger than the kept
                assert a.weight[~kept].abs().max() <= a.weight[kept].abs().min() + 1e-12
    assert not any(hasattr(m, "weight_orig") for m in sparse.modules())  # plain, no masks
    assert not torch.equal(outputs(sparse, images()), outputs(tiny_model, images()))


@pytest.mark.parametrize("amount", [0.0, 1.0, 1.5])
def test_amount_is_validated(tiny_model, amount):
    with pytest.raises(PlanError, match="strictly between 0 and 1"):
        sparsify(tiny_model, amount)


def test_a_replayed_unstructured_plan_keeps_its_zeros(tmp_path, tiny6_yaml, shapes_data, capsys):
    """Replayed with images at hand, an unstructured plan is neither reconstructed nor
    recalibrated (either would make its zeros dense again, as its fresh compile never does);
    asking for recalibration is refused with nothing written."""
    import json

    from yoloprune.compiler.cli import main

    first = tmp_path / "first"
    argv = ["compile", str(tiny6_yaml), "--imgsz", "64", "--no-bench"]
    assert main([*argv, "--method", "unstructured", "--ratio", "0.3", "--out", str(first)]) == 0
    plan = first / "tiny6-plan.json"
    replay = tmp_path / "replay"
    assert main([*argv, "--plan", str(plan), "--data", str(shapes_data), "--out", str(replay)]) == 0
    report = json.loads((replay / "report.json").read_text())
    assert report["sparsity"]["conv_weights_zero"] == pytest.approx(0.3, abs=0.01)
    assert report["reconstruction"] is None
    assert report["accuracy"]["batchnorm_recalibrated_on"] == 0
    refused = tmp_path / "refused"
    asked = [
        "--plan",
        str(plan),
        "--data",
        str(shapes_data),
        "--recalibrate",
        "--out",
        str(refused),
    ]
    assert main([*argv, *asked, "--no-reconstruct"]) == 2
    assert "--recalibrate follows channel pruning; the plan" in capsys.readouterr().err
    assert not refused.exists()
