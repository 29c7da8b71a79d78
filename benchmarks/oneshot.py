"""One-shot accuracy: what pruning keeps without labels or training, with and without
reconstruction (compile's `reconstruct` stage: each kept conv re-fitted by ridge least squares to
the original's outputs on unlabeled images).

For each embedded model (YOLOv5n, YOLOv8n, YOLO26n; synthetic shapes at 256 px) and MACs kept 0.9 to
0.5, compile's own in-memory stages (`prune_in_memory`: uniform L2, round_to 8) in two recipes:
**recalibrate** (the previous default: BatchNorm statistics re-estimated on 20 x 32 augmented
training images, no weight changed) and **reconstruct** (today's default with `--data`: 128
training images, letterboxed, labels never read). mAP@.5:.95 and mAP@.5 of the PyTorch model on
the val split, as a share of the original's, and the seconds and images each recipe used. Then
the cost bound: YOLOv5s (random init, architecture only) at 640 px reconstructed on 256 images,
with the default flags (`--round-to auto`) and with round_to 8: seconds and the activations
held.

    python benchmarks/oneshot.py [--macs 0.9,0.8,0.7,0.6,0.5] [--skip-cost]
Writes benchmarks/results/oneshot.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from yoloprune.compiler.evaluation.evaluate import evaluate, torch_predictor, val_dataset  # noqa: E402
from yoloprune.compiler.pipeline import CompileOptions, prepare, prune_in_memory  # noqa: E402
from yoloprune.compiler.train.data import read_data_yaml  # noqa: E402
from yoloprune.compiler.train.synthetic import SyntheticSpec, generate  # noqa: E402
from yoloprune.graphs.files import save_png_atomic, write_text_atomic  # noqa: E402
from yoloprune.kernels.ort import machine_info, machine_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODELS = [
    ROOT / "graphs" / "weights" / f"{name}-shapes.pt" for name in ("yolov5n", "yolov8n", "yolo26n")
]
RECIPES = {
    # the default before reconstruction: L2, BatchNorm statistics re-estimated
    "recalibrate": {"reconstruct": False, "importance": "l2", "allocation": "uniform"},
    "reconstruct, L2": {"importance": "l2", "allocation": "uniform"},
    "reconstruct, obs": {"importance": "obs", "allocation": "uniform"},
    # compile's default with --data or --calib-images until 2026-12-02
    "reconstruct, energy": {"allocation": "uniform"},
    "reconstruct, energy, sensitivity": {},  # compile's default with images since 2026-12-02
}
DEFAULT_RECIPE = "reconstruct, energy"
SENSITIVITY_RECIPE = "reconstruct, energy, sensitivity"
# The targets for the embedded YOLOv5n: share of the original's mAP@.5:.95.
TARGETS = {0.8: 0.97, 0.7: 0.93, 0.5: 0.80}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--macs", default="0.9,0.8,0.7,0.6,0.5")
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "data" / "shapes")
    parser.add_argument("--skip-cost", action="store_true", help="no YOLOv5s 640 timing")
    args = parser.parse_args()
    torch.manual_seed(0)
    data_yaml = args.data / "data.yaml"
    if not data_yaml.exists():
        generate(args.data, SyntheticSpec())
    data = read_data_yaml(data_yaml)
    macs_points = [float(v) for v in args.macs.split(",")]
    models = {}
    for path in MODELS:
        if path.exists():
            models[path.stem] = accuracy_rows(path, data_yaml, data, macs_points)
    result = {
        "benchmark": "oneshot",
        "machine": machine_info(),
        "runtime": "PyTorch CPU (fp32), eval mode; mAP by pycocotools with val.py conventions",
        "threads": torch.get_num_threads(),
        "data": f"synthetic shapes ({len(val_dataset(data, 256))} val images at 256 px)",
        "pruning": "compile's in-memory stages: uniform allocation (but the sensitivity "
        "recipe), round_to 8, --macs M",
        "recipes": {
            "recalibrate": "L2 importance; BatchNorm statistics re-estimated on 20 x 32 "
            "augmented train images (`--importance l2 --no-reconstruct`: the default before)",
            "reconstruct, L2": "L2 importance; ridge reconstruction on 128 letterboxed train "
            "images, no labels (`--importance l2`)",
            "reconstruct, obs": "importance: consumers' output error left after compensation "
            "(OBS) on 64 train images; reconstruction (`--importance obs`)",
            "reconstruct, energy": "importance: output energy each channel carries into its "
            "consumers on 64 train images; reconstruction (compile's default with --data or "
            "--calib-images)",
            "reconstruct, energy, sensitivity": "as reconstruct, energy, with channels shared "
            "among groups by measured sensitivity: each group pruned alone to 3/4, 1/2 and 1/4 "
            "on 32 train images, its head output error measured once per model, channels "
            "removed where they add the least error per MAC, max ratio 0.6 "
            "(`--allocation sensitivity`)",
        },
        "models": models,
    }
    if not args.skip_cost:
        result["cost"] = {
            name: cost_row(args.data / "images" / "train", **extra)
            for name, extra in COST_RECIPES.items()
        }
        result["allocation_cost"] = allocation_cost(args.data / "images" / "train")
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / "oneshot.json", json.dumps(result, indent=1) + "\n")
    plot(result, RESULTS / "oneshot.png")
    write_text_atomic(RESULTS / "oneshot.md", render(result, "oneshot.png"))
    print((RESULTS / "oneshot.md").read_text())


def accuracy_rows(path: Path, data_yaml: Path, data, macs_points: list[float]) -> dict:
    prepared = prepare(str(path))
    val = val_dataset(data, prepared.imgsz)

    def map_of(model):
        metrics = evaluate(torch_predictor(model), val, data.names, progress=False)
        return metrics.map50_95, metrics.map50

    original = map_of(prepared.model)
    rows = []
    for macs in macs_points:
        row = {"macs": macs}
        for recipe, extra in RECIPES.items():
            options = CompileOptions(str(path), macs=macs, data=data_yaml, round_to=8, **extra)
            start = time.perf_counter()
            job = prune_in_memory(options, prepared)
            seconds = time.perf_counter() - start
            map50_95, map50 = map_of(job["pruned"])
            rebuilt = job.artifacts.get("reconstructed") or {}
            measured = job["plan"].sensitivity
            row[recipe] = {
                "map50_95": round(map50_95, 4),
                "map50": round(map50, 4),
                "share": round(map50_95 / original[0], 4),
                "seconds": round(seconds, 1),  # plan + apply + the recovery step
                "images": rebuilt.get("images") or job.artifacts.get("recalibrated", 0),
                "recovery_seconds": rebuilt.get("seconds"),
                "head_error": [rebuilt.get("head_error_before"), rebuilt.get("head_error_after")]
                if rebuilt
                else None,
                # --allocation sensitivity: measured once per model (the first point), reused
                "allocation": None
                if measured is None
                else {"images": measured["images"], "seconds": measured["seconds"]},
            }
            print(path.stem, macs, recipe, row[recipe], flush=True)
        rows.append(row)
    return {
        "original": {"map50_95": round(original[0], 4), "map50": round(original[1], 4)},
        "imgsz": prepared.imgsz,
        "rows": rows,
    }


COST_RECIPES = {"default flags": {}, "--round-to 8": {"round_to": 8}}


def cost_row(images: Path, **extra) -> dict:
    """YOLOv5s at 640, MACs 0.5, reconstructed on 256 images (``--calib-images``): time and
    memory of the reconstruct stage (energy importance scored before it, not counted)."""
    options = CompileOptions(
        "yolov5s.yaml", imgsz=640, macs=0.5, calib_images=images, reconstruct_images=256, **extra
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    job = prune_in_memory(options)
    rebuilt = job["reconstructed"]
    return {
        "model": "yolov5s.yaml (random init: cost only)",
        "imgsz": 640,
        "macs": 0.5,
        "round_to": job["plan"].round_to,
        "images": rebuilt["images"],
        "seconds": rebuilt["seconds"],
        "peak_activation_mib": rebuilt["peak_activation_mib"],
        "max_rss_gib": round(
            max(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20, 2
        ),
        "convs_fitted": rebuilt["convs_fitted"],
    }


def allocation_cost(images: Path) -> dict:
    """YOLOv5s at 640, MACs 0.5: --allocation sensitivity's measurement with its default
    images (planning only)."""
    from yoloprune.compiler.pipeline import plan_for

    options = CompileOptions(
        "yolov5s.yaml", imgsz=640, macs=0.5, calib_images=images, allocation="sensitivity"
    )
    prepared = prepare(options.model, 640)
    plan = plan_for(prepared, options)
    return {
        "model": "yolov5s.yaml (random init: cost only)",
        "imgsz": 640,
        "groups": len(plan.sensitivity["errors"]),
        "images": plan.sensitivity["images"],
        "seconds": plan.sensitivity["seconds"],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, (name, model) in zip(axes[0], models.items(), strict=True):
        macs = [r["macs"] for r in model["rows"]]
        for recipe, style in zip(RECIPES, ("o--", "s:", "d-.", "s-", "^-"), strict=True):
            ax.plot(macs, [r[recipe]["share"] for r in model["rows"]], style, label=recipe)
        if name.startswith("yolov5n"):
            ax.plot(list(TARGETS), list(TARGETS.values()), "k^", label="issue target")
        ax.set_xlabel("MACs kept")
        ax.set_ylabel("mAP@.5:.95 / original's")
        ax.set_title(f"{name}, no labels, no fine-tune")
        ax.invert_xaxis()
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend()
    save_png_atomic(fig, path)


def render(result: dict, image: str) -> str:
    lines = [
        "# One-shot accuracy: reconstruction against BatchNorm recalibration",
        "",
        f"Machine: {machine_text(result['machine'])}; {result['runtime']}; "
        f"{result['threads']} threads; batch 16. Data: {result['data']}. Pruning: "
        f"{result['pruning']}. No labels and no fine-tuning in either recipe.",
        "",
    ]
    for recipe, text in result["recipes"].items():
        lines.append(f"- **{recipe}**: {text}")
    lines.append("")
    for name, model in result["models"].items():
        original = model["original"]
        lines += [
            f"## {name} (original mAP@.5:.95 {original['map50_95']:.4f}, {model['imgsz']} px)",
            "",
            "| MACs kept | "
            + " | ".join(f"{r} mAP@.5:.95 (share)" for r in RECIPES)
            + " | target | default: reconstruction s (all stages) | head convs: output error "
            "before → after their fit |",
            "|---:|" + "---:|" * len(RECIPES) + "---|---:|---|",
        ]
        for row in model["rows"]:
            new = row[DEFAULT_RECIPE]
            target = TARGETS.get(row["macs"]) if name.startswith("yolov5n") else None
            met = ""
            if target:
                met = f"≥ {target:.0%}: {'met' if new['share'] >= target else 'NOT met'}"
            error = new["head_error"]
            shares = " | ".join(
                f"{row[r]['map50_95']:.4f} ({row[r]['share']:.1%})" for r in RECIPES
            )
            lines.append(
                f"| {row['macs']:g} | {shares} | {met} | "
                f"{new['recovery_seconds']:.1f} ({new['seconds']:.1f}) | "
                f"{error[0]:.3f} → {error[1]:.3f} |"
            )
        lines.append("")
    if result.get("cost"):
        lines += ["## Cost (bound: 120 s)", ""]
        for name, cost in result["cost"].items():
            lines.append(
                f"- {name} (round_to {cost['round_to']}): {cost['model']} at {cost['imgsz']} px, "
                f"MACs {cost['macs']}: {cost['convs_fitted']} convs re-fitted on "
                f"{cost['images']} images in **{cost['seconds']:.0f} s**; "
                f"{cost['peak_activation_mib']:.0f} MiB of activations held at most (both "
                f"models, every image), process peak RSS so far {cost['max_rss_gib']:.1f} GiB."
            )
        lines.append("")
    if result.get("allocation_cost"):
        cost = result["allocation_cost"]
        lines += [
            f"- --allocation sensitivity's measurement: {cost['model']} at {cost['imgsz']} px: "
            f"{cost['groups']} groups, each at three fractions, on {cost['images']} images (the "
            f"default at that size) in **{cost['seconds']:.0f} s**.",
            "",
        ]
    for name, model in result["models"].items():
        first = model["rows"][0][SENSITIVITY_RECIPE]["allocation"]
        lines.append(
            f"- {name}: the sensitivity recipe measured {first['images']} images in "
            f"{first['seconds']:.1f} s once (its first point), then reused it."
        )
    lines += ["", f"![one-shot accuracy]({image})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
