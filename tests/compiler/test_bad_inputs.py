"""Everything we read, and every value the user gives, is honoured or refused with one line.

Plans, latency tables, data YAMLs, pruned checkpoints and options: each bad case ends with exit
status 2, one line naming the file or flag, and nothing written. Replayed plans have their MACs
counted on the pruned model. SIGTERM unwinds like Ctrl-C; a compile into a folder that holds
another compile's results replaces them whole.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import tiny_cfg
from yoloprune.compiler.cli import main
from yoloprune.compiler.pipeline import CompileOptions
from yoloprune.compiler.planner import conv_macs
from yoloprune.graphs.checkpoint import load_model
from yoloprune.graphs.errors import PlanError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_plan(tmp_path, tiny_yaml) -> dict:
    path = tmp_path / "made-plan.json"
    assert main(["plan", str(tiny_yaml), "--imgsz", "64", "--out", str(path)]) == 0
    return json.loads(path.read_text())


def refused(capsys, argv, message: str, out: Path | None = None) -> str:
    """Run the CLI; it must exit 2 with exactly one line naming ``message``, writing no OUT."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("yoloprune: error:"), err
    assert message in err, err
    assert "Traceback" not in err
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    return err


def write_plan(tmp_path: Path, data) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return path


def compile_argv(model, out, *extra):
    return ["compile", model, "--imgsz", "64", "--out", out, "--no-bench", *extra]


# --- plans ---------------------------------------------------------------------------------


def test_a_plan_cut_to_three_groups_reports_the_macs_the_model_keeps(
    tmp_path, tiny_yaml, tiny_plan
):
    pruned = [g for g in tiny_plan["groups"] if len(g["keep"]) < g["size"]]
    tiny_plan["groups"] = pruned[:3]
    plan = write_plan(tmp_path, tiny_plan)
    out = tmp_path / "out"
    assert main([str(a) for a in compile_argv(tiny_yaml, out, "--plan", plan)]) == 0
    report = json.loads((out / "report.json").read_text())
    model, _ = load_model(tiny_yaml)
    pruned_model, _ = load_model(out / "tiny-pruned.pt")
    counted = conv_macs(pruned_model, 64) / conv_macs(model, 64)
    assert report["macs"]["ratio"] == pytest.approx(counted, rel=1e-12)
    assert report["macs"]["ratio"] > 0.8 > tiny_plan["macs_after"] / tiny_plan["macs_before"]
    written = json.loads((out / "tiny-plan.json").read_text())
    assert written["macs_after"] == conv_macs(pruned_model, 64)
    assert sum(len(g["keep"]) < g["size"] for g in written["groups"]) == 3


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: p["groups"][0]["keep"].pop(), "not a multiple of the plan's round_to 8"),
        (
            lambda p: p["groups"][0].update(keep=[i + 0.5 for i in p["groups"][0]["keep"]]),
            "keep must list integer channel indices",
        ),
        (lambda p: p["groups"][0].update(keep=[3, 1, 2]), "distinct ascending indices"),
        (lambda p: p["groups"][0].update(id="model.24.m.0"), "does not fit this model"),
        (lambda p: p["groups"][0].update(size=999), "does not fit this model"),
        (lambda p: p.update(round_to="8"), "round_to must be a int"),
        (lambda p: p.update(macs_after=-5), "macs_after -5 is out of range"),
        (lambda p: p.update(groups={"a": 1}), "groups must be a list"),
        (lambda p: p.update(surprise=1), "unknown plan key 'surprise'"),
        (lambda p: p.pop("groups"), "plan key 'groups' is missing; regenerate it"),
        (lambda p: p.update(method="sparse"), "method 'sparse' is not one of structured"),
        (lambda p: p.update(target={"value": 0.5}), "target must be a mapping with kind one of"),
        (lambda p: p["target"].update(value=-1), "target value -1 must be a positive number"),
        (lambda p: p["target"].update(value=5), "must be below 1"),
        (lambda p: p.update(method="unstructured"), "an unstructured plan's target is sparsity"),
        (
            lambda p: p["groups"][0].update(keep=[]),
            "keeps no channel, which only the hidden group of a block in drop_blocks may",
        ),
        (
            lambda p: p.update(drop_blocks=[p["groups"][0]["id"].removesuffix(".cv1.conv")]),
            "drop_blocks removes a block whose hidden group",
        ),
    ],
)
def test_a_damaged_plan_is_refused(tmp_path, tiny_yaml, tiny_plan, capsys, damage, message):
    tiny_plan["groups"] = [g for g in tiny_plan["groups"] if len(g["keep"]) < g["size"]]
    damage(tiny_plan)
    out = tmp_path / "out"
    refused(
        capsys,
        compile_argv(tiny_yaml, out, "--plan", write_plan(tmp_path, tiny_plan)),
        message,
        out,
    )


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "plan file not found"),
        (bytes(range(256)) * 4, "not a text plan file"),
        (b"[1, 2, 3]", "not a yoloprune plan"),
        (b"{", "malformed plan JSON"),
    ],
)
def test_a_missing_or_binary_plan_is_one_line(tmp_path, tiny_yaml, capsys, content, message):
    plan = tmp_path / "plan.json"
    if content is not None:
        plan.write_bytes(content)
    out = tmp_path / "out"
    refused(capsys, compile_argv(tiny_yaml, out, "--plan", plan), message, out)


