"""YOLOv8 through the optional ultralytics extra. Tests needing the extra skip with the reason
where it is absent (`make test` installs it)."""

import copy
import sys

import pytest
import torch

from graphs.errors import ModelError
from graphs.ultralytics_family import UltralyticsMissing, require_ultralytics

try:
    require_ultralytics()
    MISSING = None
except UltralyticsMissing as exc:
    MISSING = str(exc)

needs_extra = pytest.mark.skipif(MISSING is not None, reason=f"ultralytics extra: {MISSING}")
IMGSZ = 128


def test_missing_extra_is_a_clear_error(monkeypatch, capsys):
    from compiler.cli import main

    monkeypatch.setitem(sys.modules, "ultralytics", None)  # import ultralytics -> ImportError
    with pytest.raises(UltralyticsMissing, match="optional 'ultralytics' extra"):
        require_ultralytics("yolov8n.yaml")
    assert main(["compile", "yolov8n.yaml", "--no-bench", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "make install-ultralytics" in err and "AGPL" in err


def decoded(model, images):
    with torch.no_grad():
        return model.eval()(images)[0]


@pytest.fixture(scope="module")
def yolov8n():
    from graphs.checkpoint import load_model
    from tests.helpers import randomized

    model, info = load_model("yolov8n.yaml")
    return randomized(model), info


@needs_extra
def test_c2f_rewrite_is_exact():
    from ultralytics.nn.tasks import DetectionModel

    from graphs.ultralytics_family import SplitCSP, canonicalize
    from tests.helpers import randomized

    original = randomized(DetectionModel("yolov8n.yaml", verbose=False))
    rewritten = canonicalize(copy.deepcopy(original))
    blocks = [m for m in rewritten.modules() if isinstance(m, SplitCSP)]
    assert len(blocks) == 8 and not any(type(m).__name__ == "C2f" for m in rewritten.modules())
    images = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    want, got = decoded(original, images), decoded(rewritten, images)
    assert got.shape == want.shape == (2, 84, (IMGSZ // 8) ** 2 * 21 // 16)
    assert (got - want).abs().max() <= 1e-6 * max(1.0, float(want.abs().max()))


@needs_extra
def test_exact_surgery_with_negative_control(yolov8n):
    from compiler.apply import apply_plan
    from compiler.pipeline import CompileOptions, Prepared, plan_for
    from graphs.dependency import build_graph, channel_groups
    from graphs.plan import GroupPlan
    from tests.helpers import zero_removed_channels

    model, info = yolov8n
    graph = build_graph(model)
    prepared = Prepared(model, info, IMGSZ, channel_groups(model, graph), graph)
    plan = plan_for(prepared, CompileOptions("yolov8n.yaml", macs=0.5))
    assert 0.485 <= plan.macs_ratio <= 0.515
    pruned = apply_plan(model, plan)
    images = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1))
    reference = decoded(zero_removed_channels(model, plan), images)
    out = decoded(pruned, images)
    scale = reference.abs().amax(dim=(0, 2), keepdim=True).clamp(min=1.0)
    assert ((out - reference).abs() / scale).max() <= 1e-5
    # negative control: prune channels that carry signal in the unzeroed model
    live = decoded(model, images)
    assert ((out - live).abs() / scale).max() > 1e-3
    head = {c.out_channels for c in __import__("graphs.dependency").dependency.head_convs(pruned)}
    assert head == {64, 80, 1}  # box (4 x reg_max), classes, DFL untouched
    assert all(isinstance(g, GroupPlan) for g in plan.groups)


@needs_extra
def test_compile_end_to_end_and_reload_without_torch_pruning(tmp_path, yolov8n):
    import json

    from compiler.cli import main
    from graphs.checkpoint import load_model

    out = tmp_path / "out"
    argv = ["compile", "yolov8n.yaml", "--imgsz", str(IMGSZ), "--out", str(out)]
    assert main([*argv, "--macs", "0.5", "--bench-runs", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["family"] == "ultralytics" and report["model"]["nc"] == 80
    assert report["parity"]["ok"] and 0.485 <= report["macs"]["ratio"] <= 0.515
    assert report["alignment"]["all_pruned_groups_aligned"]
    payload = torch.load(out / "yolov8n-pruned.pt", weights_only=True)  # plain data only
    assert payload["family"] == "ultralytics"
    reloaded, info = load_model(out / "yolov8n-pruned.pt")
    assert (
        info.family == "ultralytics" and len(info.names) == 80
    )  # YAML builds name classes "0".."79"
    from compiler.export import check_parity

    assert check_parity(reloaded, out / "yolov8n-pruned.onnx", IMGSZ).ok  # same weights
    import onnx

    graph = onnx.load(str(out / "yolov8n-pruned.onnx")).graph
    dims = [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 84, (IMGSZ // 8) ** 2 * 21 // 16]
    assert "torchvision" not in sys.modules  # its CUDA build is never imported


@needs_extra
def test_attention_models_are_refused_clearly():
    from graphs.checkpoint import load_model

    with pytest.raises(ModelError, match="attention blocks"):
        load_model("yolo11n.yaml")
