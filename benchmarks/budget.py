"""Accuracy against fine-tune budget at MACs kept 0.3: yoloprune's best recipe and
torch-pruning's default recipe, each fine-tuned for 1, 2, 4 and 8 epochs, three seeds.

accuracy.py compares the recipes at one budget (8 epochs). This sweep shows how the gap
between them depends on how long the user fine-tunes: both recipes start from a pruned model
and retrain, so the longer the budget, the more of the starting point's advantage is trained
away.

- yoloprune: uniform Taylor importance, round_to 8, BatchNorm statistics re-estimated on
  training images, distillation from the unpruned model (as accuracy.py's Taylor row);
- torch-pruning: MetaPruner, GroupMagnitudeImportance(p=2), one uniform ratio bisected to the
  same MACs, no distillation (its default);
- yoloprune one-shot: compile's defaults with --data (energy importance on unlabeled training
  images, one-shot reconstruction, no BatchNorm re-estimation), distillation as the first.

Same fine-tune for both at each budget: the training images, AdamW, lr, batch, EMA, seed.
Each (recipe, budget, seed) cell is saved as it finishes; a rerun skips the cells already in
budget.json for the same settings (delete the file to start over).

    python benchmarks/budget.py [--epochs 1 2 4 8] [--seeds 0 1 2]
Writes benchmarks/results/budget.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import recipes  # noqa: E402
from accuracy import (  # noqa: E402
    MODEL,
    OURS_AFTER_PLAN,
    finetune_settings,
    pruned_like_compile,
    subset,
)

from yoloprune.compiler.evaluation.evaluate import evaluate, torch_predictor, val_dataset  # noqa: E402
from yoloprune.compiler.pipeline import CompileOptions, prepare  # noqa: E402
from yoloprune.compiler.train.data import read_data_yaml  # noqa: E402
from yoloprune.compiler.train.finetune import train  # noqa: E402
from yoloprune.compiler.train.synthetic import SyntheticSpec, generate  # noqa: E402
from yoloprune.graphs.files import save_png_atomic, write_text_atomic  # noqa: E402
from yoloprune.kernels.ort import machine_info  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
OURS = "yoloprune best"
THEIRS = "torch-pruning default"
ONESHOT = "yoloprune one-shot"


def build(prepared, data_yaml: Path, macs: float) -> dict:
    """The two pruned models before fine-tuning: {name: (model, recipe, distill weight)}."""
    base, imgsz = prepared.model, prepared.imgsz
    options = CompileOptions(
        str(MODEL), macs=macs, importance="taylor", data=data_yaml, reconstruct=False, round_to=8,
        allocation="uniform",
    )  # fmt: skip
    ours = pruned_like_compile(prepared, options, data_yaml)
    theirs, ratio, _ = recipes.torch_pruning_default(base, macs, imgsz)
    oneshot = pruned_like_compile(
        prepared, CompileOptions(str(MODEL), macs=macs, round_to=8), data_yaml
    )
    return {
        OURS: (ours, f"uniform Taylor, round_to 8, {OURS_AFTER_PLAN}", 1.0),
        THEIRS: (theirs, f"MetaPruner L2, ratio {ratio:.3f}, no distillation", 0.0),
        ONESHOT: (
            oneshot,
            "uniform energy importance, round_to 8, one-shot reconstruction on 128 unlabeled "
            "train images (compile's default with --data), distill 1.0",
            1.0,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--macs", type=float, default=0.3)
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--lr0", type=float, default=0.003)
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "data" / "shapes")
    args = parser.parse_args()
    data_yaml = args.data / "data.yaml"
    if not data_yaml.exists():
        generate(args.data, SyntheticSpec())
    data = read_data_yaml(data_yaml)
    prepared = prepare(str(MODEL))
    imgsz = prepared.imgsz
    val = val_dataset(data, imgsz)
    train_data = subset(data, args.train_images, Path(tempfile.mkdtemp()))
    settings = {"macs": args.macs, "train_images": args.train_images, "lr0": args.lr0}
    result = load_previous(settings) or {
        "benchmark": "budget",
        "model": str(MODEL.relative_to(ROOT)),
        "imgsz": imgsz,
        "val_images": len(val),
        "settings": settings,
        "machine": machine_info(),
        "recipes": {},
        "cells": [],
    }

    def score(model) -> float:
        return round(evaluate(torch_predictor(model), val, data.names, progress=False).map50_95, 4)

    models = build(prepared, data_yaml, args.macs)
    for name, (model, recipe, _) in models.items():
        kept = recipes.conv_macs(model, imgsz) / recipes.conv_macs(prepared.model, imgsz)
        result["recipes"][name] = {"recipe": recipe, "macs_kept": round(kept, 4)}
        result["recipes"][name]["before"] = score(model)
    done = {(c["recipe"], c["epochs"], c["seed"]) for c in result["cells"]}
    for epochs in args.epochs:
        for seed in args.seeds:
            for name, (model, _, distill) in models.items():
                if (name, epochs, seed) in done:
                    continue
                budget = finetune_settings(epochs, imgsz, args.lr0, distill=distill, seed=seed)
                start = time.perf_counter()
                tuned = train(
                    copy.deepcopy(model),
                    prepared.info,
                    train_data,
                    budget,
                    teacher=prepared.model if distill else None,
                    progress=True,
                ).model
                cell = {"recipe": name, "epochs": epochs, "seed": seed, "map50_95": score(tuned)}
                cell["finetune_s"] = round(time.perf_counter() - start, 1)
                result["cells"].append(cell)
                result["finetune"] = {
                    k: v for k, v in dataclasses.asdict(budget).items() if k != "epochs"
                }
                save(result)
                print(cell, flush=True)
    print(render(result))


def load_previous(settings: dict) -> dict | None:
    path = RESULTS / "budget.json"
    if not path.exists():
        return None
    previous = json.loads(path.read_text())
    return previous if previous.get("settings") == settings else None


def summary(result: dict) -> list[dict]:
    """Per budget: each recipe's mean and per-seed mAP, and the gap in points (ours - theirs,
    over the seeds both have)."""
    rows = []
    for epochs in sorted({c["epochs"] for c in result["cells"]}):
        cells = [c for c in result["cells"] if c["epochs"] == epochs]
        by = {
            name: {c["seed"]: c["map50_95"] for c in cells if c["recipe"] == name}
            for name in (OURS, THEIRS)
        }
        seeds = sorted(set(by[OURS]) & set(by[THEIRS]))
        if not seeds:
            continue
        ours = statistics.mean(by[OURS][s] for s in seeds)
        theirs = statistics.mean(by[THEIRS][s] for s in seeds)
        gaps = [100 * (by[OURS][s] - by[THEIRS][s]) for s in seeds]
        rows.append(
            {
                "epochs": epochs,
                "seeds": seeds,
                OURS: [by[OURS][s] for s in seeds],
                THEIRS: [by[THEIRS][s] for s in seeds],
                "ours_mean": ours,
                "theirs_mean": theirs,
                "gap_points": 100 * (ours - theirs),
                "gap_points_min": min(gaps),
                "finetune_s": statistics.mean(
                    c["finetune_s"] for c in cells if c["recipe"] == THEIRS
                ),
            }
        )
        oneshot = {c["seed"]: c["map50_95"] for c in cells if c["recipe"] == ONESHOT}
        both = sorted(set(oneshot) & set(by[THEIRS]))
        if both:
            rows[-1][ONESHOT] = [oneshot[s] for s in both]
            rows[-1]["oneshot_seeds"] = both
            rows[-1]["oneshot_mean"] = statistics.mean(oneshot[s] for s in both)
            rows[-1]["oneshot_gap_points"] = 100 * (
                rows[-1]["oneshot_mean"] - statistics.mean(by[THEIRS][s] for s in both)
            )
            rows[-1]["oneshot_gap_points_min"] = min(
                100 * (oneshot[s] - by[THEIRS][s]) for s in both
            )
    return rows


def save(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result["summary"] = summary(result)
    write_text_atomic(RESULTS / "budget.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(RESULTS / "budget.md", render(result))
    if result["summary"]:
        plot(result, RESULTS / "budget.png")


def render(result: dict) -> str:
    s, m, ft = result["settings"], result["machine"], result.get("finetune", {})
    recipes_text = "; ".join(
        f"**{name}**: {r['recipe']} (MACs kept {r['macs_kept']:.3f}, mAP before fine-tuning "
        f"{r['before']:.4f})"
        for name, r in result["recipes"].items()
    )
    lines = [
        f"# Accuracy against fine-tune budget at MACs kept {s['macs']} (embedded YOLOv5n)",
        "",
        f"Val: {result['val_images']} synthetic images at {result['imgsz']} px, mAP@.5:.95 by "
        f"pycocotools (val.py conventions). Fine-tune, the same for both recipes at each budget: "
        f"{s['train_images']} training images, AdamW lr {s['lr0']:g}, batch "
        f"{ft.get('batch', 16)}, warm-up {ft.get('warmup_epochs', 0.5)} epoch, cosine decay, "
        f"EMA, fp32 on CPU ({m['cpu']}, {m['cores_available']} cores). {recipes_text}.",
        "",
        "| epochs | seeds | yoloprune best (per seed) | torch-pruning default (per seed) | "
        "yoloprune mean | torch-pruning mean | gap, points (mean) | gap, smallest seed | "
        "fine-tune s (torch-pruning) |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result.get("summary", []):
        lines.append(
            f"| {r['epochs']} | {', '.join(map(str, r['seeds']))} | "
            f"{', '.join(f'{v:.4f}' for v in r[OURS])} | "
            f"{', '.join(f'{v:.4f}' for v in r[THEIRS])} | {r['ours_mean']:.4f} | "
            f"{r['theirs_mean']:.4f} | {r['gap_points']:+.1f} | {r['gap_points_min']:+.1f} | "
            f"{r['finetune_s']:.0f} |"
        )
    oneshot = [r for r in result.get("summary", []) if ONESHOT in r]
    if oneshot:
        lines += [
            "",
            f"Starting from one-shot reconstruction (**{ONESHOT}**), against the same "
            "torch-pruning cells:",
            "",
            f"| epochs | seeds | {ONESHOT} (per seed) | {ONESHOT} mean | torch-pruning mean | "
            "gap, points (mean) | gap, smallest seed |",
            "|---:|---|---|---:|---:|---:|---:|",
        ]
        for r in oneshot:
            lines.append(
                f"| {r['epochs']} | {', '.join(map(str, r['oneshot_seeds']))} | "
                f"{', '.join(f'{v:.4f}' for v in r[ONESHOT])} | {r['oneshot_mean']:.4f} | "
                f"{r['oneshot_mean'] - r['oneshot_gap_points'] / 100:.4f} | "
                f"{r['oneshot_gap_points']:+.1f} | {r['oneshot_gap_points_min']:+.1f} |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["summary"]
    epochs = [r["epochs"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, name in (("ours_mean", OURS), ("theirs_mean", THEIRS), ("oneshot_mean", ONESHOT)):
        had = [r for r in rows if key in r]
        if not had:
            continue
        (line,) = ax.plot([r["epochs"] for r in had], [r[key] for r in had], marker="o", label=name)
        before = result["recipes"][name]["before"]
        ax.scatter([0], [before], marker="x", color=line.get_color())
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks([0, *epochs], labels=["0", *map(str, epochs)])
    ax.set_xlabel("fine-tune epochs (0: pruned, before fine-tuning)")
    ax.set_ylabel("mAP@.5:.95 (mean over seeds)")
    ax.set_title(f"MACs kept {result['settings']['macs']}, embedded YOLOv5n, synthetic val")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png_atomic(fig, path)


if __name__ == "__main__":
    main()
