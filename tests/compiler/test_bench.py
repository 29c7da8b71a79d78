import json

import pytest
import yaml

from tests.helpers import ort_profile, tiny_cfg
from yoloprune.compiler.bench import BenchSettings, bench, time_models
from yoloprune.compiler.cli import main
from yoloprune.graphs.errors import YoloPruneError
from yoloprune.kernels.profile import split_against


@pytest.fixture
def two_models(tmp_path):
    small = tiny_cfg()
    large = dict(small, width_multiple=0.5)
    paths = []
    for name, cfg in (("small.yaml", small), ("large.yaml", large)):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg))
        paths.append(str(path))
    return paths


@pytest.mark.timing
def test_bench_ort_orders_models_and_states_conditions(two_models):
    settings = BenchSettings(runtime="ort", batch=2, imgsz=96, runs=9, warmup=2, threads=1)
    result = bench([two_models[1], two_models[0]], settings)
    assert [r["model"] for r in result["rows"]] == [two_models[1], two_models[0]]
    large, small = result["rows"]
    assert large["ratio"] == 1.0 and small["ratio"] < 1.0  # 4x fewer MACs is faster
    assert small["images_per_s"] == pytest.approx(2e3 / small["median_ms"])
    assert (result["runtime"], result["device"], result["precision"]) == ("ort", "cpu", "fp32")
    assert result["batch"] == 2 and result["imgsz"] == 96 and result["threads"] == 1
    assert result["spinning"] is False and "A B A B" in result["order"]
    assert result["machine"]["cpu"]


def test_bench_torch_cpu_and_time_models(two_models, tiny_model):
    settings = BenchSettings(runtime="torch", device="cpu", imgsz=64, runs=3, warmup=1)
    result = bench(two_models, settings)
    assert result["precision"] == "fp32" and len(result["rows"]) == 2
    timings = time_models({"a": tiny_model}, BenchSettings(runs=3, warmup=1, threads=1), 64)
    assert timings["a"].runs == 3 and timings["a"].median_ms > 0


