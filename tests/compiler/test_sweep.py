"""sweep: several targets compiled from one trace, measured together, a recommendation."""

import dataclasses
import json
import math

import pytest

from yoloprune.compiler.cli import main
from yoloprune.compiler.options import CompileOptions
from yoloprune.compiler.sweep import SweepOptions, _front, _recommend, parse_values
from yoloprune.graphs.errors import PlanError


def test_sweep_compiles_every_point_and_recommends_within_the_drop(
    tmp_path, tiny6_yaml, shapes_data
):
    out = tmp_path / "sweep"
    argv = ["sweep", tiny6_yaml, "--imgsz", 64, "--macs", "0.8,0.5", "--data", shapes_data]
    argv += ["--max-map-drop", 1, "--bench-runs", 3, "--out", out, "--reconstruct-images", 8]
    assert main([str(a) for a in [*argv, "--importance", "l2"]]) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert [p["name"] for p in record["points"]] == ["macs-0.8", "macs-0.5"]
    for point, macs in zip(record["points"], (0.8, 0.5), strict=True):
        assert abs(point["macs_ratio"] / macs - 1) <= 0.03
        folder = out / point["folder"]
        assert (folder / point["onnx"]).is_file() and (folder / "report.json").is_file()
        report = json.loads((folder / "report.json").read_text())
        assert report["accuracy"]["map50_95"]["onnx"] == point["map50_95"]
        assert report["reconstruction"]["images"] == 8  # each point reconstructed
        assert point["latency_ms"] > 0 and point["latency_ratio"] > 0
        # the point's own report carries the latency the sweep measured for it
        timed = report["latency_ms"]["sweep"]
        assert (
            timed["median_ms"] == point["latency_ms"] and timed["ratio"] == point["latency_ratio"]
        )
        text = (folder / "report.md").read_text()
        assert "Latency: timed by the sweep with its other points (../sweep.md)" in text
        assert "--no-bench" not in text
        assert {"report.json", "report.md", point["onnx"]} <= set(point["files"])
        assert all((folder / name).is_file() for name in point["files"])
    # a drop of 1 admits every point: the fastest is recommended if it beats the original
    fastest = min(record["points"], key=lambda p: p["latency_ms"])
    beats = fastest["latency_ms"] < record["original"]["latency_ms"]
    assert record["recommended"]["name"] == (fastest["name"] if beats else None)
    assert set(record["front"]) <= {"macs-0.8", "macs-0.5"} and record["front"]
    assert (out / "sweep.png").stat().st_size > 0
    assert ("Recommended: " if beats else "No recommendation") in (out / "sweep.md").read_text()


@pytest.fixture
def stand_in_latency(monkeypatch, tmp_path):
    """A latency table path, and latency by the square root of the MACs for the table's convs
    and whole plans alike: the planner's rounds do not depend on this machine's timing (on a
    loaded machine the real 1.2x went out of reach: a fresh clone of 071340c)."""
    from tests.compiler.test_latency_planner import sqrt_macs
    from yoloprune.compiler import pipeline
    from yoloprune.kernels import latency_table

    def measure(plans):
        return {k: 10.0 * math.sqrt(p.macs_ratio) if p else 10.0 for k, p in plans.items()}

    monkeypatch.setattr(latency_table, "ort_measurer", lambda *args, **kwargs: sqrt_macs)
    monkeypatch.setattr(pipeline, "plan_latency_measure", lambda *args, **kwargs: measure)
    return tmp_path / "table.json"