# --- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--imgsz", "0"], "argument --imgsz/--img: 0 is not in [32, 4096]"),
        (["--imgsz", "100000"], "argument --imgsz/--img: 100000 is not in [32, 4096]"),
        (["--parity-tol", "0"], "--parity-tol 0: must be in (0, 1e+06]"),
        (["--parity-tol", "-1"], "--parity-tol -1: must be in (0, 1e+06]"),
        (["--parity-tol", "nan"], "--parity-tol nan"),
        (["--threads", "0"], "--threads 0: must be an integer in [1, 1024]"),
        (["--bench-runs", "0"], "--bench-runs 0"),
        (["--lr0", "0"], "--lr0 0: must be in (0, 10]"),
        (["--max-ratio", "1"], "--max-ratio 1 must be strictly between 0 and 1"),
        (["--round-to", "0"], "argument --round-to: 0 is not in [1, 1024]"),
        (
            ["--round-to", "fast"],
            "argument --round-to: 'fast': give a channel count (8, 16, 32) or auto",
        ),
        (["--group-seconds", "-1"], "--group-seconds -1: must be in (0, 86400]"),
        (["--profile"], "--profile splits the bench step's latency ratio: drop --no-bench"),
        (["--bench-runs", "50"], "--bench-runs 50 sets the bench step's timed runs, which"),
        (["--spinning", "--round-to", "16"], "--spinning times ONNX Runtime with intra-op"),
        (["--recalibrate"], "--recalibrate re-estimates BatchNorm statistics on --data's"),
        (
            ["--ratio", "0.3", "--max-ratio", "0.2"],
            "--ratio 0.3 removes more channels than --max-ratio 0.2 lets any group lose: give "
            "--max-ratio 0.3 or more, or a lower --ratio",
        ),
        (["--ratio", "0.85"], "--ratio 0.85 removes more channels than --max-ratio 0.8 (its def"),
        (["--ratio", "0.85", "--global"], "than --max-ratio 0.8 (its default here) lets any"),
        (
            ["--recalibrate", "--calib-images", "."],
            "--recalibrate re-estimates BatchNorm statistics on --data's training images: add",
        ),
    ],
)
def test_values_are_honoured_or_refused_before_any_work(
    tmp_path, tiny_yaml, capsys, extra, message
):
    out = tmp_path / "out"
    started = time.perf_counter()
    argv = ["compile", tiny_yaml, "--out", out, "--no-bench", *extra]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()
    assert time.perf_counter() - started < 5  # refused before loading and tracing


def test_spinning_without_the_bench_step_is_taken_where_the_alignment_is_timed(
    shapes_data,
):
    """--no-bench --spinning with --round-to auto (the default) times the candidates with
    spinning on: taken, and so is --bench-runs in a sweep, whose points have no bench step."""
    from yoloprune.compiler.options import refuse_timing_flags_without_bench
    from yoloprune.compiler.sweep import SweepOptions

    options = CompileOptions("m.pt", bench=False, spinning=True)
    assert options.settings.alignment is not None
    refuse_timing_flags_without_bench(options)  # no error
    base = CompileOptions("m.pt", data=shapes_data, bench_runs=50, spinning=True)
    sweep = SweepOptions(base, "macs", (0.5,))
    assert sweep.point(0.5).bench_runs == 50 and not sweep.point(0.5).bench