def test_bench_cli_writes_json(tmp_path, two_models, capsys):
    out = tmp_path / "bench" / "result.json"
    code = main(
        ["bench", *two_models, "--imgsz", "64", "--runs", "5", "--warmup", "1", "--out", str(out)]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 2 and result["runs"] == 5
    printed = capsys.readouterr().out
    assert "median ms" in printed and "precision" not in printed.splitlines()[2]  # one precision
    from yoloprune.kernels.ort import machine_text

    assert f"machine: {machine_text(result['machine'])}" in printed  # on the console too
    code = main(["bench", *two_models, "--imgsz", "64", "--runs", "6", "--spinning"])
    assert code == 0 and "blocks of 5" in capsys.readouterr().out


def test_bench_profile_splits_each_ratio_against_the_first(tmp_path, two_models, capsys):
    out = tmp_path / "profiled.json"
    argv = ["bench", two_models[1], two_models[0], "--imgsz", "64", "--runs", "4", "--profile"]
    assert main([*argv, "--warmup", "1", "--threads", "1", "--out", str(out)]) == 0
    large, small = json.loads(out.read_text())["rows"]
    assert "split" not in large  # the reference
    assert small["profile"]["runs"] == 4
    # width_multiple 0.5 against 0.25: about 4x the convolution MACs, counted from the profile
    assert 3.0 < large["profile"]["conv_macs"] / small["profile"]["conv_macs"] < 4.5
    split = small["split"]
    assert split["conv_macs_ratio"] == pytest.approx(
        small["profile"]["conv_macs"] / large["profile"]["conv_macs"]
    )
    parts = split["macs_share"] + split["conv_efficiency_lost"] + split["rest"]
    assert parts == pytest.approx(split["ratio"])
    assert split["ratio"] == pytest.approx(
        small["profile"]["kernel_ms"] / large["profile"]["kernel_ms"]
    )
    printed = capsys.readouterr().out
    assert "where the time goes (ONNX Runtime's profiler, 4 runs each" in printed
    assert "floor" in printed and "GMAC/s" in printed


def test_profile_table_flags_slow_profiled_runs():
    from yoloprune.compiler.bench import render_profiles

    base, small = ort_profile([(2.0, 400_000_000)], 1.0), ort_profile([(1.0, 100_000_000)], 1.0)
    rows = [  # profiled runs: 4 ms and 3 ms (kernels plus 1 ms)
        {"model": "a.onnx", "median_ms": 4.0, "profile": base.to_dict()},
        {"model": "b.onnx", "median_ms": 1.5, "profile": small.to_dict()},
    ]
    rows[1]["split"] = split_against(small, base)
    text = "\n".join(render_profiles(rows))
    assert "note: 1 of 2 models' profiled runs took more than 1.1x their timed median" in text
    # b: 0.1 GMAC at a's 200 GMAC/s is 0.5 ms of a's 3 ms, run in 1 ms; 1 ms of other operators
    (line,) = [line for line in text.splitlines() if line.startswith("b.onnx") and "+" in line]
    assert line.split()[1:] == ["0.667", "0.167", "+0.167", "0.333", "0.500"]
    rows[1]["median_ms"] = 3.0
    assert "note:" not in "\n".join(render_profiles(rows))


def test_profile_refuses_int8_files_and_a_first_model_without_convolutions(tmp_path):
    from yoloprune.compiler.bench import add_profiles
    from yoloprune.kernels.latency_table import ConvShape, conv_onnx

    model = conv_onnx(ConvShape(8, 16, 3, 1, 1, 16, 16), 1)
    model.metadata_props.add(key="precision", value="int8")
    path = tmp_path / "m.int8.onnx"
    path.write_bytes(model.SerializeToString())
    settings = BenchSettings(imgsz=16, runs=2, warmup=0, threads=1, profile=True)
    with pytest.raises(YoloPruneError, match="an INT8 file; --profile splits fp32 and fp16"):
        bench([str(path)], settings)
    rows = [{"model": "none.onnx"}, {"model": "b.onnx"}]
    no_convs = [ort_profile([], 1.0), ort_profile([(1.0, 100)], 1.0)]
    with pytest.raises(YoloPruneError, match=r"none\.onnx: no convolution time in its profile"):
        add_profiles(rows, no_convs)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["missing.onnx"], "file not found"),
        (["m.yaml", "--runtime", "torch", "--profile"], "use it with --runtime ort, not torch"),
        (["m.yaml", "--runtime", "ort", "--precision", "fp16"], "at its own precision"),
        (["m.yaml", "--batch", "0"], "argument --batch: 0 is not in [1, 4096]"),
        (["m.yaml", "--device", "cpu"], "--device set PyTorch's runtime: use with --runtime torch"),
        (["m.yaml", "--cuda-graph"], "--cuda-graph set PyTorch's runtime: use with --runtime"),
    ],
)
def test_bench_bad_input(tmp_path, argv, message, capsys):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(tiny_cfg()))
    argv = [str(tmp_path / a) if a.endswith((".yaml", ".onnx")) else a for a in argv]
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_onnx_files_must_take_the_batch_and_size_they_are_fed(tmp_path, tiny_model, capsys):
    """Checked before any timing: a fixed batch, another size than the first file's or
    --imgsz, and an --out folder are one line each (ONNX Runtime raised from inside)."""
    from yoloprune.compiler.export import export_onnx

    at64 = str(export_onnx(tiny_model, tmp_path / "a64.onnx", 64))
    at96 = str(export_onnx(tiny_model, tmp_path / "a96.onnx", 96))
    cases = [
        ([at64, "--batch", "4"], f"{at64}: takes batch 1 (exported without --dynamic)"),
        ([at64, "--imgsz", "96"], f"{at64}: takes 64x64 images, not 96x96"),
        ([at64, at96], f"{at96}: takes 96x96 images, not 64x64"),
        ([at64, "--out", str(tmp_path)], "is a folder; give the JSON file path"),
    ]
    for argv, message in cases:
        assert main(["bench", *argv, "--runs", "1", "--warmup", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_tensorrt_runtime_without_tensorrt_is_a_clear_error(two_models, capsys):
    pytest.importorskip("onnx")
    from yoloprune.kernels.tensorrt import available

    if available()[0]:
        pytest.skip("TensorRT is present")
    assert main(["bench", two_models[0], "--runtime", "tensorrt", "--imgsz", "64"]) == 2
    assert "TensorRT" in capsys.readouterr().err


def test_settings_defaults():
    assert BenchSettings(runtime="torch").resolved_precision() == "fp16"
    assert BenchSettings(runtime="torch", device="cpu").resolved_precision() == "fp32"
    assert BenchSettings(runtime="tensorrt").resolved_precision() == "fp32"  # must be the ONNX's
    with pytest.raises(YoloPruneError, match="--runtime"):
        BenchSettings(runtime="openvino")


def test_build_without_tensorrt_fails_cleanly(tmp_path, tiny_model, capsys):
    from yoloprune.compiler.export import export_onnx
    from yoloprune.kernels.tensorrt import available

    if available()[0]:
        pytest.skip("TensorRT is present")
    onnx_path = export_onnx(tiny_model, tmp_path / "m.onnx", 64)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["build", str(onnx_path), "--triton", str(tmp_path / "repo")]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written
    assert main(["build", str(tmp_path / "none.onnx")]) == 2
    assert "ONNX file not found" in capsys.readouterr().err


def test_a_table_of_files_at_several_precisions_says_each_ones():
    from yoloprune.compiler.bench import render

    row = {"median_ms": 2.0, "p90_ms": 2.1, "min_ms": 1.9, "ratio": 1.0, "images_per_s": 500.0}
    result = {
        "runtime": "onnxruntime", "device": "cpu", "precision": "per row", "batch": 1,
        "imgsz": 64, "runs": 5, "warmup": 1,
        "machine": {"cpu": "CPU", "cpu_flags": ["avx2"], "cores_available": 2},
        "rows": [{**row, "model": "m.onnx", "precision": "fp32"},
                 {**row, "model": "m.fp16.onnx", "precision": "fp16", "ratio": 0.5}],
    }  # fmt: skip
    lines = render(result).splitlines()
    assert lines[1] == "machine: CPU (avx2), 2 cores" and lines[2].endswith("  precision")
    assert lines[3].endswith("  fp32") and lines[4].endswith("  fp16")