def test_a_speedup_sweep_plans_on_measured_latency_and_fine_tunes_each_point(
    tmp_path, tiny6_yaml, shapes_data, stand_in_latency
):
    """--speedup points go through the latency planner (its closed loop recorded in each plan)
    and --epochs fine-tunes every point; --latency-ms picks the most accurate point within it."""
    out = tmp_path / "sweep"
    argv = ["sweep", tiny6_yaml, "--imgsz", 64, "--speedup", "1.2", "--data", shapes_data]
    argv += ["--epochs", 1, "--latency-ms", 1e4, "--bench-runs", 3]
    argv += ["--out", out, "--no-reconstruct", "--importance", "l2"]
    argv += ["--latency-table", stand_in_latency]
    assert main([str(a) for a in argv]) == 0
    record = json.loads((out / "sweep.json").read_text())
    (point,) = record["points"]
    assert record["target"] == "speedup" and point["name"] == "speedup-1.2"
    assert point["speedup"] == 1.2 and point["macs_ratio"] < 1
    report = json.loads((out / point["folder"] / "report.json").read_text())
    latency = report["plan"]["latency"]
    assert latency["baseline_ms"] == 10.0  # the stand-in's
    assert latency["rounds"] and latency["goal_ms"] == pytest.approx(latency["baseline_ms"] / 1.2)
    assert report["options"]["epochs"] == 1
    assert len(report["accuracy"]["finetune"]["history"]) == 1
    assert point["map50_95_pytorch"] == report["accuracy"]["map50_95"]["finetuned"]
    assert record["recommended"]["name"] == "speedup-1.2"  # the only point within 10 s