def test_recalibrate_is_refused_where_it_would_not_run(shapes_data):
    """Unstructured pruning never re-estimates BatchNorms; structured with --data does."""
    with pytest.raises(PlanError, match="--recalibrate follows channel pruning"):
        CompileOptions("m.pt", method="unstructured", ratio=0.3, data=shapes_data, recalibrate=True)
    CompileOptions("m.pt", data=shapes_data, recalibrate=True).settings  # noqa: B018


def test_library_options_are_checked_once_at_creation():
    for bad in ({"imgsz": 0}, {"parity_tolerance": 0.0}, {"threads": -1}, {"steps": 0}):
        with pytest.raises(PlanError):
            CompileOptions("m.pt", **bad)
    options = CompileOptions("m.pt", parity_tolerance=1e-9, imgsz=32)
    assert options.parity_tolerance == 1e-9 and options.imgsz == 32  # honoured, not replaced


def test_latency_runtime_torch_without_cuda_is_one_line(tmp_path, tiny_yaml, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "out"
    argv = compile_argv(tiny_yaml, out, "--speedup", "1.5", "--latency-runtime", "torch")
    refused(capsys, argv, "--latency-runtime torch measures on a CUDA GPU", out)


def test_latency_runtime_tensorrt_without_tensorrt_is_one_line(tmp_path, tiny_yaml, capsys):
    from yoloprune.kernels.tensorrt import available

    if available()[0]:
        pytest.skip("TensorRT is present")
    out = tmp_path / "out"
    argv = compile_argv(tiny_yaml, out, "--latency-runtime", "tensorrt")
    refused(capsys, argv, "--latency-runtime tensorrt: TensorRT is not installed", out)


# --- OUT -----------------------------------------------------------------------------------


def test_out_that_is_a_file_or_unwritable_is_one_line(tmp_path, tiny_yaml, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    refused(capsys, compile_argv(tiny_yaml, a_file), "is a file; OUT must be a folder")
    assert a_file.read_text() == "mine"
    below_a_file = a_file / "out"
    refused(capsys, compile_argv(tiny_yaml, below_a_file), "cannot write there")
    refused(capsys, compile_argv(tiny_yaml, "/proc/yoloprune-out"), "cannot write there")
    export = ["export", tiny_yaml, "--imgsz", "64", "--out"]  # its folder: made, or refused
    refused(capsys, [*export, below_a_file / "m.onnx"], "cannot write there")
    refused(capsys, [*export, "/proc/yoloprune-out/m.onnx"], "cannot write there")
    assert a_file.read_text() == "mine"


def test_plan_out_that_is_a_folder_is_one_line(tmp_path, tiny_yaml, capsys):
    refused(capsys, ["plan", tiny_yaml, "--imgsz", "64", "--out", tmp_path], "is a folder")


# --- latency tables ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content,message",
    [
        (b"garbage\x00\xff", "not a readable latency table"),
        (b"[1, 2, 3]", "not a yoloprune latency table"),
        (None, "is a folder"),
    ],
)
def test_a_bad_latency_table_is_one_line_and_leaves_nothing(
    tmp_path, tiny_yaml, capsys, content, message
):
    table = tmp_path / "tables" / "table.json"
    table.parent.mkdir()
    if content is None:
        table.mkdir()
    else:
        table.write_bytes(content)
    out = tmp_path / "out"
    argv = compile_argv(tiny_yaml, out, "--speedup", "1.2", "--latency-table", table)
    refused(capsys, argv, message, out)
    assert [p.name for p in table.parent.iterdir()] == ["table.json"]  # no .tmp beside it


def test_latency_table_entries_are_checked(tmp_path):
    from yoloprune.graphs.errors import LatencyTableError
    from yoloprune.kernels.latency_table import TABLE_FORMAT, LatencyTable, TableKey

    key = TableKey("ort", "Test CPU", "fp32", 1, 2, True)
    path = tmp_path / "t.json"
    for entries in ({"c8-o8-k1-s1-p0-g1-4x4": -1.0}, {"__import__": 1.0}, ["c8"]):
        path.write_text(
            json.dumps({"format": TABLE_FORMAT, "key": key.__dict__, "entries": entries})
        )
        with pytest.raises(LatencyTableError, match="malformed entries"):
            LatencyTable(key, path, lambda shape: 1.0)


# --- data YAMLs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,message",
    [
        ({"val": "images", "names": "abc"}, "'names' must list 1 to"),
        ({"val": "images", "names": {"0": "a", "1": "b"}}, "keyed 0, 1, ... nc-1"),
        ({"val": "images", "names": [{"x": 1}]}, "every class name must be a plain string"),
        ({"val": ["images", 3], "names": ["a"]}, "'val' must be a folder or list file"),
        ({"path": ["x"], "val": "images", "names": ["a"]}, "'path' must be a folder name"),
    ],
)
def test_a_bad_data_yaml_is_one_line(tmp_path, tiny_yaml, capsys, data, message):
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    refused(capsys, compile_argv(tiny_yaml, out, "--data", path), message, out)


