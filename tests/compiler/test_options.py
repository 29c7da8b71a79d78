"""Options are validated and resolved once, into the settings each pass takes."""

from pathlib import Path

import pytest

from yoloprune.compiler.options import CompileOptions, allocation_image_count
from yoloprune.compiler.planner import Constraints, Target
from yoloprune.compiler.planners import PLANNERS
from yoloprune.graphs.dependency import GroupingLimits
from yoloprune.graphs.errors import PlanError


def test_defaults_resolve_in_one_place():
    settings = CompileOptions("m.yaml").settings
    assert settings.target == Target("macs", 0.5)
    assert settings.constraints == Constraints(round_to=8, max_ratio=0.8, drop_blocks=False)
    assert settings.grouping == GroupingLimits()
    assert (settings.planner, settings.importance) == ("uniform", "l2")
    assert settings.latency is None and settings.train is None
    assert settings.out == Path("runs/compile") and settings.bench_runs == 20
    assert settings.parity_tolerance == 1e-3


def test_given_values_are_honoured_not_replaced():
    options = CompileOptions(
        "m.yaml",
        ratio=0.3,
        round_to=16,
        max_ratio=0.6,
        group_seconds=5.0,
        bench_runs=3,
        parity_tolerance=0.01,
        out=Path("x"),
        data=Path("d.yaml"),
        epochs=3,
        lr0=0.002,
        optimizer="adamw",
        distill=0.0,
        reconstruct=False,  # reconstruction, the default importance and allocation would read
        importance="l2",  # d.yaml
        allocation="uniform",
    )
    s = options.settings
    assert s.target == Target("ratio", 0.3) and s.constraints.round_to == 16
    assert s.constraints.max_ratio == 0.6 and s.grouping.seconds == 5.0
    assert s.bench_runs == 3 and s.parity_tolerance == 0.01 and s.out == Path("x")
    train = s.train
    assert (train.epochs, train.lr0, train.optimizer, train.distill) == (3, 0.002, "adamw", 0.0)
    assert train.batch == 8 and not train.augment  # not given: the compile's defaults
    assert options.settings is s  # resolved once


def test_fine_tune_defaults_are_distilled_adamw_with_one_update_per_batch():
    given = {
        "data": Path("d.yaml"),
        "reconstruct": False,
        "importance": "l2",
        "allocation": "uniform",
    }
    train = CompileOptions("m.yaml", epochs=2, **given).settings.train
    assert (train.optimizer, train.distill, train.batch, train.augment) == ("adamw", 1.0, 8, False)
    assert train.lr0 is None and train.default_lr0 == 0.003
    assert train.nominal_batch is None and train.warmup == 0.25 and train.warmup_bias_lr is None
    sgd_train = CompileOptions(
        "m.yaml", epochs=2, optimizer="sgd", distill=0.0, **given
    ).settings.train
    assert (sgd_train.optimizer, sgd_train.distill, sgd_train.default_lr0) == ("sgd", 0.0, 0.01)
    given_back = CompileOptions("m.yaml", epochs=2, batch=16, augment=True, **given).settings.train
    assert (given_back.batch, given_back.augment) == (16, True)
    assert train.eval_every == 1  # mAP after every epoch unless --eval-every says otherwise
    assert (
        train.seed == 0
        and CompileOptions("m.yaml", epochs=2, seed=3, **given).settings.train.seed == 3
    )
    seldom = CompileOptions("m.yaml", epochs=4, eval_every=0, **given).settings.train
    assert seldom.eval_every == 0
    with pytest.raises(PlanError, match=r"^--eval-every -1: must be an integer in \[0, 10000\]"):
        CompileOptions("m.yaml", epochs=4, eval_every=-1, **given)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"batch": 8}, "--batch"),
        ({"augment": False}, "--no-augment"),
        ({"augment": True, "lr0": 0.01}, "--lr0, --augment"),
        ({"distill": 0.0, "optimizer": "sgd"}, "--distill, --optimizer"),
        ({"eval_every": 0}, "--eval-every"),
        ({"amp": True}, "--amp"),
        ({"amp": False}, "--no-amp"),
    ],
)
def test_fine_tune_flags_without_epochs_are_refused(flags, named):
    with pytest.raises(PlanError, match=f"^{named} set the fine-tune.*add --epochs or drop them"):
        CompileOptions("m.yaml", **flags)
    with pytest.raises(PlanError, match=f"^{named} set the fine-tune"):
        CompileOptions("m.yaml", epochs=0, **flags)


