"""The compile job on a trained YOLO26 (NMS-free head): both export modes, parity, and mAP
measured on PyTorch and on the exported ONNX file."""

import json

import pytest

from tests.helpers import assert_no_broken_torchvision, needs_ultralytics
from yoloprune.compiler.cli import main
from yoloprune.compiler.train.synthetic import SyntheticSpec, generate
from yoloprune.graphs.checkpoint import WEIGHTS_DIR

pytestmark = needs_ultralytics
IMGSZ = 128
WEIGHTS = WEIGHTS_DIR / "yolo26n-shapes.pt"
MAP_AGREEMENT = 0.002  # ONNX-evaluated vs PyTorch-evaluated mAP@.5:.95


@pytest.fixture(scope="module")
def trained_yolo26(tmp_path_factory):
    """The YOLO26n trained on synthetic shapes (benchmarks/train_default_model.py --model
    yolo26n), with a small set of another seed at half its training size: a real detector, so
    the top-k parity and the mAP agreement mean something."""
    root = tmp_path_factory.mktemp("yolo26")
    spec = SyntheticSpec(train=64, val=16, imgsz=IMGSZ, seed=11)
    return WEIGHTS, generate(root / "data", spec, False)


@pytest.mark.parametrize(("mode", "dims"), [(None, [1, 300, 6]), ("raw", [1, 10, 336])])
def test_yolo26_compiles_in_both_export_modes_with_parity_and_map(
    trained_yolo26, tmp_path, mode, dims
):
    import onnx

    checkpoint, data_yaml = trained_yolo26
    out = tmp_path / "out"
    argv = ["compile", str(checkpoint), "--macs", "0.7", "--out", str(out), "--no-bench"]
    argv += ["--imgsz", str(IMGSZ), "--data", str(data_yaml), "--epochs", "1", "--batch", "8"]
    argv += ["--export-mode", mode] if mode else []
    # reconstruction on one mode, the other as before it (energy importance: test_cli's)
    argv += ["--reconstruct-images", "8"] if mode is None else ["--no-reconstruct"]
    argv += ["--importance", "l2"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["mode"] == (mode or "end2end")
    assert report["parity"]["ok"] and report["parity"]["max_abs_diff"] <= 1e-3
    graph = onnx.load(str(out / "yolo26n-shapes-pruned.onnx")).graph
    assert [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == dims
    accuracy = report["accuracy"]["map50_95"]
    assert set(accuracy) == {"original", "pruned", "finetuned", "onnx"}
    assert accuracy["original"] > 0.4  # a real detector: 0.60 at 128 px when written
    assert (report["reconstruction"] or {}).get("images") == (8 if mode is None else None)
    assert abs(accuracy["onnx"] - accuracy["finetuned"]) <= MAP_AGREEMENT
    assert_no_broken_torchvision()


def test_end2end_export_needs_a_one_to_one_head(tmp_path, capsys):
    argv = ["compile", "yolov8n.yaml", "--imgsz", "64", "--no-bench", "--out", str(tmp_path)]
    assert main([*argv, "--export-mode", "end2end"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "one-to-one" in err and "--export-mode raw" in err
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("mode", ["end2end", "raw"])
def test_yolo26_macs_count_the_head_branch_the_export_keeps(tmp_path, mode):
    """YOLO26 exports one head branch (end to end the one-to-one, raw the one-to-many): MACs,
    the target's and the report's, are those of the convs in the ONNX file, exactly."""
    from yoloprune.compiler.export import export_onnx
    from yoloprune.compiler.pipeline import deployed_skip, mac_counter, prepare
    from yoloprune.compiler.planner import conv_macs
    from yoloprune.kernels.profile import onnx_conv_macs

    prepared = prepare("yolo26n.yaml", 64)
    in_file = onnx_conv_macs(export_onnx(prepared.model, tmp_path / "m.onnx", 64, mode=mode))
    skip = deployed_skip(prepared.model, mode)
    assert skip and all(".one2one_" in n for n in skip) == (mode == "raw")
    assert conv_macs(prepared.model, 64, skip) == mac_counter(prepared, mode).macs() == in_file
    assert conv_macs(prepared.model, 64) > in_file  # both branches
    out = tmp_path / "out"
    argv = ["compile", "yolo26n.yaml", "--imgsz", "64", "--macs", "0.5", "--no-bench"]
    assert main([*argv, "--export-mode", mode, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["macs"]["before"] == in_file
    assert report["macs"]["after"] == onnx_conv_macs(out / "yolo26n-pruned.onnx")
    assert abs(report["macs"]["ratio"] / 0.5 - 1) <= 0.03


def test_heads_without_a_one_to_one_branch_count_every_conv():
    from yoloprune.compiler.pipeline import deployed_skip, prepare

    assert deployed_skip(prepare("yolov8n.yaml", 64).model, "raw") == set()


def test_sensitivity_allocation_keeps_more_of_the_yolo26_at_half_its_macs(trained_yolo26):
    """The YOLO26n's 16-channel groups (its DFL-free box branch among them) lose half their
    channels under the uniform allocation; measured per group, they are spared. Measured when
    written (MACs 0.5, round_to 8, 32 images reconstructed, no fine-tune): uniform 0.340,
    sensitivity 0.524, original 0.603."""
    from yoloprune.compiler.evaluation.evaluate import evaluate, torch_predictor, val_dataset
    from yoloprune.compiler.pipeline import CompileOptions, prepare, prune_in_memory
    from yoloprune.compiler.train.data import read_data_yaml

    checkpoint, data_yaml = trained_yolo26
    data = read_data_yaml(data_yaml)
    prepared = prepare(str(checkpoint), IMGSZ)
    val = val_dataset(data, IMGSZ)
    found = {}
    for allocation in ("uniform", "sensitivity"):
        options = CompileOptions(
            str(checkpoint), imgsz=IMGSZ, macs=0.5, data=data_yaml, round_to=8,
            reconstruct_images=32, allocation=allocation,
            allocation_images=16 if allocation == "sensitivity" else None,
        )  # fmt: skip
        job = prune_in_memory(options, prepared)
        assert abs(job["plan"].macs_ratio / 0.5 - 1) <= 0.03
        found[allocation] = evaluate(
            torch_predictor(job["pruned"]), val, data.names, progress=False
        )
    assert found["sensitivity"].map50_95 >= found["uniform"].map50_95 + 0.1
    assert job["plan"].sensitivity["images"] == 16