# --- pruned checkpoints and model YAMLs ----------------------------------------------------


def pruned_payload(tmp_path, tiny_yaml) -> dict:
    out = tmp_path / "made"
    assert main([str(a) for a in compile_argv(tiny_yaml, out)]) == 0
    return torch.load(out / "tiny-pruned.pt", weights_only=True)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda c: c.pop("yaml"), "key 'yaml': expected the model definition"),
        (lambda c: c.pop("state_dict"), "key 'state_dict': expected tensors by name"),
        (lambda c: c.update(state_dict=[1, 2]), "key 'state_dict'"),
        (lambda c: c.update(family="darknet"), "key 'family': expected one of"),
        (lambda c: c.update(activations={"model.0.act": ["Tanhshrink", None]}), "'activations'"),
        (lambda c: c.update(activations={"model.99.act": ["SiLU", None]}), "does not fit"),
        (lambda c: c.update(bn_eps={"model.0.conv": 1e-3}), "is not a BatchNorm2d"),
        (lambda c: c.update(bn_eps={"model.0.bn": "tiny"}), "key 'bn_eps'"),
        (lambda c: c.update(names="abc"), "key 'names'"),
        (lambda c: c.update(imgsz=10**6), "key 'imgsz'"),
        (lambda c: c["state_dict"].update({"model.0.conv.weight": torch.zeros(3)}), "dimensions"),
        (lambda c: c["state_dict"].pop("model.1.bn.weight"), "does not fit its YAML"),
    ],
)
def test_a_damaged_pruned_checkpoint_is_one_line(tmp_path, tiny_yaml, capsys, damage, message):
    payload = pruned_payload(tmp_path, tiny_yaml)
    damage(payload)
    path = tmp_path / "damaged.pt"
    torch.save(payload, path)
    out = tmp_path / "out"
    err = refused(capsys, compile_argv(path, out), message, out)
    assert str(path) in err


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c.update(nc=0), "key 'nc': 0 is not an integer in [1, 10000]"),
        (lambda c: c.update(nc=-3), "key 'nc': -3"),
        (lambda c: c.update(nc="3"), "key 'nc': '3'"),
        (lambda c: c.update(width_multiple=0), "key 'width_multiple': 0"),
        (lambda c: c.update(width_multiple=-0.5), "key 'width_multiple': -0.5"),
        (lambda c: c["head"].__setitem__(2, [[-1, 4], 1, "Concat", [1]]), "do not fit together"),
        (lambda c: c["head"].__setitem__(2, [[-1, 30], 1, "Concat", [1]]), "must name earlier"),
        (lambda c: c["backbone"].__setitem__(1, [-1, 0, "Conv", [8, 3, 2]]), "repeats 0"),
        (lambda c: c.update(extra_key=1), "model YAML key 'extra_key'"),
    ],
)
def test_a_bad_model_yaml_is_one_line(tmp_path, capsys, change, message):
    cfg = tiny_cfg()
    change(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    err = refused(capsys, compile_argv(path, out), message, out)
    assert str(path) in err


def test_a_storage_of_negative_size_is_one_line(tmp_path, capsys):
    good = tmp_path / "good.pt"
    torch.save({"a": torch.zeros(4)}, good)
    with zipfile.ZipFile(good) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    name = next(n for n in entries if n.endswith("data.pkl"))
    count = b"X\x03\x00\x00\x00cpuq\x06K\x04"  # ... 'cpu', then the storage's element count
    assert count in entries[name]
    entries[name] = entries[name].replace(count, count[:-2] + b"J\xfc\xff\xff\xff")  # -4
    bad = tmp_path / "negative.pt"
    with zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)
    refused(capsys, ["graph", bad], "cannot read checkpoint")


