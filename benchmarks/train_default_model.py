"""Train an embedded model on the synthetic shapes dataset, from scratch, with our own loop.

``--model yolov5n`` (default) reproduces graphs/weights/yolov5n-shapes.pt (the default MODEL of
`make compile`) and writes benchmarks/results/train_default_model.{json,md}; ``--model
yolov8n`` trains the ultralytics-family model (graphs/weights/yolov8n-shapes.pt, results
train_yolov8n_shapes.{json,md}; needs the ultralytics extra), so distillation, depth pruning
and INT8 can be measured on a trained anchor-free model too; ``--model yolo26n`` the NMS-free
one (graphs/weights/yolo26n-shapes.pt, results train_yolo26n_shapes.{json,md}), which the
YOLO26 compile tests start from. CPU is enough.

    python benchmarks/train_default_model.py [--model yolov5n|yolov8n|yolo26n] [--epochs 24]
        [--imgsz 256]
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
from yoloprune.graphs.family import family_of  # noqa: E402
from yoloprune.graphs.files import write_text_atomic  # noqa: E402
from yoloprune.graphs.yolov5 import DetectionModel  # noqa: E402
from yoloprune.kernels.ort import machine_info  # noqa: E402

WEIGHTS_DIR = ROOT / "graphs" / "weights"
RESULTS = ROOT / "benchmarks" / "results"
RESULT_NAMES = {
    "yolov5n": "train_default_model",
    "yolov8n": "train_yolov8n_shapes",
    "yolo26n": "train_yolo26n_shapes",
}


def untrained(name: str, nc: int):
    """The architecture at ``nc`` classes, seeded random init."""
    if name == "yolov5n":
        cfg = yaml.safe_load((CFG_DIR / "yolov5n.yaml").read_text())
        cfg["nc"] = nc
        return DetectionModel(cfg)
    from yoloprune.graphs.ultralytics_family import build

    return build(f"{name}.yaml", nc=nc)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(RESULT_NAMES), default="yolov5n")
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
    weights = WEIGHTS_DIR / f"{args.model}-shapes.pt"
    model = untrained(args.model, data.nc)
    family_of(model).adopt_names(model, list(data.names))
    info = describe(model, weights.name, pretrained=True, imgsz=args.imgsz)
    settings = TrainSettings(
        epochs=args.epochs,
        batch=16,
        nominal_batch=16,
        imgsz=args.imgsz,
        optimizer="adamw",
        lr0=0.002,
        momentum=0.9,
        warmup_epochs=2,
        # how the committed results were trained (before the fine-tuning defaults changed)
        schedule_every="epoch",
        warmup_bias_lr=0.1,
        eval_every=2,
    )
    start = time.perf_counter()
    save_dir = ROOT / "runs" / f"train-{args.model}"
    save_dir.mkdir(parents=True, exist_ok=True)
    result = train(model, info, data, settings, save_dir=save_dir)
    best = result.model.half().float().eval()  # what the fp16 checkpoint will hold
    metrics = evaluate(torch_predictor(best), val_dataset(data, args.imgsz), data.names)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_pruned(
        best.half(),
        info,
        weights,
        extra={
            "trained_on": "synthetic shapes (compiler/synthetic.py)",
            "data": {"seed": spec.seed, "train": spec.train, "val": spec.val, "imgsz": spec.imgsz},
            "map50_95": metrics.map50_95,
            "map50": metrics.map50,
        },
    )
    summary = {
        "model": args.model,
        "imgsz": args.imgsz,
        "epochs": args.epochs,
        "settings": {k: v for k, v in vars(settings).items()},
        "seconds": round(time.perf_counter() - start, 1),
        "recipe": result.recipe,
        "mixed_precision": result.mixed_precision,
        "history": result.history,
        "val": metrics.to_dict(),
        "weights": str(weights.relative_to(ROOT)),
        "weights_bytes": weights.stat().st_size,
        "machine": machine_info(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = RESULT_NAMES[args.model]
    write_text_atomic(RESULTS / f"{name}.json", json.dumps(summary, indent=1) + "\n")
    title = "Embedded default model: YOLOv5n" if args.model == "yolov5n" else args.model
    lines = [
        f"# {title} trained on synthetic shapes",
        "",
        f"From scratch, {args.epochs} epochs, {args.imgsz}x{args.imgsz}, AdamW lr 0.002, "
        f"batch 16, cosine, EMA, the forward in {result.mixed_precision or 'fp32'}; "
        f"{spec.train} train / {spec.val} val images (seed "
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
    losses = [
        k
        for k in result.history[0]
        if k not in ("epoch", "map50_95", "map50", "lr", "train_seconds")
    ]
    losses = [k for k in losses if isinstance(result.history[0][k], float)]
    lines += ["", "| epoch | " + " | ".join(losses) + " | mAP@.5:.95 |"]
    lines += ["|---:|" + "---:|" * (len(losses) + 1)]
    lines += [
        f"| {h['epoch']} | "
        + " | ".join(f"{h[k]:.4f}" for k in losses)
        + f" | {h.get('map50_95', float('nan')):.3f} |"
        for h in result.history
    ]
    write_text_atomic(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines[:5]))


if __name__ == "__main__":
    main()