@pytest.mark.parametrize(
    ("changes", "planner"),
    [
        ({"macs": 0.6}, "uniform"),
        ({"macs": 0.6, "global_allocation": True}, "global"),
        ({"macs": 0.6, "latency_aware": True}, "latency-aware"),
        ({"macs": 0.6, "latency_aware": True, "drop_blocks": True}, "latency-aware"),
        ({"speedup": 2.0}, "latency"),
        ({"latency_ms": 30.0}, "latency"),
        ({"ratio": 0.3, "method": "unstructured"}, "unstructured"),
    ],
)
def test_flags_select_a_registered_planner(changes, planner):
    settings = CompileOptions("m.yaml", threads=1, **changes).settings
    assert settings.planner == planner and planner in PLANNERS
    latency = planner.startswith("latency")
    assert (settings.latency is not None) == latency
    if latency:
        assert settings.latency.runtime == "ort" and settings.latency.threads == 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"macs": 0.5, "drop_blocks": True}, "--drop-blocks needs a latency-aware plan"),
        ({"ratio": 0.3, "latency_aware": True}, "--latency-aware plans a --macs target"),
        (
            {"macs": 0.5, "latency_aware": True, "global_allocation": True},
            "--allocation global: latency plans allocate",
        ),
        ({"speedup": 2.0, "allocation": "uniform"}, "--allocation uniform: latency plans"),
        (
            {"macs": 0.5, "latency_aware": True, "allocation": "sensitivity", "drop_blocks": True},
            "--drop-blocks with --allocation sensitivity",
        ),
        (
            {"macs": 0.5, "latency_aware": True, "allocation": "sensitivity"},
            "--allocation sensitivity measures on",
        ),
        ({"macs": 0.5, "allocation": "sensitivity"}, "--allocation sensitivity measures on"),
        ({"macs": 0.5, "allocation": "random"}, "--allocation random: use one of"),
        ({"allocation": "sensitivity", "global_allocation": True}, "--global is --allocation"),
        ({"macs": 0.5, "allocation_images": 8}, "--allocation-images 8 sizes"),
        ({"macs": 0.5, "method": "unstructured"}, "--method unstructured takes --ratio"),
        ({"importance": "taylor"}, "--importance taylor needs --data"),
        ({"speedup": 2.0, "steps": 2}, "--steps takes --macs or --ratio"),
        ({"ratio": 0.3, "method": "unstructured", "steps": 2}, "structured planning only"),
        ({"macs": 0.5, "ratio": 0.3}, "give one target"),
        ({"ratio": 0.3, "method": "unstructured", "round_to": 16}, "--round-to do not apply"),
        ({"calib_images": Path("."), "calib_count": 8}, "--calib-count apply to INT8 only"),
        ({"precision_parity_tolerance": 0.1}, "fp16/int8 file's tolerance"),
        ({"macs": 0.5, "latency_table": Path("t.json")}, "per-layer table .* drop it"),
        ({"macs": 0.5, "round_to": 16, "latency_batch": 8}, "--latency-batch 8 .* drop it"),
        ({"speedup": 2.0, "latency_batch": 0}, "--latency-batch"),
    ],
)
def test_combinations_that_select_nothing_are_refused_before_any_work(changes, message):
    with pytest.raises(PlanError, match=message):
        CompileOptions("m.yaml", **changes)


def test_latency_batch_is_what_planners_and_the_profile_measure_at():
    assert CompileOptions("m.yaml", speedup=2.0, latency_batch=8).settings.latency.batch == 8
    assert CompileOptions("m.yaml", macs=0.5, latency_batch=4).settings.alignment.batch == 4
    assert CompileOptions("m.yaml", speedup=2.0).settings.latency.batch == 1


def test_a_replayed_plan_refuses_flags_it_would_ignore(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text("{}")  # read only when the compile runs
    assert CompileOptions("m.yaml", plan=plan).settings.planner == "replay"
    with pytest.raises(PlanError, match=r"replays its own target and settings: drop --macs"):
        CompileOptions("m.yaml", plan=plan, macs=0.5)
    with pytest.raises(PlanError, match="drop --method"):
        CompileOptions("m.yaml", plan=plan, method="unstructured")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("calib")
    for i in range(3):
        Image.new("RGB", (32, 24), (40 * i, 0, 0)).save(folder / f"{i}.png")
    return folder


def test_reconstruction_is_on_wherever_images_are_at_hand(image_folder):
    assert CompileOptions("m.yaml").settings.reconstruction is None  # no images: none
    rebuilt = CompileOptions("m.yaml", calib_images=image_folder).settings.reconstruction
    assert rebuilt.settings.images == 128 and len(rebuilt.files) == 3
    assert str(image_folder) in rebuilt.source
    sized = CompileOptions("m.yaml", calib_images=image_folder, reconstruct_images=2, seed=4)
    assert sized.settings.reconstruction.settings.images == 2
    assert (
        sized.settings.reconstruction.settings.seed == 4
        and len(sized.settings.reconstruction.files) == 2
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"reconstruct_images": 8}, "reconstruction reads images"),
        ({"reconstruct_images": 8, "reconstruct": False}, "drop --no-reconstruct"),
        (
            {
                "calib_images": "FOLDER",
                "reconstruct": False,
                "importance": "l2",
                "allocation": "uniform",
            },
            "none runs here",
        ),
        (
            {"calib_images": "FOLDER", "method": "unstructured", "ratio": 0.3},
            "none runs here",
        ),
        ({"reconstruct_images": 0}, "reconstruct-images 0: must be an integer"),
    ],
)
def test_reconstruction_flags_that_would_do_nothing_are_refused(image_folder, changes, message):
    if changes.get("calib_images") == "FOLDER":
        changes = {**changes, "calib_images": image_folder}
    with pytest.raises(PlanError, match=message):
        CompileOptions("m.yaml", **changes)


