"""One-shot reconstruction: kept weights re-fitted to the original's outputs, no labels."""

import copy

import pytest
import torch

from tests.compiler.test_planner import prepared_for
from tests.helpers import ULTRALYTICS_MISSING, images, outputs, zero_removed_channels
from yoloprune.compiler.apply import apply_plan
from yoloprune.compiler.options import CompileOptions
from yoloprune.compiler.pipeline import plan_for
from yoloprune.compiler.reconstruct import (
    ReconstructSettings,
    kept_channels,
    reconstruct,
)
from yoloprune.graphs.checkpoint import WEIGHTS_DIR
from yoloprune.graphs.errors import PlanError

IMGSZ = 64


def calibration(count: int = 16, seed: int = 3) -> list[torch.Tensor]:
    return [images(8, IMGSZ, seed + i) for i in range(count // 8)]


@pytest.fixture(scope="module")
def planned(tiny_model):
    prepared = prepared_for(tiny_model, IMGSZ)
    plan = plan_for(prepared, CompileOptions("m.yaml", imgsz=IMGSZ, macs=0.5))
    return prepared, plan


def test_kept_channels_are_the_plans_indices(planned):
    prepared, plan = planned
    kept = kept_channels(prepared.model, lambda m: apply_plan(m, plan))
    for group in plan.groups:
        out_index, _ = kept[group.id]
        assert out_index.tolist() == sorted(group.keep)  # the root conv's kept outputs
    pruned = apply_plan(prepared.model, plan)
    for name, conv in pruned.named_modules():
        if isinstance(conv, torch.nn.Conv2d):
            original = prepared.model.get_submodule(name).weight
            out_index, in_index = kept[name]
            assert torch.equal(conv.weight, original[out_index][:, in_index])


def test_exact_surgery_stays_exact(planned):
    """Channels that carry zeros: the pruned model already reproduces the original, and the
    ridge solution (pulled towards the kept weights) must keep it so."""
    prepared, plan = planned
    zeroed = zero_removed_channels(prepared.model, plan)
    pruned = apply_plan(zeroed, plan)
    kept = kept_channels(zeroed, lambda m: apply_plan(m, plan))
    record = reconstruct(zeroed, pruned, kept, calibration(), progress=False)
    held_out = images(2, IMGSZ, seed=99)
    expected = outputs(zeroed, held_out)
    assert torch.allclose(outputs(pruned, held_out), expected, atol=1e-3, rtol=1e-4)
    # errors from float32 sums of squares: zero to their rounding (sqrt of float32's epsilon)
    assert record.output_error_before < 1e-3 and record.output_error_after < 1e-3
    assert record.convs_fitted == sum(isinstance(m, torch.nn.Conv2d) for m in pruned.modules())


def _distance(model, original, held_out) -> float:
    got, want = outputs(model, held_out), outputs(original, held_out)
    return float((got - want).norm() / want.norm())


def test_reconstruction_brings_outputs_back_on_unseen_images(tiny_model):
    size = 128  # deep layers see enough positions per image to fit on
    prepared = prepared_for(tiny_model, size)
    plan = plan_for(prepared, CompileOptions("m.yaml", imgsz=size, macs=0.5))
    pruned = apply_plan(prepared.model, plan)
    unseen = images(4, size, seed=77)
    before = _distance(pruned, prepared.model, unseen)
    kept = kept_channels(prepared.model, lambda m: apply_plan(m, plan))
    calibration = [images(8, size, seed) for seed in range(8)]
    record = reconstruct(prepared.model, pruned, kept, calibration, progress=False)
    after = _distance(pruned, prepared.model, unseen)
    assert after < 0.7 * before, (before, after)
    assert record.output_error_after < record.output_error_before
    assert record.images == 64 and record.positions_per_image == ReconstructSettings().samples // 64
    assert sum(record.dampings_chosen.values()) == record.convs_fitted


def test_reconstruction_is_deterministic_and_leaves_the_original_alone(planned):
    prepared, plan = planned
    original_state = copy.deepcopy(prepared.model.state_dict())
    kept = kept_channels(prepared.model, lambda m: apply_plan(m, plan))
    states = []
    for _ in range(2):
        pruned = apply_plan(prepared.model, plan)
        reconstruct(prepared.model, pruned, kept, calibration(), progress=False)
        states.append(pruned.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    for key, value in prepared.model.state_dict().items():
        assert torch.equal(value, original_state[key]), key


def test_no_images_is_refused(planned):
    prepared, plan = planned
    pruned = apply_plan(prepared.model, plan)
    kept = kept_channels(prepared.model, lambda m: apply_plan(m, plan))
    with pytest.raises(PlanError, match="no calibration images"):
        reconstruct(prepared.model, pruned, kept, [], progress=False)


@pytest.mark.skipif(ULTRALYTICS_MISSING is not None, reason=str(ULTRALYTICS_MISSING))
def test_ultralytics_head_is_refitted_and_the_dfl_left_alone():
    from yoloprune.compiler.pipeline import prepare
    from yoloprune.graphs.family import family_named

    weights = str(WEIGHTS_DIR / "yolov8n-shapes.pt")
    prepared = prepare(weights, imgsz=IMGSZ)
    plan = plan_for(prepared, CompileOptions(weights, imgsz=IMGSZ, macs=0.5))
    pruned = apply_plan(prepared.model, plan)
    dfl = family_named(prepared.info.family).unquantized(pruned)
    dfl_weight = dfl[0].conv.weight.clone()
    kept = kept_channels(prepared.model, lambda m: apply_plan(m, plan))

    head = family_named(prepared.info.family).head_convs

    def raw(model, x):  # every head conv's output, flattened
        caught = []
        handles = [c.register_forward_hook(lambda m, i, o: caught.append(o)) for c in head(model)]
        with torch.no_grad():
            model.eval()(x)
        for handle in handles:
            handle.remove()
        return torch.cat([o.flatten() for o in caught])

    x = images(4, IMGSZ, seed=5)
    want = raw(prepared.model, x)
    before = float((raw(pruned, x) - want).norm() / want.norm())
    record = reconstruct(prepared.model, pruned, kept, calibration(16), fixed=dfl, progress=False)
    after = float((raw(pruned, x) - want).norm() / want.norm())
    assert list(record.convs_skipped) == ["model.22.dfl.conv"]
    assert torch.equal(dfl[0].conv.weight, dfl_weight)
    assert after < 0.8 * before, (before, after)


def test_the_memory_estimate_grows_with_images_and_pixels(planned):
    from yoloprune.compiler.reconstruct import BASE_BYTES, memory_estimate, normal_equation_bytes

    prepared, plan = planned
    original, pruned = prepared.model, apply_plan(prepared.model, plan)
    fixed = BASE_BYTES + normal_equation_bytes(pruned)  # whatever the images
    small, double = (memory_estimate(original, pruned, 64, n) for n in (8, 16))
    assert double - fixed == pytest.approx(2 * (small - fixed), rel=1e-12)
    assert memory_estimate(original, pruned, 128, 8) > 3.5 * (small - fixed) + fixed
    widest = max(
        c.in_channels // c.groups * c.kernel_size[0] * c.kernel_size[1] + 1
        for c in pruned.modules()
        if isinstance(c, torch.nn.Conv2d)
    )
    assert normal_equation_bytes(pruned) == 6 * 8 * widest**2


def test_reconstruction_beyond_memory_is_one_line_and_writes_nothing(
    tiny6_yaml, shapes_data, tmp_path, monkeypatch, capsys
):
    """Refused before reconstruction decodes any image, naming how many images would fit (the
    sensitivity allocation's transient progress bar may come before it)."""
    from yoloprune.compiler import reconstruct
    from yoloprune.compiler.cli import main

    monkeypatch.setattr(reconstruct, "normal_equation_bytes", lambda pruned: 2**30)
    available = reconstruct.BASE_BYTES + 2**30 + 2**20  # a MiB for the images' share
    monkeypatch.setattr(reconstruct, "available_bytes", lambda: available)
    out = tmp_path / "out"
    argv = [str(tiny6_yaml), "--imgsz", "64", "--data", str(shapes_data), "--no-bench"]
    assert main(["compile", *argv, "--out", str(out)]) == 2
    bar = "sensitivity:"  # the bar's name, whatever its rate reads (group/s or s/group)
    err = [line for line in capsys.readouterr().err.splitlines() if bar not in line]
    err = [line for line in err if line.strip()]  # the bar erases itself (leave=False)
    assert len(err) == 1 and "reconstruction on 16 images at 64 px needs about" in err[0], err
    assert "--reconstruct-images" in err[0] and "--no-reconstruct" in err[0]
    assert not out.exists() or not any(out.iterdir())
