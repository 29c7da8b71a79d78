"""Latency benchmark: is the gain real on the runtime? Baseline vs pruned, several recipes.

For each model (default yolov5s at 640): MACs kept {0.75, 0.5, 0.3} by uniform and by global
allocation, latency-aware plans asking for the ideal speed-up 1/MACs, and ``--speedup 2.0``;
all timed interleaved (A B C ... A B C) on one runtime at each batch size. A round_to sweep
{1, 8, 16, 32, 64} at MACs 0.5 shows which alignment the runtime prefers. Writes
benchmarks/results/latency.{json,md,png} (speed-up against MACs kept, with the ideal line).

    python benchmarks/latency.py --batches 1,8        # ORT CPU, yolov5s 640 (latency.md)
    python benchmarks/latency.py --models yolov5x --stem latency_yolov5x
    python benchmarks/latency.py --runtime torch --cuda-graph --batches 1,32 \
        --models yolov5s,yolov5x,yolov8x                   # GPU, PyTorch CUDA fp16

Architectures are built from the shipped YAMLs (random init, BN calibrated): latency depends on
shapes only, and no pretrained weights can be downloaded here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from yoloprune.compiler.bench import BenchSettings, time_models  # noqa: E402
from yoloprune.compiler.pipeline import CompileOptions, prepare, prune_in_memory  # noqa: E402
from yoloprune.graphs.errors import PlanError  # noqa: E402
from yoloprune.graphs.files import save_png_atomic  # noqa: E402
from yoloprune.kernels.ort import machine_info  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MACS = (0.75, 0.5, 0.3)
ROUND_TO = (1, 8, 16, 32, 64)


def recipes(spec: str, imgsz: int, runtime: str, table: Path | None) -> dict:
    """{row name: (pruned model or None, description)} for one model, each built by
    compile's own stages."""
    prepared = prepare(spec, imgsz)
    rows = {"baseline": (None, {"recipe": "unpruned", "macs_ratio": 1.0})}
    infeasible = {}

    def add(name, **options):
        start = time.perf_counter()
        try:
            options.setdefault("round_to", 8)  # the alignment these results were measured at
            job = prune_in_memory(CompileOptions(spec, imgsz=imgsz, **options), prepared)
        except PlanError as exc:
            infeasible[name] = str(exc)
            print(f"  {name}: infeasible: {exc}", flush=True)
            return
        plan = job["plan"]
        info = {"recipe": name, "plan_s": round(time.perf_counter() - start, 1), **options}
        info["macs_ratio"] = plan.macs_ratio
        if plan.latency:
            info["planner"] = {
                k: plan.latency[k]
                for k in ("goal_ms", "predicted_ms", "measured_ms", "measured_speedup")
            }
            info["planner"]["rounds"] = len(plan.latency["rounds"])
        rows[name] = (job["pruned"], info)
        print(f"  planned {name}: MACs kept {plan.macs_ratio:.3f}", flush=True)

    latency_options = {"latency_runtime": runtime, "latency_table": table}
    for macs in MACS:
        add(f"uniform MACs {macs}", macs=macs)
        add(f"global MACs {macs}", macs=macs, global_allocation=True)
        add(f"latency-aware speedup {1 / macs:.2f}", speedup=round(1 / macs, 4), **latency_options)
    add("latency-aware speedup 2.00 (figure)", speedup=2.0, **latency_options)
    for round_to in ROUND_TO:
        add(f"uniform MACs 0.5 round_to {round_to}", macs=0.5, round_to=round_to)
    return prepared, rows, infeasible


