"""Fuzz suite: model YAMLs that carry code, in every container we read, never run it.

Each hostile YAML (code in ``activation``, in a module name, in an argument; loader functions
named as modules; absurd sizes) is put in a yoloprune pruned checkpoint, in a checkpoint pickled
the way ultralytics (or yolov5) writes one, and in a YAML file. ``compile``, ``graph`` and
``plan`` run on each in a separate Python process, through the CLI's entry point, and every run
must end with exit status 2, one line on stderr, no traceback, the marker file never created
and nothing written. A few runs go through ``python -m yoloprune`` itself, to check the real
exit status and stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from tests.helpers import needs_ultralytics

REPO = Path(__file__).resolve().parents[2]
ULTRALYTICS_BASE = {
    "nc": 2,
    "scales": {"n": [0.33, 0.25, 1024]},
    "scale": "n",
    "backbone": [[-1, 1, "Conv", [64, 3, 2]], [-1, 1, "Conv", [128, 3, 2]]],
    "head": [[[1], 1, "Detect", ["nc"]]],
}
YOLOV5_BASE = {
    "nc": 2,
    "depth_multiple": 0.33,
    "width_multiple": 0.25,
    "anchors": [[10, 13, 16, 30, 33, 23]],
    "backbone": [[-1, 1, "Conv", [64, 6, 2, 2]], [-1, 3, "C3", [64]]],
    "head": [[[1], 1, "Detect", ["nc", "anchors"]]],
}


class _RunsCode:
    """Unpickled without restriction, this creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_yamls(base: dict, marker: Path, loader_target: Path) -> dict[str, dict]:
    """Model definitions that would run code (or hang) if any parser trusted them."""
    touch = f"__import__('os').system('touch {marker}')"

    def variant(**changes) -> dict:
        cfg = json.loads(json.dumps(base))
        cfg.update(changes)
        return cfg

    def with_layer(layer) -> dict:
        cfg = variant()
        cfg["backbone"] = [layer, *cfg["backbone"][1:]]
        return cfg

    return {
        "code in activation": variant(activation=f"{touch} or nn.SiLU()"),
        "code as module name": with_layer([-1, 1, touch, [64, 3, 2]]),
        "loader named as module": with_layer([-1, 1, "torch_safe_load", [str(loader_target)]]),
        "yaml loader named as module": with_layer([-1, 1, "yaml_model_load", [str(marker)]]),
        "torch.nn escape": with_layer([-1, 1, "nn.modules.module.torch.load", [str(marker)]]),
        "code in an argument": with_layer([-1, 1, "Conv", [touch, 3, 2]]),
        "huge depth multiple": variant(depth_multiple=100000)
        if "depth_multiple" in base
        else variant(scales={"n": [100000, 0.25, 1024]}),
    }


def pruned_checkpoint(cfg: dict, family: str, path: Path) -> Path:
    torch.save({"format": "yoloprune.v1", "family": family, "yaml": cfg, "state_dict": {}}, path)
    return path


def ultralytics_checkpoint(cfg: dict, path: Path) -> Path:
    """The model pickled whole as ultralytics' trainer writes it (its own DetectionModel class),
    with the hostile YAML as its ``yaml`` attribute."""
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel.__new__(DetectionModel)
    nn.Module.__init__(model)
    model.yaml, model.names = cfg, {0: "a", 1: "b"}
    torch.save({"model": model, "ema": None, "epoch": -1, "train_args": {"imgsz": 64}}, path)
    return path


def yolov5_checkpoint(cfg: dict, path: Path, monkeypatch) -> Path:
    """The model pickled as yolov5's train.py writes it (``models.yolo.DetectionModel``)."""
    module = types.ModuleType("models.yolo")
    monkeypatch.setitem(sys.modules, "models", types.ModuleType("models"))
    monkeypatch.setitem(sys.modules, "models.yolo", module)
    module.DetectionModel = type("DetectionModel", (nn.Module,), {"__module__": "models.yolo"})
    model = module.DetectionModel()
    model.yaml = cfg
    torch.save({"model": model, "ema": None, "epoch": -1}, path)
    return path