def test_images_make_sensitivity_the_default_allocation_with_a_target_relative_floor(image_folder):
    """With unlabeled images a --macs/--ratio plan is allocated by measured sensitivity, its
    --max-ratio 0.6 down to MACs 0.5 and max(0.6, 1 - (uniform kept)^(8/3)) below, at most
    0.9 (the rule alone reaches 1, which --max-ratio refuses, at MACs 0.018 or --ratio 0.87);
    without images, uniform; latency plans keep importance pricing unless sensitivity is asked
    for."""
    floors = {}
    for macs in (0.9, 0.5, 0.35, 0.3, 0.2, 0.1, 0.01):
        settings = CompileOptions("m.yaml", macs=macs, calib_images=image_folder).settings
        assert settings.planner == "sensitivity" and settings.group_sensitivity
        floors[macs] = settings.constraints.max_ratio
    assert floors == {0.9: 0.6, 0.5: 0.6, 0.35: 0.75, 0.3: 0.8, 0.2: 0.88, 0.1: 0.9, 0.01: 0.9}
    for value, floor in ((0.5, 0.84), (0.87, 0.9)):
        ratio = CompileOptions("m.yaml", ratio=value, calib_images=image_folder).settings
        assert ratio.planner == "sensitivity" and ratio.constraints.max_ratio == floor
    with pytest.raises(PlanError, match=r"--max-ratio 0.9 \(its default here\) lets any group"):
        CompileOptions("m.yaml", ratio=0.95, calib_images=image_folder).settings  # noqa: B018
    given = CompileOptions("m.yaml", macs=0.35, calib_images=image_folder, max_ratio=0.6)
    assert given.settings.constraints.max_ratio == 0.6  # honoured
    without = CompileOptions("m.yaml", macs=0.35).settings
    assert without.planner == "uniform" and without.constraints.max_ratio == 0.8
    aware = CompileOptions("m.yaml", macs=0.5, latency_aware=True, calib_images=image_folder)
    assert aware.settings.planner == "latency-aware" and not aware.settings.group_sensitivity


def test_sensitivity_allocation_reads_the_first_calibration_images_and_floors_at_0_4(image_folder):
    options = CompileOptions("m.yaml", calib_images=image_folder, allocation="sensitivity")
    settings = options.settings
    assert settings.planner == "sensitivity" and settings.allocation_images is None
    counts = [allocation_image_count(None, size) for size in (128, 256, 320, 640, 1280)]
    assert counts == [32, 32, 20, 8, 8] and allocation_image_count(3, 640) == 3
    assert settings.constraints.max_ratio == 0.6  # this allocation's default
    given = CompileOptions(
        "m.yaml", calib_images=image_folder, allocation="sensitivity", max_ratio=0.7,
        allocation_images=2,
    ).settings  # fmt: skip
    assert given.constraints.max_ratio == 0.7 and given.allocation_images == 2
    assert CompileOptions("m.yaml", allocation="global").settings.planner == "global"
    for latency in ({"macs": 0.5, "latency_aware": True}, {"speedup": 2.0}):
        priced = CompileOptions(
            "m.yaml", calib_images=image_folder, allocation="sensitivity", **latency
        ).settings
        assert priced.planner.startswith("latency") and priced.group_sensitivity
        assert priced.constraints.max_ratio == 0.6 and priced.latency is not None
    assert not CompileOptions("m.yaml", macs=0.5, latency_aware=True).settings.group_sensitivity
    plan = image_folder / "plan.json"
    plan.write_text("{}")  # read only when the compile runs
    with pytest.raises(PlanError, match="replays its own target and settings: drop --allocation"):
        CompileOptions("m.yaml", plan=plan, allocation="sensitivity")
