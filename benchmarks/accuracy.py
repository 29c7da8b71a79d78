"""Accuracy benchmark: mAP and latency of pruned + fine-tuned models, side by side.

The embedded model (YOLOv5n trained on the synthetic shapes) on the synthetic val set:
- yoloprune at MACs kept 0.5 and 0.3 (uniform L2, round_to 8), and at 0.3 with Taylor
  importance (loss gradients on training images), BatchNorm statistics re-estimated after
  pruning (as compile does with --data), fine-tuned with distillation;
- torch-pruning's default recipe at MACs 0.3 (MetaPruner, L2, uniform), same fine-tune budget
  (no distillation: its default);
- the unstructured 30% baseline (yolov5's torch_utils.prune), fine-tuned the same, zeros re-applied.
Every row: mAP@.5:.95 / mAP@.5 before and after fine-tuning (PyTorch), MACs, params, and
ONNX Runtime CPU latency (batch 1, fp32, interleaved with the baseline).

    python benchmarks/accuracy.py [--epochs 4] [--train-images 1000]
    python benchmarks/accuracy.py --rows "yoloprune MACs 0.3 Taylor"   # one row, merged
    python benchmarks/accuracy.py --latency-only                        # latency column only
Writes benchmarks/results/accuracy.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import recipes  # noqa: E402

from yoloprune.compiler.apply import count_params  # noqa: E402
from yoloprune.compiler.evaluation.evaluate import evaluate, torch_predictor, val_dataset  # noqa: E402
from yoloprune.compiler.export import export_onnx  # noqa: E402
from yoloprune.compiler.pipeline import CompileOptions, prepare, prune_in_memory  # noqa: E402
from yoloprune.compiler.train.data import read_data_yaml  # noqa: E402
from yoloprune.compiler.train.finetune import TrainSettings, train  # noqa: E402
from yoloprune.compiler.train.synthetic import SyntheticSpec, generate  # noqa: E402
from yoloprune.compiler.unstructured import sparsify, sparsity  # noqa: E402
from yoloprune.kernels.ort import OrtRunner, default_threads, machine_info, order_text, time_runners  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODEL = ROOT / "graphs" / "weights" / "yolov5n-shapes.pt"
OURS_AFTER_PLAN = "BN recalibrated (20 x 32 train images), distill 1.0 (objectness-weighted KL)"


def finetune_settings(epochs: int, imgsz: int, lr0: float, **changes) -> TrainSettings:
    """The fine-tune every pruned row gets: AdamW, batch 16, half an epoch of warm-up, EMA,
    validated once at the end."""
    return TrainSettings(
        epochs=epochs,
        batch=16,
        nominal_batch=16,
        imgsz=imgsz,
        optimizer="adamw",
        lr0=lr0,
        momentum=0.9,
        warmup_epochs=0.5,
        # how the committed results were trained (before the fine-tuning defaults changed)
        schedule_every="epoch",
        warmup_bias_lr=0.1,
        eval_every=epochs,
        **changes,
    )


def pruned_like_compile(prepared, options: CompileOptions, data_yaml: Path):
    """Compile's own stages on ``data_yaml`` (score + plan, apply, then reconstruction or
    BatchNorm recalibration, as ``options`` say)."""
    options = dataclasses.replace(options, data=data_yaml)
    return prune_in_memory(options, prepared)["pruned"]


def subset(data, count: int, folder: Path):
    """The first ``count`` training images, as a list file (yolov5's .txt source format)."""
    from yoloprune.compiler.train.data import image_files

    files = image_files(data.train)[:count]
    listing = folder / "train_subset.txt"
    listing.write_text("".join(f"{f}\n" for f in files))
    return dataclasses.replace(data, train=(listing,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "data" / "shapes")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument(
        "--lr0",
        type=float,
        default=0.003,
        help="AdamW learning rate of every row's fine-tune (at MACs 0.3, 0.003 beat 0.001 by "
        "1.3-1.8 points of mAP@.5:.95 for both yoloprune Taylor and torch-pruning)",
    )
    parser.add_argument(
        "--latency-only",
        action="store_true",
        help="re-measure the latency column of an existing accuracy.json (latency "
        "depends on the architecture only, which every recipe rebuilds "
        "deterministically without fine-tuning)",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        default=None,
        help="fine-tune and score only these rows, merged into the existing accuracy.json "
        "(same budget); then the latency of every row is re-measured",
    )
    args = parser.parse_args()
    data_yaml = args.data / "data.yaml"
    if args.latency_only:
        prepared = prepare(str(MODEL))
        built = architectures(prepared, prepared.imgsz, data_yaml)
        remeasure_latency(args.runs, built, prepared.imgsz)
        return
    if not data_yaml.exists():
        generate(args.data, SyntheticSpec())
    data = read_data_yaml(data_yaml)
    prepared = prepare(str(MODEL))
    base, imgsz = prepared.model, prepared.imgsz
    val = val_dataset(data, imgsz)
    scratch = Path(tempfile.mkdtemp())
    train_data = subset(data, args.train_images, scratch)
    budget = finetune_settings(args.epochs, imgsz, args.lr0)

    def score(model):
        m = evaluate(torch_predictor(model), val, data.names, progress=False)
        return {"map50_95": m.map50_95, "map50": m.map50}

    def finetune(model, distill: float):
        start = time.perf_counter()
        settings = dataclasses.replace(budget, distill=distill)
        result = train(
            model,
            prepared.info,
            train_data,
            settings,
            teacher=base if distill else None,
            progress=True,
        )
        return result.model, round(time.perf_counter() - start, 1)

    start_all = time.perf_counter()
    built = architectures(prepared, imgsz, data_yaml)
    models = built
    if args.rows:
        unknown = set(args.rows) - set(built)
        if unknown:
            raise SystemExit(f"--rows: no row named {sorted(unknown)}; rows: {list(built)}")
        models = {k: v for k, v in built.items() if k in args.rows}
    rows = {}
    for name, (model, recipe) in models.items():
        row = {"before": score(model), "recipe": recipe}
        if name.startswith("yoloprune") or name.startswith("torch-pruning"):
            # ours distils from the original; torch-pruning's default recipe does not
            distill = 1.0 if name.startswith("yoloprune") else 0.0
            model, row["finetune_s"] = finetune(model, distill=distill)
            row["after"] = score(model)
        else:  # the baseline, and unstructured sparsity (no channel removed: nothing to win back)
            row["after"] = row["before"]
        if name.startswith("unstructured"):
            row["sparsity"] = sparsity(model)
        row["model"] = model
        rows[name] = row

    if args.rows:
        merge_rows(rows, built, imgsz, args, time.perf_counter() - start_all)
        return
    macs_before = recipes.conv_macs(base, imgsz)
    for row in rows.values():
        row["macs_ratio"] = recipes.conv_macs(row["model"], imgsz) / macs_before
        row["params"] = count_params(row["model"])
    timings = measure_latency({k: r["model"] for k, r in rows.items()}, imgsz, args.runs)
    base_ms = timings["baseline (unpruned)"].median_ms
    for name, row in rows.items():
        row["latency_ms"] = timings[name].to_dict()
        row["latency_ratio"] = timings[name].median_ms / base_ms
        row.pop("model")
    result = {
        "benchmark": "accuracy",
        "model": str(MODEL.relative_to(ROOT)),
        "imgsz": imgsz,
        "val_images": len(val),
        "finetune": {
            "epochs": args.epochs,
            "train_images": args.train_images,
            "settings": dataclasses.asdict(budget),
        },
        "latency": {
            "runtime": "onnxruntime CPU",
            "batch": 1,
            "precision": "fp32",
            "threads": default_threads(),
            "runs": args.runs,
            "spinning": "off (session.intra_op.allow_spinning=0)",
            "order": order_text(spinning=False),
        },
        "machine": machine_info(),
        "rows": rows,
        "seconds": round(time.perf_counter() - start_all, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "accuracy.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "accuracy.md").write_text(render(result))
    print(render(result))


def merge_rows(rows: dict, built: dict, imgsz: int, args, seconds: float) -> None:
    """Put freshly fine-tuned ``rows`` into the committed accuracy.json (in the order of
    ``built``, architectures()' result), then re-measure every row's latency so all ratios come
    from one run."""
    result = json.loads((RESULTS / "accuracy.json").read_text())
    budget = result["finetune"]
    if budget["epochs"] != args.epochs or budget["settings"].get("lr0") != args.lr0:
        raise SystemExit("--rows: use the committed results' fine-tune budget (--epochs, --lr0)")
    macs_before = recipes.conv_macs(built["baseline (unpruned)"][0], imgsz)
    for row in rows.values():
        row["macs_ratio"] = recipes.conv_macs(row["model"], imgsz) / macs_before
        row["params"] = count_params(row.pop("model"))
        row["added"] = f"--rows run, {seconds:.0f} s"
    merged = {**result["rows"], **rows}
    result["rows"] = {k: merged[k] for k in built if k in merged}
    (RESULTS / "accuracy.json").write_text(json.dumps(result, indent=1) + "\n")
    remeasure_latency(args.runs, built, imgsz)


def architectures(prepared, imgsz: int, data_yaml: Path) -> dict:
    """Every row's model before fine-tuning, with its recipe: {name: (model, recipe)}."""
    base = prepared.model
    models = {"baseline (unpruned)": (base, "-")}

    def ours(options: CompileOptions):
        return pruned_like_compile(prepared, options, data_yaml)

    for macs in (0.5, 0.3):
        models[f"yoloprune MACs {macs}"] = (
            ours(
                CompileOptions(
                    str(MODEL), macs=macs, importance="l2", reconstruct=False, round_to=8
                )
            ),
            f"uniform L2, round_to 8, {OURS_AFTER_PLAN}",
        )
    taylor = CompileOptions(
        str(MODEL), macs=0.3, importance="taylor", data=data_yaml, reconstruct=False, round_to=8,
        allocation="uniform",
    )  # fmt: skip
    models["yoloprune MACs 0.3 Taylor"] = (
        ours(taylor),
        f"uniform Taylor (8 batches of 16 train images), round_to 8, {OURS_AFTER_PLAN}",
    )
    tp_model, tp_ratio, _ = recipes.torch_pruning_default(base, 0.3, imgsz)
    models["torch-pruning default MACs 0.3"] = (tp_model, f"MetaPruner L2, ratio {tp_ratio:.3f}")
    models["unstructured 30% (yolov5 torch_utils.prune)"] = (
        sparsify(base, 0.3),
        "L1 unstructured 30% per conv, no fine-tune",
    )
    return models


def measure_latency(models: dict, imgsz: int, runs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as active:
        runners = {
            name: active.enter_context(OrtRunner(export_onnx(m, Path(tmp) / f"m{i}.onnx", imgsz)))
            for i, (name, m) in enumerate(models.items())
        }
        images = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
        return time_runners(runners, images, runs, warmup=5)


def remeasure_latency(runs: int, built: dict, imgsz: int) -> None:
    """Re-time every row of accuracy.json on ``built`` (architectures()' models: latency
    depends on the architecture only)."""
    result = json.loads((RESULTS / "accuracy.json").read_text())
    models = {k: m for k, (m, _) in built.items() if k in result["rows"]}
    timings = measure_latency(models, imgsz, runs)
    base_ms = timings["baseline (unpruned)"].median_ms
    for name, row in result["rows"].items():
        row["latency_ms"] = timings[name].to_dict()
        row["latency_ratio"] = timings[name].median_ms / base_ms
    result["latency"].update(
        runs=runs,
        spinning="off (session.intra_op.allow_spinning=0)",
        order=order_text(spinning=False),
        remeasured="latency only, architectures rebuilt without fine-tuning",
    )
    (RESULTS / "accuracy.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "accuracy.md").write_text(render(result))
    print(render(result))


def render(result: dict) -> str:
    base = result["rows"]["baseline (unpruned)"]["after"]["map50_95"]
    ft = result["finetune"]
    m = result["machine"]
    order = result["latency"].get("order", "interleaved A B A B, intra-op spinning off")
    lines = [
        "# Accuracy after pruning and fine-tuning (synthetic shapes, embedded YOLOv5n)",
        "",
        f"Val: {result['val_images']} synthetic images at {result['imgsz']} px, mAP by "
        "pycocotools with val.py conventions (conf 0.001, IoU 0.6, 300 detections). Fine-tune "
        f"budget, the same for every pruned row: {ft['epochs']} epochs on {ft['train_images']} "
        f"training images, AdamW lr {ft['settings']['lr0']:g}, batch 16, EMA. Latency: ONNX "
        "Runtime CPU, fp32, batch 1, "
        f"{result['latency']['threads']} threads, median of {result['latency']['runs']} runs "
        f"({order}), on {m['cpu']} ({m['cores_available']} cores); latency depends on the "
        "architecture only.",
        "",
        "| model | recipe | MACs kept | mAP@.5:.95 before FT | after FT | % of unpruned | "
        "mAP@.5 after | latency ratio | fine-tune s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["rows"].items():
        lines.append(
            f"| {name} | {r.get('recipe', '-')} | {r['macs_ratio']:.3f} | "
            f"{r['before']['map50_95']:.4f} | {r['after']['map50_95']:.4f} | "
            f"{100 * r['after']['map50_95'] / base:.1f}% | {r['after']['map50']:.4f} | "
            f"{r['latency_ratio']:.3f} | {r.get('finetune_s', '-')} |"
        )
    lines += [
        "",
        "How the MACs 0.3 comparison with torch-pruning depends on the fine-tune budget (1 to 8 "
        "epochs, two seeds): budget.md (benchmarks/budget.py).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
