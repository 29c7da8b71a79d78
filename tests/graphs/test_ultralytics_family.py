"""YOLOv8, YOLO11 and YOLO26 through the optional ultralytics extra. Tests needing the extra
skip with the reason where it is absent (`make test` installs it)."""

import copy
import json
import sys

import pytest
import torch

from tests.helpers import assert_no_broken_torchvision, needs_ultralytics
from yoloprune.graphs.errors import ModelError
from yoloprune.graphs.ultralytics_family import UltralyticsMissing, require_ultralytics

IMGSZ = 128


def test_missing_extra_is_a_clear_error(monkeypatch, capsys):
    from yoloprune.compiler.cli import main

    monkeypatch.setitem(sys.modules, "ultralytics", None)  # import ultralytics -> ImportError
    with pytest.raises(UltralyticsMissing, match="optional 'ultralytics' extra"):
        require_ultralytics("yolov8n.yaml")
    assert main(["compile", "yolov8n.yaml", "--no-bench", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "make install-ultralytics" in err and "AGPL" in err


def decoded(model, images):
    with torch.no_grad():
        return model.eval()(images)[0]


FAMILIES = ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"]
_MODELS: dict = {}


def calibrated(spec):
    """The model built from YAML, BN randomised and calibrated on noise (cached per module)."""
    from tests.helpers import randomized
    from yoloprune.graphs.checkpoint import load_model

    if spec not in _MODELS:
        model, info = load_model(spec)
        _MODELS[spec] = randomized(model), info
    return _MODELS[spec]


@pytest.fixture(scope="module")
def yolov8n():
    return calibrated("yolov8n.yaml")


@needs_ultralytics
def test_c2f_rewrite_is_exact():
    from ultralytics.nn.tasks import DetectionModel

    from tests.helpers import randomized
    from yoloprune.graphs.ultralytics_family import SplitCSP, canonicalize

    original = randomized(DetectionModel("yolov8n.yaml", verbose=False))
    rewritten = canonicalize(copy.deepcopy(original))
    blocks = [m for m in rewritten.modules() if isinstance(m, SplitCSP)]
    assert len(blocks) == 8 and not any(type(m).__name__ == "C2f" for m in rewritten.modules())
    images = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    want, got = decoded(original, images), decoded(rewritten, images)
    assert got.shape == want.shape == (2, 84, (IMGSZ // 8) ** 2 * 21 // 16)
    assert (got - want).abs().max() <= 1e-6 * max(1.0, float(want.abs().max()))


def all_branches(model, images):
    """Every head output the model has: one-to-many decoded, and for YOLO26 the one-to-one
    branch decoded as deployed (end-to-end: top-k boxes, scores, classes)."""
    from yoloprune.graphs.ultralytics_family import detect_head, has_one2one

    outputs = [decoded(model, images)]
    if has_one2one(model):
        head = detect_head(model)
        head.end2end = True
        try:
            with torch.no_grad():
                raw = model.eval()(images)[1]["one2one"]
            outputs += [raw["boxes"], raw["scores"]]
        finally:
            head.end2end = False
    return outputs


@needs_ultralytics
@pytest.mark.parametrize("spec", ["yolo11n.yaml", "yolo26n.yaml"])
def test_c3k2_and_c2psa_rewrites_are_exact(spec):
    from ultralytics.nn.tasks import DetectionModel

    from tests.helpers import randomized
    from yoloprune.graphs.ultralytics_family import SplitCSP, SplitPSA, canonicalize

    original = randomized(DetectionModel(spec, verbose=False))
    rewritten = canonicalize(copy.deepcopy(original))
    kinds = {type(m).__name__ for m in rewritten.modules()}
    assert not kinds & {"C2PSA", "C3k2", "C2f"} and "PSABlock" in kinds
    assert sum(isinstance(m, SplitPSA) for m in rewritten.modules()) == 1
    assert sum(isinstance(m, SplitCSP) for m in rewritten.modules()) == 8
    images = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    want, got = decoded(original, images), decoded(rewritten, images)
    assert (got - want).abs().max() <= 1e-6 * max(1.0, float(want.abs().max()))


@needs_ultralytics
@pytest.mark.parametrize("spec", FAMILIES)
def test_exact_surgery_with_negative_control(spec):
    from tests.helpers import zero_removed_channels
    from yoloprune.compiler.apply import apply_plan
    from yoloprune.compiler.pipeline import CompileOptions, Prepared, plan_for
    from yoloprune.graphs.dependency import build_graph, channel_groups, head_convs
    from yoloprune.graphs.ultralytics_family import attention_convs

    model, info = calibrated(spec)
    graph = build_graph(model)
    prepared = Prepared(model, info, IMGSZ, channel_groups(model, graph), graph)
    plan = plan_for(prepared, CompileOptions(spec, macs=0.5))
    assert 0.485 <= plan.macs_ratio <= 0.515
    pruned = apply_plan(model, plan)
    images = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1))
    references = all_branches(zero_removed_channels(model, plan), images)
    outputs, live = all_branches(pruned, images), all_branches(model, images)
    assert len(outputs) == (3 if "26" in spec else 1)
    worst_exact, worst_live = 0.0, 0.0
    for out, reference, original in zip(outputs, references, live, strict=True):
        scale = reference.abs().amax(dim=(0, 2), keepdim=True).clamp(min=1.0)
        worst_exact = max(worst_exact, float(((out - reference).abs() / scale).max()))
        worst_live = max(worst_live, float(((out - original).abs() / scale).max()))
    assert worst_exact <= 1e-5
    assert worst_live > 1e-3  # negative control: pruned channels carried signal unzeroed
    reg_max = 1 if "26" in spec else 16
    head = {c.out_channels for c in head_convs(pruned)}
    assert head == {4 * reg_max, 80} | ({1} if reg_max > 1 else set())  # box, cls, DFL kept
    attention = [c.out_channels for c in attention_convs(pruned)]
    assert attention == [c.out_channels for c in attention_convs(model)]
    assert len(attention) == {"yolov8n.yaml": 0, "yolo11n.yaml": 3, "yolo26n.yaml": 6}[spec]


@needs_ultralytics
def test_yolo26_traces_both_head_branches():
    from yoloprune.graphs.dependency import channel_groups

    model, _ = calibrated("yolo26n.yaml")
    groups = channel_groups(model)
    members = {m.layer for g in groups for m in g.members}
    one2one = {n for n, _ in model.named_modules() if ".one2one_cv" in n}
    assert any(layer.startswith("model.23.one2one_cv3.0.0.0") for layer in members)
    pruned_inputs = {
        m.layer for g in groups if not g.protected for m in g.members if m.kind == "in"
    }
    assert pruned_inputs & one2one  # the one-to-one branch reads prunable features


@needs_ultralytics
def test_attention_blocks_are_protected_and_the_rest_of_the_block_is_pruned():
    from yoloprune.graphs.dependency import channel_groups

    model, _ = calibrated("yolo11n.yaml")
    groups = channel_groups(model)
    protected = {g.id: g.reason for g in groups if g.protected}
    inner = [n for n, _ in model.named_modules() if ".attn." in n and n.endswith(".conv")]
    assert inner and all("attention" in protected[name] for name in inner)
    prunable = {g.id for g in groups if not g.protected}
    assert "model.10.m.0.ffn.0.conv" in prunable  # the PSA feed-forward hidden layer
    assert "model.10.cv1b.conv" not in prunable  # the residual stream through attention
    # C2PSA's other half bypasses attention: prunable on its own, but ultralytics' C2PSA needs
    # equal halves, so by default it is kept whole (and tied halves elsewhere keep equal counts)
    assert "needs equal halves" in protected["model.10.cv1a.conv"]
    free = channel_groups(model, custom_modules=True)
    assert "model.10.cv1a.conv" in {g.id for g in free if not g.protected}
    ties = {g.id: g.tie for g in groups if g.tie}
    assert ties["model.2.cv1a.conv"] == ties["model.2.cv1b.conv"] != ""


@needs_ultralytics
def test_compile_end_to_end_and_reload_without_torch_pruning(tmp_path, yolov8n):
    import json

    from yoloprune.compiler.cli import main
    from yoloprune.graphs.checkpoint import load_model

    out = tmp_path / "out"
    argv = ["compile", "yolov8n.yaml", "--imgsz", str(IMGSZ), "--out", str(out)]
    assert main([*argv, "--macs", "0.5", "--bench-runs", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["family"] == "ultralytics" and report["model"]["nc"] == 80
    assert report["parity"]["ok"] and 0.485 <= report["macs"]["ratio"] <= 0.515
    assert report["alignment"]["all_pruned_groups_aligned"]
    saved = report["export"]["ultralytics_checkpoint"]
    assert saved == {
        "file": "yolov8n-pruned-ultralytics.pt",
        "blocks_kept_as_yoloprune_classes": [],
    }
    assert (out / saved["file"]).exists() and report["export"]["mode"] == "raw"
    payload = torch.load(out / "yolov8n-pruned.pt", weights_only=True)  # plain data only
    assert payload["family"] == "ultralytics"
    reloaded, info = load_model(out / "yolov8n-pruned.pt")
    assert (
        info.family == "ultralytics" and len(info.names) == 80
    )  # YAML builds name classes "0".."79"
    from yoloprune.compiler.export import check_parity

    assert check_parity(reloaded, out / "yolov8n-pruned.onnx", IMGSZ).ok  # same weights
    import onnx

    graph = onnx.load(str(out / "yolov8n-pruned.onnx")).graph
    dims = [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 84, (IMGSZ // 8) ** 2 * 21 // 16]
    assert_no_broken_torchvision()


@needs_ultralytics
def test_unsupported_heads_are_refused_clearly():
    from yoloprune.graphs.checkpoint import load_model

    with pytest.raises(ModelError, match="Detect head"):
        load_model("yolov8n-seg.yaml")


@needs_ultralytics
def test_group_building_guard_stops_an_unprotected_attention_block(monkeypatch):
    from yoloprune.graphs import dependency, ultralytics_family

    model, _ = calibrated("yolo11n.yaml")
    monkeypatch.setattr(ultralytics_family, "attention_convs", lambda m: [])
    limits = dependency.GroupingLimits(seconds=60, memory_gib=0.1)
    with pytest.raises(ModelError, match="group building stopped, memory grew"):
        dependency.channel_groups(model, limits=limits)
    with pytest.raises(ModelError, match=r"group building stopped, it ran \d+ s"):
        dependency.channel_groups(model, limits=dependency.GroupingLimits(seconds=0.01))


def write_release_checkpoint(spec, path, nc=3):
    """A checkpoint laid out as ultralytics writes one (strip_optimizer's fields, the model
    pickled whole in fp16), made here with ultralytics' own classes: the real pickle format."""
    from datetime import datetime

    import ultralytics
    from ultralytics.cfg import DEFAULT_CFG_DICT
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(1)
    model = DetectionModel(spec, nc=nc, verbose=False)
    model.names = {i: f"class{i}" for i in range(nc)}
    model.args = {**DEFAULT_CFG_DICT, "imgsz": 320}
    checkpoint = {
        "date": datetime(2026, 1, 1).isoformat(),
        "version": ultralytics.__version__,
        "license": "AGPL-3.0 (https://ultralytics.com/license)",
        "epoch": -1,
        "best_fitness": None,
        "model": copy.deepcopy(model).half(),
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": dict(model.args),
        "train_metrics": {"metrics/mAP50-95(B)": 0.5},
    }
    torch.save(checkpoint, path)
    return model.half().float().eval()


@needs_ultralytics
@pytest.mark.parametrize("spec", FAMILIES)
def test_ultralytics_checkpoint_loads_without_pickle_code_and_reproduces_outputs(tmp_path, spec):
    from yoloprune.graphs.checkpoint import load_model

    path = tmp_path / "release.pt"
    original = write_release_checkpoint(spec, path)
    model, info = load_model(path)
    assert info.family == "ultralytics" and info.pretrained and info.imgsz == 320
    assert info.names == ("class0", "class1", "class2") and info.nc == 3
    images = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    assert torch.equal(decoded(model, images), decoded(original, images))


@needs_ultralytics
def test_ultralytics_checkpoint_with_foreign_code_is_refused(tmp_path):
    from yoloprune.graphs.checkpoint import load_model
    from yoloprune.graphs.errors import CheckpointError

    path = tmp_path / "evil.pt"
    torch.save({"model": copy.deepcopy, "ema": None}, path)  # names a function to call
    with pytest.raises(CheckpointError, match=r"refused to load.*copy\.deepcopy"):
        load_model(path)


@needs_ultralytics
@pytest.mark.parametrize(("spec", "kept"), [("yolov8n.yaml", []), ("yolo26n.yaml", [])])
def test_pruned_model_saved_for_ultralytics_loads_in_ultralytics(tmp_path, spec, kept):
    from ultralytics import YOLO

    from yoloprune.compiler.apply import apply_plan
    from yoloprune.compiler.pipeline import CompileOptions, Prepared, plan_for
    from yoloprune.graphs.dependency import build_graph, channel_groups
    from yoloprune.graphs.ultralytics_family import save_for_ultralytics

    model, info = calibrated(spec)
    graph = build_graph(model)
    prepared = Prepared(model, info, IMGSZ, channel_groups(model, graph), graph)
    pruned = apply_plan(model, plan_for(prepared, CompileOptions(spec, macs=0.5)))
    path = tmp_path / "pruned-ultralytics.pt"
    assert save_for_ultralytics(pruned, info.names, IMGSZ, path)[: len(kept)] == kept
    loaded = YOLO(str(path)).model.float().eval()  # ultralytics' own loader
    assert type(loaded).__module__ == "ultralytics.nn.tasks"
    kinds = {type(m).__name__ for m in loaded.modules()}
    assert ("C2f" if "v8" in spec else "C3k2") in kinds  # native blocks restored
    assert ("SplitPSA" in kinds) == bool(kept)
    images = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    want = decoded(copy.deepcopy(pruned).half().float(), images)  # the file is fp16
    got = decoded(loaded, images)
    scale = want.abs().amax(dim=(0, 2), keepdim=True).clamp(min=1.0)
    assert ((got - want).abs() / scale).max() <= 1e-5


@needs_ultralytics
def test_deployment_dfl_matches_ultralytics_dfl_and_exports_no_softmax(tmp_path):
    import onnx
    from ultralytics.nn.modules.block import DFL

    from yoloprune.compiler.export import check_parity, deployed_model, export_onnx
    from yoloprune.graphs.ultralytics_family import DeploymentDFL, detect_head

    dfl = DFL(16)
    logits = 6 * torch.randn(2, 64, 300, generator=torch.Generator().manual_seed(0))
    want, got = dfl(logits), DeploymentDFL(dfl)(logits)
    assert got.shape == want.shape == (2, 4, 300)
    assert (got - want).abs().max() <= 1e-5 * 15  # distances in bins, 0..15
    assert (DeploymentDFL(dfl)(logits.flip(1)) - want).abs().max() > 0.1  # negative control
    large = 100 * logits  # exp overflows float32 past 88: the max shift must keep it finite
    assert (DeploymentDFL(dfl)(large) - dfl(large)).abs().max() <= 1e-4

    model, _ = calibrated("yolov8n.yaml")
    assert type(detect_head(deployed_model(model, "raw")).dfl) is DeploymentDFL
    assert type(detect_head(model).dfl) is DFL  # the model itself keeps ultralytics' module
    path = export_onnx(model, tmp_path / "v8n.onnx", IMGSZ)
    parity = check_parity(model, path, IMGSZ)  # against the model's own (ultralytics') DFL
    assert parity.ok, parity
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Softmax" not in ops and {"Exp", "ReduceMax", "MatMul"} <= ops


@needs_ultralytics
def test_model_with_dropped_blocks_saved_for_ultralytics_loads_in_ultralytics(tmp_path):
    from ultralytics import YOLO

    from yoloprune.graphs.blocks import drop_blocks
    from yoloprune.graphs.ultralytics_family import save_for_ultralytics

    model, info = calibrated("yolov8n.yaml")
    dropped = copy.deepcopy(model)
    drop_blocks(dropped, ["model.2.m.0", "model.4.m.1"])
    path = tmp_path / "dropped-ultralytics.pt"
    save_for_ultralytics(dropped, info.names, IMGSZ, path)
    loaded = YOLO(str(path)).model.float().eval()
    assert type(loaded.model[2].m[0]) is torch.nn.Identity
    images = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    want = decoded(copy.deepcopy(dropped).half().float(), images)  # the file is fp16
    got = decoded(loaded, images)
    scale = want.abs().amax(dim=(0, 2), keepdim=True).clamp(min=1.0)
    assert ((got - want).abs() / scale).max() <= 1e-5
    assert ((decoded(model, images) - want).abs() / scale).max() > 1e-3  # the drop shows


STOCK_ULTRALYTICS = """
import importlib.abc, json, sys

class NoYoloprune(importlib.abc.MetaPathFinder):
    # as in an environment with ultralytics but without yoloprune
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("yoloprune", "graphs", "compiler", "kernels", "tests"):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoYoloprune())
import numpy as np, torch
from ultralytics import YOLO

model = YOLO(sys.argv[1]).model.float().eval()
size = int(sys.argv[3])
images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    np.save(sys.argv[2], model(images)[0].numpy())
print(json.dumps(sorted({type(m).__module__.split(".")[0] for m in model.modules()})))
"""


@needs_ultralytics
@pytest.mark.parametrize("spec", FAMILIES)
def test_default_compile_loads_in_stock_ultralytics_without_yoloprune(tmp_path, spec):
    """The -pruned-ultralytics.pt of a default compile loads where yoloprune cannot be
    imported, with ultralytics' own classes only, and computes what our pruned model computes
    (which compile checked against the ONNX file)."""
    import subprocess

    import numpy as np

    from yoloprune.compiler.cli import main
    from yoloprune.graphs.checkpoint import load_model, save_pruned

    model, info = calibrated(spec)
    source = tmp_path / f"{spec.split('.')[0]}.pt"
    save_pruned(model, info, source)
    out = tmp_path / "out"
    argv = ["compile", str(source), "--imgsz", str(IMGSZ), "--out", str(out), "--no-bench"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    saved = report["export"]["ultralytics_checkpoint"]
    assert saved["blocks_kept_as_yoloprune_classes"] == []
    assert report["parity"]["max_abs_diff"] <= report["parity"]["tolerance"]
    assert report["macs"]["ratio"] == pytest.approx(0.5, abs=0.015)
    result = tmp_path / "stock.npy"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            STOCK_ULTRALYTICS,
            str(out / saved["file"]),
            str(result),
            str(IMGSZ),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["torch", "ultralytics"]
    pruned, _ = load_model(out / f"{source.stem}-pruned.pt")
    images = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    want = decoded(pruned.half().float(), images)  # the ultralytics file is fp16
    got = torch.from_numpy(np.load(result))
    scale = want.abs().amax(dim=(0, 2), keepdim=True).clamp(min=1.0)
    assert ((got - want).abs() / scale).max() <= 1e-5


@needs_ultralytics
def test_allow_custom_modules_lets_halves_differ_and_says_so(tmp_path):
    from yoloprune.compiler.cli import main
    from yoloprune.graphs.checkpoint import save_pruned

    model, info = calibrated("yolo26n.yaml")
    source = tmp_path / "yolo26n.pt"
    save_pruned(model, info, source)
    out = tmp_path / "out"
    argv = ["compile", str(source), "--imgsz", str(IMGSZ), "--out", str(out), "--no-bench"]
    assert main([*argv, "--allow-custom-modules"]) == 0
    report = json.loads((out / "report.json").read_text())
    kept = report["export"]["ultralytics_checkpoint"]["blocks_kept_as_yoloprune_classes"]
    assert "model.10" in kept  # C2PSA: its bypass half pruned, its attention half whole
    assert "yoloprune" in (out / "report.md").read_text()