def test_a_target_the_planner_cannot_reach_is_listed_and_the_others_compiled(
    tmp_path, tiny6_yaml, shapes_data, capsys, stand_in_latency
):
    """--speedup 50,1.2: 50x is past what --max-ratio lets the planner remove. That point (the
    first: the shared trace is made with its options) is listed with the planner's reason,
    nothing of it is written (an earlier sweep's folder of that name is removed), and the
    sweep goes on; a sweep whose every target is out of reach is a one-line error with exit
    status 2 that leaves the folder as it was."""
    out = tmp_path / "sweep"
    for folder in (out / "speedup-50", tmp_path / "none" / "speedup-50"):  # earlier sweeps'
        folder.mkdir(parents=True)
        (folder / "report.json").write_text("{}")
    argv = ["sweep", tiny6_yaml, "--imgsz", 64, "--data", shapes_data, "--bench-runs", 3]
    argv += ["--out", out, "--no-reconstruct", "--importance", "l2"]
    argv += ["--latency-table", stand_in_latency]
    assert main([str(a) for a in [*argv, "--speedup", "50,1.2,60"]]) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert [p["name"] for p in record["points"]] == ["speedup-1.2"]
    unreachable, never_written = record["unreachable"]
    assert unreachable["name"] == "speedup-50" and unreachable["speedup"] == 50
    assert "cannot be met" in unreachable["why"] and "--max-ratio" in unreachable["why"]
    assert unreachable["earlier_folder_removed"] is True
    assert never_written["name"] == "speedup-60" and not never_written["earlier_folder_removed"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["speedup-1.2"]
    assert "| speedup-50 | 50 | not reachable: " in (out / "sweep.md").read_text()
    printed = capsys.readouterr().out
    assert "speedup-50     not reachable: " in printed
    assert printed.count(" an earlier sweep's point") == 1 and "speedup-50/, an" in printed
    assert main([str(a) for a in [*argv, "--speedup", "50,60", "--out", tmp_path / "none"]]) == 2
    message = capsys.readouterr().err.strip()
    assert "no target can be reached" in message and len(message.splitlines()) == 1
    assert not (tmp_path / "none" / "sweep.json").exists()
    assert (tmp_path / "none" / "speedup-50" / "report.json").read_text() == "{}"
    fresh = tmp_path / "fresh" / "sweep"  # a new folder: not left behind, empty
    assert main([str(a) for a in [*argv, "--speedup", "50,60", "--out", fresh]]) == 2
    assert not (tmp_path / "fresh").exists()


def _points(*rows):
    return [{"name": n, "latency_ms": t, "map50_95": m} for n, t, m in rows]


def test_front_and_recommendation_rules():
    points = _points(("a", 10.0, 0.80), ("b", 6.0, 0.78), ("c", 7.0, 0.70), ("d", 4.0, 0.60))
    assert _front(points) == ["d", "b", "a"]  # c is slower and worse than b
    record = {"points": points, "original": {"map50_95": 0.82, "latency_ms": 9.0}}
    base = CompileOptions("m.yaml")

    def pick(**criterion):
        options = SweepOptions.__new__(SweepOptions)  # rules only: no option checks
        object.__setattr__(options, "base", base)
        object.__setattr__(options, "max_map_drop", criterion.get("max_map_drop"))
        object.__setattr__(options, "latency_ms", criterion.get("latency_ms"))
        return _recommend(options, record)

    assert pick(max_map_drop=0.05)["name"] == "b"  # fastest with mAP >= 0.77
    assert pick(max_map_drop=0.021)["name"] is None  # only "a": slower than the original
    assert pick(latency_ms=7.5)["name"] == "b"  # most accurate within 7.5 ms
    assert pick(latency_ms=1.0)["name"] is None
    assert pick() is None


@pytest.mark.parametrize(
    ("text", "message"),
    [("0.9,x", "numbers separated by commas"), ("0.9,1.2", "every value must be in")],
)
def test_bad_point_lists_are_refused(text, message):
    with pytest.raises(PlanError, match=message):
        parse_values(text, "--macs", 0, 1, open_high=True)


def test_sweep_needs_data_and_distinct_points():
    base = CompileOptions("m.yaml")
    with pytest.raises(PlanError, match="add --data"):
        SweepOptions(base, "macs", (0.5,))
    with pytest.raises(PlanError, match="distinct values"):
        SweepOptions(base, "macs", (0.5, 0.5))


def test_two_values_naming_one_point_folder_are_refused(shapes_data):
    base = CompileOptions("m.yaml", data=shapes_data)
    with pytest.raises(PlanError, match=r"two values name the same point \(macs-0.123456\)"):
        SweepOptions(base, "macs", (0.1234561, 0.1234562))


@pytest.mark.parametrize("kind", ["macs", "speedup"])
def test_the_sweeps_timing_flags_are_taken_with_a_fixed_alignment(shapes_data, kind):
    """With --round-to fixed a --macs point times nothing itself: --latency-batch and
    --latency-runtime are the sweep's own (the compile would refuse them as unused); a
    --speedup point plans on measured latency and takes them itself."""
    from yoloprune.compiler.cli import build_parser, sweep_options

    argv = ["sweep", "m.yaml", "--data", str(shapes_data), f"--{kind}", "0.5,0.4"]
    if kind == "speedup":
        argv[-1] = "1.5,2"
    argv += ["--round-to", "8", "--latency-batch", "4", "--latency-runtime", "ort", "--dynamic"]
    sweep = sweep_options(build_parser().parse_args(argv))
    assert sweep.timing_batch == 4 and sweep.timing_runtime == "ort"
    point = sweep.point(sweep.values[0])
    if kind == "macs":
        assert sweep.latency_batch == 4 and point.latency_batch is None
    else:
        assert sweep.latency_batch is None and point.settings.latency.batch == 4
    with pytest.raises(PlanError, match=r"--latency-batch 0: must be an integer in \[1, 4096\]"):
        SweepOptions(sweep.base, kind, sweep.values, latency_batch=0)


def test_a_sweep_from_code_refuses_profiling_by_name(shapes_data):
    base = CompileOptions("m.yaml", data=shapes_data, profile=True)
    with pytest.raises(PlanError, match="no bench step to profile: profile the files it writes"):
        SweepOptions(base, "macs", (0.5,))


def test_a_batched_sweep_on_onnx_files_needs_a_batch_axis(shapes_data):
    from yoloprune.compiler.cli import build_parser, sweep_options

    base = CompileOptions("m.yaml", data=shapes_data, latency_batch=4)
    with pytest.raises(PlanError, match=r"--latency-batch 4: .* add --dynamic"):
        SweepOptions(base, "macs", (0.5,))
    argv = ["sweep", "m.yaml", "--data", str(shapes_data), "--speedup", "1.5,2"]
    argv += ["--round-to", "8", "--latency-batch", "8"]
    with pytest.raises(PlanError, match="add --dynamic"):
        sweep_options(build_parser().parse_args(argv))
    sweep = sweep_options(build_parser().parse_args([*argv, "--dynamic"]))  # a flag sweep takes
    assert sweep.base.dynamic and sweep.point(2.0).settings.latency.batch == 8


@pytest.mark.parametrize(
    ("runtime", "file", "text"),
    [
        (None, "onnx", "onnxruntime (CPUExecutionProvider, ORT_ENABLE_ALL), fp32"),
        ("torch", "checkpoint", "PyTorch cuda fp16"),
        ("tensorrt", "onnx", "TensorRT 11.4.0 (each ONNX file's precision)"),
    ],
)
def test_points_are_timed_on_the_latency_runtime(
    monkeypatch, tmp_path, shapes_data, runtime, file, text
):
    """The deployed models are timed where the sweep plans: ONNX files on ONNX Runtime by
    default, the pruned checkpoints against the in-memory original on PyTorch CUDA with
    --latency-runtime torch, the ONNX files as engines with tensorrt (timed by a stand-in here:
    no GPU); the baseline ONNX is exported as the points are (here: end2end)."""
    import types

    import torch

    from yoloprune.compiler import bench, sweep
    from yoloprune.kernels import tensorrt

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # options accept torch
    monkeypatch.setattr(tensorrt, "available", lambda: (True, "11.4.0"))
    base = CompileOptions(
        "m.pt", data=shapes_data, latency_runtime=runtime, out=tmp_path, latency_batch=2
    )
    base = dataclasses.replace(base, dynamic=True)  # ONNX files take the batch
    options = SweepOptions(base, "macs", (0.7, 0.5))
    seen = {}

    def time_sources(sources, settings, imgsz):
        seen.update(sources=sources, settings=settings, imgsz=imgsz)
        timings = {n: types.SimpleNamespace(median_ms=10.0 - i) for i, n in enumerate(sources)}
        described = {
            None: {"threads": 2},
            "torch": {"device": "cuda", "precision": "fp16"},
            "tensorrt": {"tensorrt": "11.4.0"},
        }[runtime]
        return timings, described

    monkeypatch.setattr(bench, "time_sources", time_sources)
    monkeypatch.setattr("yoloprune.kernels.torch_runtime.gpu_info", lambda: {"gpu": "Stand-in"})
    exported = []

    def export_baseline(model, path, imgsz, mode, options):
        exported.append((model, imgsz, mode, options))
        return path

    monkeypatch.setattr("yoloprune.compiler.pipeline.export_baseline", export_baseline)
    model = torch.nn.Conv2d(3, 3, 1)
    prepared = types.SimpleNamespace(model=model, imgsz=64)
    points = [
        {"name": f"macs-{v}", "folder": f"macs-{v}", "onnx": "m.onnx", "checkpoint": "m.pt"}
        for v in (0.7, 0.5)
    ]
    latency = sweep._measure(options, prepared, "end2end", points)
    assert seen["settings"].runtime == (runtime or "ort") and seen["imgsz"] == 64
    assert seen["settings"].batch == 2 and latency["batch"] == 2  # --latency-batch
    baseline = seen["sources"]["baseline"]
    if runtime == "torch":
        assert baseline is model and exported == []
    else:
        assert str(baseline).endswith("baseline.onnx")
        assert exported == [(model, 64, "end2end", base)]
    assert seen["sources"]["macs-0.5"] == str(
        tmp_path / "macs-0.5" / f"m.{'pt' if file == 'checkpoint' else 'onnx'}"
    )
    assert latency["runtime"] == text
    assert latency["machine"].get("gpu") == (None if runtime is None else "Stand-in")
    assert latency["baseline_ms"] == 10.0 and latency["points"] == {
        "macs-0.7": 9.0,
        "macs-0.5": 8.0,
    }
