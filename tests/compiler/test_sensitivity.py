"""INT8 sensitivity pass: the most mAP-costly convs are kept out of INT8, within tolerance."""

import copy
import dataclasses

import pytest

from yoloprune.compiler.quantize import Calibration, CalibrationRecord, calibration_batches
from yoloprune.compiler.quantize import quantized as fake_quantized
from yoloprune.compiler.sensitivity import (
    Sensitivity,
    keep_sensitive,
    quantized_convs,
    spread_indices,
)
from yoloprune.graphs.errors import PlanError


@pytest.fixture(scope="module")
def quantized_once(tiny_model, tmp_path_factory):
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("sens")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    batches = calibration_batches(Calibration(folder).files, 64, CalibrationRecord())
    return fake_quantized(tiny_model, batches)[0]


@pytest.fixture
def quantized(quantized_once):
    """A fresh copy per test: the pass changes the model in place."""
    return copy.deepcopy(quantized_once)


def stand_in_measure(costs: dict[str, float]):
    """mAP 0.9 in float, minus a fixed cost per quantized conv: the pass sees only this."""
    calls = []

    def measure(model) -> float:
        calls.append(1)
        return 0.9 - sum(costs[name] for name in quantized_convs(model))

    return measure, calls


def test_the_most_costly_convs_are_kept_until_within_tolerance(quantized):
    names = list(quantized_convs(quantized))
    costs = dict.fromkeys(names, 0.0001)
    costs[names[3]], costs[names[7]], costs[names[1]] = 0.02, 0.01, 0.004
    measure, calls = stand_in_measure(costs)
    record = keep_sensitive(quantized, measure, Sensitivity(0.01), progress=False)
    kept = [entry["conv"] for entry in record["kept_in_float"]]
    assert kept == [names[3], names[7]]  # most costly first; stops once within 0.01
    assert record["map50_95_float"] == pytest.approx(0.9)
    assert record["map50_95_int8"] == pytest.approx(0.9 - sum(costs.values()))
    assert record["within_tolerance"] and 0.9 - record["map50_95_after"] <= 0.01
    assert record["kept_in_float"][0]["map_cost_alone"] == pytest.approx(0.02)
    assert set(quantized_convs(quantized)) == set(names) - set(kept)  # Q/DQ gone from those
    assert len(calls) == 2 + len(names) + 2  # float, int8, one per conv, one per kept conv


def test_nothing_is_kept_when_int8_is_within_tolerance(quantized):
    names = list(quantized_convs(quantized))
    measure, calls = stand_in_measure(dict.fromkeys(names, 0.0001))
    record = keep_sensitive(quantized, measure, Sensitivity(0.05), progress=False)
    assert record["kept_in_float"] == [] and len(calls) == 2 and record["within_tolerance"]


def test_at_most_a_quarter_of_the_convs_are_kept(quantized):
    names = list(quantized_convs(quantized))
    measure, _ = stand_in_measure(dict.fromkeys(names, 0.01))
    record = keep_sensitive(quantized, measure, Sensitivity(0.0), progress=False)
    assert len(record["kept_in_float"]) == len(names) // 4 and not record["within_tolerance"]


def test_spread_takes_evenly_spaced_samples_in_order():
    assert spread_indices(100, 10) == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert spread_indices(100, 500) == list(range(100))  # fewer than asked: all of them


def test_a_drop_needs_int8_and_data(tiny_yaml, tmp_path, capsys):
    from yoloprune.compiler.cli import main
    from yoloprune.compiler.options import CompileOptions

    with pytest.raises(PlanError, match="--int8-max-map-drop apply to INT8 only"):
        CompileOptions(str(tiny_yaml), int8_max_map_drop=0.01)
    with pytest.raises(PlanError, match=r"--int8-max-map-drop 1\.5: must be in"):
        CompileOptions(str(tiny_yaml), int8_max_map_drop=1.5)
    argv = ["export", str(tiny_yaml), "--out", str(tmp_path / "m.onnx"), "--precision", "int8"]
    assert main([*argv, "--calib-images", str(tmp_path), "--int8-max-map-drop", "0.01"]) == 2
    assert "--int8-max-map-drop measures mAP: add --data" in capsys.readouterr().err


def test_sensitivity_images_need_a_drop(tiny_yaml, tmp_path):
    from yoloprune.compiler.options import CompileOptions

    data = tmp_path / "d.yaml"
    data.write_text(f"path: {tmp_path}\ntrain: .\nval: .\nnames: [a, b, c]\n")
    common = dict(precision="int8", calib_images=tmp_path, data=data)
    with pytest.raises(PlanError, match="--int8-sensitivity-images sizes the pass"):
        CompileOptions(str(tiny_yaml), int8_sensitivity_images=128, **common)


def test_the_pass_measures_on_train_images_held_out_from_val_and_calibration(shapes_data):
    """Convs chosen on the val split would flatter the val mAP the report gives for the file;
    costs measured on the calibration images would read low."""
    from yoloprune.compiler.evaluation.evaluate import val_dataset
    from yoloprune.compiler.sensitivity import measured_files
    from yoloprune.compiler.train.data import image_files, read_data_yaml

    config = read_data_yaml(shapes_data)
    train = image_files(config.train)
    calibrating = train[::2]
    measured, left_out = measured_files(config, 4, exclude=calibrating)
    assert left_out == len(calibrating)
    assert len(measured) == 4 and not set(measured) & set(calibrating)
    assert set(measured) <= set(train[1::2])  # evenly spread over what is left
    assert measured[0] == train[1] and measured[-1] == train[-1]
    reported = {p.resolve() for p in val_dataset(config, 64).files}
    assert not {p.resolve() for p in measured} & reported
    with pytest.raises(PlanError, match="'train' split \\(the val split stays"):
        measured_files(dataclasses.replace(config, train=()), 4)
    with pytest.raises(PlanError, match="every train image calibrates INT8"):
        measured_files(config, 4, exclude=train)


def test_an_unlabelled_train_split_is_refused_before_any_work(shapes_data, tiny6_yaml, tmp_path):
    """Unlabelled images score mAP 0 in float and INT8 alike: the pass would keep nothing and
    call it within tolerance. Refused when the options are read."""
    import shutil

    from yoloprune.compiler.options import CompileOptions

    root = tmp_path / "unlabelled"
    shutil.copytree(shapes_data.parent / "images", root / "images")
    shutil.copytree(shapes_data.parent / "labels" / "val", root / "labels" / "val")
    data = root / "data.yaml"
    data.write_text(
        shapes_data.read_text().replace(str(shapes_data.parent), str(root)), encoding="utf-8"
    )
    common = dict(precision="int8", data=data, int8_max_map_drop=0.01)
    with pytest.raises(PlanError, match="none of the 16 it picked has a label file"):
        CompileOptions(str(tiny6_yaml), calib_images=root / "images" / "val", **common)
    labelled = {**common, "data": shapes_data}
    CompileOptions(str(tiny6_yaml), calib_images=root / "images" / "val", **labelled)
