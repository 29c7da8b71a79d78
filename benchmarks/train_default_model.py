"""Train the embedded default model: YOLOv5n on the synthetic shapes dataset, from scratch.

Reproduces graphs/weights/yolov5n-shapes.pt (the default MODEL of `make compile`) and writes
benchmarks/results/train_default_model.{json,md}. CPU is enough: about half an hour on 2 cores.

    python benchmarks/train_default_model.py [--epochs 40] [--imgsz 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from yoloprune.compiler.evaluation.evaluate import evaluate, torch_predictor, val_dataset  # noqa: E402
from yoloprune.compiler.train.data import read_data_yaml  # noqa: E402
from yoloprune.compiler.train.finetune import TrainSettings, train  # noqa: E402
from yoloprune.compiler.train.synthetic import SyntheticSpec, generate  # noqa: E402
from yoloprune.graphs.checkpoint import CFG_DIR, describe, save_pruned  # noqa: E402
from yoloprune.graphs.yolov5 import DetectionModel  # noqa: E402
from yoloprune.kernels.ort import machine_info  # noqa: E402

WEIGHTS = ROOT / "graphs" / "weights" / "yolov5n-shapes.pt"
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--imgsz", type=int, default=256)
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "data" / "shapes")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--val-images", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = SyntheticSpec(train=args.train_images, val=args.val_images, imgsz=args.imgsz)
    data_yaml = args.data / "data.yaml"
    if not data_yaml.exists():
        generate(args.data, spec)
    data = read_data_yaml(data_yaml)
    cfg = yaml.safe_load((CFG_DIR / "yolov5n.yaml").read_text())
    cfg["nc"] = data.nc
    model = DetectionModel(cfg)
    model.names = list(data.names)
    info = describe(model, "yolov5n-shapes.pt", pretrained=True, imgsz=args.imgsz)
    settings = TrainSettings(
        epochs=args.epochs,
        batch=16,
        nominal_batch=16,
        imgsz=args.imgsz,
        optimizer="adamw",
        lr0=0.002,
        momentum=0.9,
        warmup_epochs=2,
        eval_every=2,
    )
    start = time.perf_counter()
    save_dir = ROOT / "runs" / "train-default"
    save_dir.mkdir(parents=True, exist_ok=True)
    result = train(model, info, data, settings, save_dir=save_dir)
    best = result.model.half().float().eval()  # what the fp16 checkpoint will hold
    metrics = evaluate(torch_predictor(best), val_dataset(data, args.imgsz), data.names)
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_pruned(
        best.half(),
        info,
        WEIGHTS,
        extra={
            "trained_on": "synthetic shapes (compiler/synthetic.py)",
            "data": {"seed": spec.seed, "train": spec.train, "val": spec.val, "imgsz": spec.imgsz},
            "map50_95": metrics.map50_95,
            "map50": metrics.map50,
        },
    )
    summary = {
        "model": "yolov5n",
        "imgsz": args.imgsz,
        "epochs": args.epochs,
        "settings": {k: v for k, v in vars(settings).items()},
        "seconds": round(time.perf_counter() - start, 1),
        "history": result.history,
        "val": metrics.to_dict(),
        "weights": str(WEIGHTS.relative_to(ROOT)),
        "weights_bytes": WEIGHTS.stat().st_size,
        "machine": machine_info(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_default_model.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        "# Embedded default model: YOLOv5n trained on synthetic shapes",
        "",
        f"From scratch, {args.epochs} epochs, {args.imgsz}x{args.imgsz}, AdamW lr 0.002, "
        f"batch 16, cosine, EMA; {spec.train} train / {spec.val} val images (seed "
        f"{spec.seed}). {summary['seconds'] / 60:.1f} min on {summary['machine']['cpu']} "
        f"({summary['machine']['cores_available']} cores, CPU).",
        "",
        f"Val (PyTorch, fp16 weights in fp32): mAP@.5:.95 **{metrics.map50_95:.3f}**, "
        f"mAP@.5 {metrics.map50:.3f}; {metrics.images} images, {metrics.instances} objects.",
        "",
        "| class | AP@.5:.95 |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in metrics.per_class.items()]
    lines += ["", "| epoch | box | obj | cls | mAP@.5:.95 |", "|---:|---:|---:|---:|---:|"]
    lines += [
        f"| {h['epoch']} | {h['box']:.4f} | {h['obj']:.4f} | {h['cls']:.4f} | "
        f"{h.get('map50_95', float('nan')):.3f} |"
        for h in result.history
    ]
    (RESULTS / "train_default_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:5]))


if __name__ == "__main__":
    main()
