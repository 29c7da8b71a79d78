"""Allocation on trained models: the default plan (`--allocation sensitivity`, measured head
error per MAC, `--round-to auto`) against `--allocation uniform` (the default before
2026-12-02), `--latency-aware`, `--global` (importance ranked across layers, no latency) and
`--latency-aware --allocation sensitivity` (measured head error per ms) at the same MACs,
one-shot (compile with --data: energy importance, reconstruction, no fine-tune), on the
trained YOLOv5n, YOLOv8n and YOLO26n.
The pruned ONNX files and the original are timed together (ONNX Runtime CPU, batch 1,
interleaved, several passes); each file's mAP is its own, on the synthetic val split. Also
the two label-free signals that could choose between the plans without labels: the
importance each removes and the head's output error after reconstruction.

    python benchmarks/allocation.py [--macs 0.5] [--runs 30] [--passes 9]
Writes benchmarks/results/allocation.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.precision import shapes  # noqa: E402
from yoloprune.compiler.alignment import removed_importance  # noqa: E402
from yoloprune.compiler.export import export_onnx  # noqa: E402
from yoloprune.compiler.pipeline import CompileOptions, compile_model, prepare  # noqa: E402
from yoloprune.compiler.score import IMPORTANCES  # noqa: E402
from yoloprune.graphs.files import write_text_atomic  # noqa: E402
from yoloprune.graphs.plan import PruningPlan  # noqa: E402
from yoloprune.kernels.ort import (  # noqa: E402
    OrtRunner,
    machine_info,
    machine_text,
    order_text,
    time_runners,
)

RESULTS = ROOT / "benchmarks" / "results"
RECIPES = {
    "default flags": {},  # --allocation sensitivity since 2026-12-02
    "--allocation uniform": {"allocation": "uniform"},  # the default before
    "--latency-aware": {"latency_aware": True},
    "--global": {"global_allocation": True},  # cross-layer ranking without latency
    "--latency-aware --allocation sensitivity": {
        "latency_aware": True,
        "allocation": "sensitivity",
    },
}
MODELS = [
    ROOT / "graphs" / "weights" / f"{name}-shapes.pt" for name in ("yolov5n", "yolov8n", "yolo26n")
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--macs", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--passes", type=int, default=9)
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "data" / "shapes")
    args = parser.parse_args()
    data_yaml, _ = shapes(args.data)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for checkpoint in [m for m in MODELS if m.is_file()]:
            label = checkpoint.name.removesuffix(".pt")
            rows[label] = model_rows(checkpoint, data_yaml, Path(tmp) / label, args)
    result = {
        "macs": args.macs,
        "data": str(data_yaml),
        "runtime": "onnxruntime (CPUExecutionProvider, ORT_ENABLE_ALL), fp32",
        "batch": 1,
        "order": order_text(False) + "; fresh sessions every pass, their order rotated",
        "runs": args.runs,
        "passes": args.passes,
        "machine": machine_info(),
        "models": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / "allocation.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(RESULTS / "allocation.md", render(result))
    print(render(result))


def model_rows(checkpoint: Path, data_yaml: Path, folder: Path, args) -> dict:
    """Every recipe compiled one-shot, the files timed with the original, interleaved."""
    reports, files, plans = {}, {}, {}
    for name, flags in RECIPES.items():
        out = folder / name.strip("-").replace(" ", "-")
        options = CompileOptions(
            str(checkpoint), macs=args.macs, data=data_yaml, out=out, bench=False, **flags
        )
        reports[name] = compile_model(options)
        files[name] = out / reports[name]["files"]["onnx"]
        plans[name] = PruningPlan.load(out / reports[name]["files"]["plan"])
    prepared = prepare(str(checkpoint))
    files["original"] = export_onnx(prepared.model, folder / "original.onnx", prepared.imgsz)
    ratios = timed_ratios(files, prepared.imgsz, args.runs, args.passes)
    scores = energy_scores(checkpoint, data_yaml, prepared)
    rows = {}
    for name, report in reports.items():
        plan = plans[name]
        rows[name] = {
            "macs_ratio": report["macs"]["ratio"],
            "params_ratio": report["params"]["ratio"],
            "round_to": report["alignment"]["round_to"],
            "latency_ratio": ratios[name],
            "map50_95": report["accuracy"]["map50_95"]["onnx"],
            "map50_95_original": report["accuracy"]["map50_95"]["original"],
            "head_error_after_reconstruction": report["reconstruction"]["head_error_after"],
            "energy_importance_removed": removed_importance(plan, scores),
        }
    return rows


def timed_ratios(files: dict, imgsz: int, runs: int, passes: int) -> dict:
    """{recipe: median over passes of (its median ms / the original's)}, with the range. Each
    pass opens fresh sessions, in an order rotated by one per pass: a session's speed can
    differ from the next one's for the same file by a few percent on these small models (two
    runs of this script with one session per file read uniform against sensitivity 0.730 vs
    0.690 and 0.684 vs 0.694), more than a pass's own spread."""
    images = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    per_pass = {name: [] for name in files if name != "original"}
    names = list(files)
    for index in range(passes):
        order = names[index % len(names) :] + names[: index % len(names)]
        runners = {name: OrtRunner(files[name]) for name in order}
        with contextlib.ExitStack() as active:
            for runner in runners.values():
                active.enter_context(runner)
            timings = time_runners(runners, images, runs, warmup=3)
        for name in per_pass:
            per_pass[name].append(timings[name].median_ms / timings["original"].median_ms)
    return {
        name: {
            "median": round(statistics.median(values), 4),
            "range": [round(min(values), 4), round(max(values), 4)],
        }
        for name, values in per_pass.items()
    }


def energy_scores(checkpoint: Path, data_yaml: Path, prepared) -> dict:
    """The energy importance the default compile scored channels with (same images)."""
    options = CompileOptions(str(checkpoint), data=data_yaml)
    importance = IMPORTANCES["energy"](data_yaml, prepared.imgsz, options.images)
    return importance(prepared.model, prepared.graph, prepared.groups, 0)


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Allocation on trained models: the default (measured sensitivity) against uniform, "
        "`--latency-aware` and `--global`",
        "",
        f"MACs kept {result['macs']:g}, one-shot (compile with `--data {result['data']}`: "
        "energy importance, reconstruction on 128 unlabeled train images, no fine-tune). "
        f"Latency: {result['runtime']}, batch {result['batch']}, {m['cores_available']} "
        f"threads, {result['passes']} passes of {result['runs']} runs, {result['order']}; the "
        "ratio to the original is the median over passes (range in brackets); "
        f"{machine_text(m)}, onnxruntime {m['onnxruntime']}. mAP@.5:.95: each pruned ONNX "
        "file's own, on the synthetic val split. Label-free signals: the energy importance "
        "each plan removes (share of the total) and the head's output error after "
        "reconstruction.",
        "",
        "| model | plan | round_to | MACs kept | params kept | latency ratio | mAP@.5:.95 "
        "(original) | energy importance removed | head error after reconstruction |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, rows in result["models"].items():
        for name, row in rows.items():
            lat = row["latency_ratio"]
            lines.append(
                f"| {model} | {name} | {row['round_to']} | {row['macs_ratio']:.3f} | "
                f"{row['params_ratio']:.3f} | {lat['median']:.3f} ({lat['range'][0]:.3f}-"
                f"{lat['range'][1]:.3f}) | {row['map50_95']:.4f} ({row['map50_95_original']:.4f})"
                f" | {row['energy_importance_removed']:.4f} | "
                f"{row['head_error_after_reconstruction']:.4f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