def measure(prepared, rows: dict, settings: BenchSettings, imgsz: int) -> dict:
    models = {
        name: prepared.model if pruned is None else pruned for name, (pruned, _) in rows.items()
    }
    timings = time_models(models, settings, imgsz)
    base = timings["baseline"].median_ms
    out = {}
    for name, (_, info) in rows.items():
        out[name] = {
            **info,
            "latency_ms": timings[name].to_dict(),
            "speedup": base / timings[name].median_ms,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="yolov5s", help="comma-separated shipped YAML names")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--runtime", choices=["ort", "torch"], default="ort")
    parser.add_argument("--batches", default="1", help="comma-separated batch sizes")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="torch: replay each forward as a CUDA graph (no per-kernel launch cost, as an "
        "engine runs); the latency planner's own table and checks stay eager",
    )
    parser.add_argument("--table", type=Path, default=None, help="latency table file")
    parser.add_argument(
        "--stem",
        default=None,
        help="result file name (default latency for ort, latency_gpu for torch)",
    )
    args = parser.parse_args()
    if args.cuda_graph and args.runtime != "torch":
        parser.error("--cuda-graph is for --runtime torch")
    start = time.perf_counter()
    result = {
        "benchmark": "latency",
        "runtime": args.runtime,
        "imgsz": args.imgsz,
        "precision": "fp32" if args.runtime == "ort" else "fp16",
        "runs": args.runs,
        "cuda_graph": args.cuda_graph,
        "order": "all rows of a model interleaved (A B C ... A B C) after warm-up; median",
        "models": {},
    }
    for name in args.models.split(","):
        spec = f"{name}.yaml"
        print(f"{spec}: planning", flush=True)
        prepared, rows, infeasible = recipes(spec, args.imgsz, args.runtime, args.table)
        per_batch = {}
        for batch in (int(b) for b in args.batches.split(",")):
            print(f"{spec}: timing batch {batch}", flush=True)
            settings = BenchSettings(
                runtime=args.runtime,
                batch=batch,
                runs=args.runs,
                warmup=3,
                cuda_graph=args.cuda_graph,
            )
            per_batch[str(batch)] = measure(prepared, rows, settings, args.imgsz)
        result["models"][name] = per_batch
        result.setdefault("infeasible", {})[name] = infeasible
    machine = machine_info()
    if args.runtime == "torch":
        from yoloprune.kernels.torch_runtime import gpu_info

        machine.update(gpu_info())
    result["machine"] = machine
    result["threads"] = machine["cores_available"] if args.runtime == "ort" else None
    result["seconds"] = round(time.perf_counter() - start, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("latency" if args.runtime == "ort" else "latency_gpu")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot(result, RESULTS / f"{stem}.png")
    (RESULTS / f"{stem}.md").write_text(render(result, f"{stem}.png"))
    print(render(result, f"{stem}.png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = [i / 100 for i in range(25, 101)]
    ax.plot(xs, [1 / x for x in xs], "k--", label="ideal (1 / MACs kept)")
    markers = {"uniform": "o", "global": "s", "latency-aware": "^"}
    for model, per_batch in result["models"].items():
        for batch, rows in per_batch.items():
            for kind, marker in markers.items():
                points = [
                    (r["macs_ratio"], r["speedup"])
                    for name, r in rows.items()
                    if name.startswith(kind) and "round_to" not in name
                ]
                if points:
                    ax.scatter(
                        *zip(*points, strict=True), marker=marker, label=f"{model} b{batch} {kind}"
                    )
    ax.set_xlabel("MACs kept")
    ax.set_ylabel("measured speed-up")
    ax.set_title(f"{result['runtime']} {result['precision']}, {result['imgsz']} px")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_png_atomic(fig, path)


def render(result: dict, image: str) -> str:
    m = result["machine"]
    device = m.get("gpu") or f"{m['cpu']} ({m['cores_available']} cores)"
    lines = [
        "# Latency: baseline vs pruned, measured on the runtime",
        "",
        f"Runtime {result['runtime']}, {result['precision']}, {result['imgsz']} px, on {device}; "
        f"threads {result['threads']}; median of {result['runs']} runs, {result['order']}"
        f"{'; each forward replayed as a CUDA graph' if result.get('cuda_graph') else ''}. "
        f"Total time {result['seconds']:.0f} s. Speed-up = baseline median / row median. "
        "Latency-aware rows are planned once, at batch 1, on this runtime (the planner's own "
        "goal / predicted / measured numbers are batch-1 milliseconds); every row is then "
        "re-measured here, independently of the planner, at each batch size.",
        "",
        f"![speed-up against MACs kept]({image})",
        "",
    ]
    for model, per_batch in result["models"].items():
        for batch, rows in per_batch.items():
            lines += [
                f"## {model}, batch {batch}",
                "",
                "| recipe | MACs kept | median ms | speed-up | ideal 1/MACs | planner goal / "
                "predicted / measured ms |",
                "|---|---:|---:|---:|---:|---|",
            ]
            for name, r in rows.items():
                planner = r.get("planner")
                plan_text = (
                    f"{planner['goal_ms']:.1f} / {planner['predicted_ms']:.1f} / "
                    f"{planner['measured_ms']:.1f} ({planner['rounds']} rounds)"
                    if planner
                    else ""
                )
                lines.append(
                    f"| {name} | {r['macs_ratio']:.3f} | {r['latency_ms']['median_ms']:.1f} | "
                    f"{r['speedup']:.3f} | {1 / r['macs_ratio']:.3f} | {plan_text} |"
                )
            lines.append("")
    for model, rows in result.get("infeasible", {}).items():
        for name, why in rows.items():
            lines.append(f"- {model} {name}: not plannable: {why}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