def test_a_deflate_bomb_is_refused_before_inflating(tmp_path, capsys):
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("bomb/data/0", bytes(256 << 20))  # 256 MB of zeros, ~250 kB stored
    assert bomb.stat().st_size < 1 << 20
    started = time.perf_counter()
    refused(capsys, ["graph", bomb], "a decompression bomb?")
    assert time.perf_counter() - started < 2


# --- nothing partial -----------------------------------------------------------------------


def test_sigterm_unwinds_like_ctrl_c(tmp_path):
    """A `timeout` or a CI cancel mid-compile: exit 143, no staging folder, no temp files."""
    out, temp = tmp_path / "out", tmp_path / "tmp"
    temp.mkdir()
    # 500 timed runs: the compile is still timing when the signal lands, however late the
    # poll below sees the ONNX file (with 50, one rehearsal's loaded run finished first: exit 0)
    command = [
        "compile",
        "yolov5s.yaml",
        "--imgsz",
        "320",
        "--out",
        str(out),
        "--bench-runs",
        "500",
    ]
    command += ["--round-to", "8"]  # no alignment timing: the staging folder comes sooner
    process = subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-m", "yoloprune", *command],  # a crash: traced
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(temp)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    # wait until the compile has written its ONNX file into its staging folder: the signal
    # then lands in the parity check or the timing (in `import onnx` it is held: graphs/files)
    while not list(out.glob(".staging-*/*.onnx")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read()
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, (
        f"exit {time.monotonic() - sent:.1f} s after the signal: {err}"
    )
    assert err.strip().splitlines()[-1] == "yoloprune: terminated; nothing was written"
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    assert not any(temp.iterdir()), sorted(temp.iterdir())


def test_stale_staging_folders_are_removed_and_results_replaced_whole(tmp_path, tiny_yaml):
    out = tmp_path / "out"
    stale = out / ".staging-999999999-abc"  # no such process
    stale.mkdir(parents=True)
    (stale / "half.onnx").write_bytes(b"x")
    (out / "notes.txt").write_text("mine")
    assert main([str(a) for a in compile_argv(tiny_yaml, out)]) == 0
    assert not stale.exists()
    first = {p.name for p in out.iterdir()}
    assert "tiny-pruned.onnx" in first and "notes.txt" in first
    other = tmp_path / "other.yaml"
    other.write_text(tiny_yaml.read_text())
    assert main([str(a) for a in compile_argv(other, out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert not any(n.startswith("tiny-") for n in names), names  # the earlier model's are gone
    assert {"other-pruned.onnx", "other-pruned.pt", "report.json", "notes.txt"} <= names


def test_a_garbage_onnx_file_is_one_line_in_every_command(tmp_path, tiny_yaml, capsys):
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"not a protobuf")
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"val": "images", "names": ["a", "b", "c"]}))
    (tmp_path / "images").mkdir()
    refused(capsys, ["bench", garbage], "not a readable ONNX model")
    refused(capsys, ["bench", garbage, "--imgsz", "64"], "not a readable ONNX file")
    refused(capsys, ["eval", tiny_yaml, "--data", data, "--onnx", garbage], "not a readable ONNX")
    refused(capsys, ["build", garbage], "not a readable ONNX file")
    (tmp_path / "report.json").write_text('{"model": 3}')
    real = tmp_path / "real.onnx"
    assert main(["export", str(tiny_yaml), "--out", str(real), "--imgsz", "64"]) == 0
    capsys.readouterr()
    refused(capsys, ["build", real], "not a compile report")