def yaml_file(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


DRIVER = """
import contextlib, io, json, sys, traceback
from yoloprune.compiler.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
        except BaseException:
            rc, _ = "exception", traceback.print_exc()
    results.append({"argv": argv, "rc": rc, "stderr": err.getvalue()})
print(json.dumps(results))
"""


def run_driver(calls: list[list[str]], cwd: Path) -> list[dict]:
    """Run each CLI call in one fresh Python process (imports paid once), through main()."""
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(calls)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def calls_for(model: Path, work: Path) -> list[list[str]]:
    out = work / f"out-{model.stem}"
    return [
        ["compile", str(model), "--out", str(out), "--no-bench", "--imgsz", "64"],
        ["graph", str(model), "--imgsz", "64"],
        ["plan", str(model), "--out", str(work / f"{model.stem}-plan.json"), "--imgsz", "64"],
    ]


def assert_refused_cleanly(result: dict, marker: Path, work: Path) -> None:
    lines = result["stderr"].strip().splitlines()
    where = f"{result['argv']}: {result['stderr'][-600:]}"
    assert result["rc"] == 2, where
    assert len(lines) == 1 and lines[0].startswith("yoloprune: error: "), where
    assert "Traceback" not in result["stderr"], where
    assert not marker.exists(), f"code ran: {where}"


def assert_nothing_written(work: Path, inputs: set[Path]) -> None:
    left = {p for p in work.rglob("*") if p not in inputs}
    assert not left, sorted(map(str, left))


def containers(tmp_path, monkeypatch, marker, loader_target):
    """Every hostile YAML in every container; returns the files written."""
    files = []
    for label, cfg in hostile_yamls(YOLOV5_BASE, marker, loader_target).items():
        slug = label.replace(" ", "-").replace(".", "")
        files.append(pruned_checkpoint(cfg, "yolov5", tmp_path / f"v5-pruned-{slug}.pt"))
        files.append(yolov5_checkpoint(cfg, tmp_path / f"v5-release-{slug}.pt", monkeypatch))
        files.append(yaml_file(cfg, tmp_path / f"v5-{slug}.yaml"))
    for label, cfg in hostile_yamls(ULTRALYTICS_BASE, marker, loader_target).items():
        slug = label.replace(" ", "-").replace(".", "")
        files.append(pruned_checkpoint(cfg, "ultralytics", tmp_path / f"ul-pruned-{slug}.pt"))
        files.append(ultralytics_checkpoint(cfg, tmp_path / f"ul-release-{slug}.pt"))
        files.append(yaml_file(cfg, tmp_path / f"ul-{slug}.yaml"))
    return files


@needs_ultralytics
def test_hostile_yamls_never_run_code_in_any_container(tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    loader_target = tmp_path / "runs-code.pt"
    torch.save({"payload": _RunsCode(marker)}, loader_target)
    files = containers(tmp_path, monkeypatch, marker, loader_target)
    inputs = {*files, loader_target}
    calls = [call for model in files for call in calls_for(model, tmp_path)]
    results = run_driver(calls, tmp_path)
    assert len(results) == len(calls) == 3 * 3 * 2 * 7
    for result in results:
        assert_refused_cleanly(result, marker, tmp_path)
    assert_nothing_written(tmp_path, inputs)
    assert not marker.exists()


@needs_ultralytics
@pytest.mark.parametrize("command", ["compile", "graph", "plan"])
def test_the_cli_process_itself_exits_2_with_one_line(tmp_path, command):
    marker = tmp_path / "PWNED"
    cfg = hostile_yamls(ULTRALYTICS_BASE, marker, marker)["code in activation"]
    model = pruned_checkpoint(cfg, "ultralytics", tmp_path / "evil.pt")
    argv = next(call for call in calls_for(model, tmp_path) if call[0] == command)
    done = subprocess.run(
        [sys.executable, "-m", "yoloprune", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "activation" in done.stderr and str(model) in done.stderr
    assert not marker.exists()
    assert_nothing_written(tmp_path, {model})


def test_a_loader_pickle_really_would_run_code(tmp_path):
    """Negative control: the payload the loader case names does run when unpickled without
    restriction, so the suite's 'never created' is a real check."""
    marker = tmp_path / "PWNED"
    target = tmp_path / "runs-code.pt"
    torch.save({"payload": _RunsCode(marker)}, target)
    torch.load(target, weights_only=False)
    assert marker.exists()
