"""`make compile` with the sensitivity allocation (its default since 2026-12-02) against the
uniform allocation (the default before), seeds 0, 1 and 2.

Each run is `make compile`'s own command line (read from ``make -n compile``: the embedded
YOLOv5n, --macs 0.35, the demo's 7-epoch fine-tune) with ``--seed S`` and, for the uniform
rows, ``--allocation uniform``; everything else is the compile's default (energy importance,
reconstruction, ``--round-to auto``, the bench step). Recorded per run: MACs kept, the chosen
alignment and --max-ratio, one-shot and fine-tuned mAP@.5:.95, the ORT CPU latency ratio the
compile's bench step measured (20 interleaved runs; compile-to-compile it moves by about
±0.03), the allocation's measuring time and the whole compile's wall time.

    python benchmarks/demo_allocation.py [--data runs/data/shapes]
Writes benchmarks/results/demo_allocation.{json,md}. About 13 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo_budget as demo  # noqa: E402

from yoloprune.kernels.ort import machine_info, machine_text  # noqa: E402

SEEDS = (0, 1, 2)
RECIPES = {"sensitivity (default)": [], "uniform (before 2026-12-02)": ["--allocation", "uniform"]}


def make_environment() -> dict[str, str]:
    """This process's environment without what would change `make compile`'s defaults: the
    Makefile's ``?=`` variables (MODEL, MACS, ARGS, ...) and an outer make's flags."""
    makefile = (ROOT / "Makefile").read_text()
    settable = set(re.findall(r"^(\w+) \?=", makefile, re.MULTILINE))
    dropped = settable | {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"}
    return {k: v for k, v in os.environ.items() if k not in dropped}


def make_compile_args(data_yaml: Path) -> list[str]:
    """The arguments `make compile` passes to ``python -m yoloprune compile`` by default
    (``make -n``: nothing runs), with its data YAML replaced by ``data_yaml`` and no --out."""
    shown = subprocess.run(
        ["make", "-n", "compile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=make_environment(),
    ).stdout
    line = next(x for x in shown.splitlines() if "-m yoloprune compile" in x)
    args = shlex.split(line)
    args = args[args.index("compile") + 1 :]
    args[args.index("--data") + 1] = str(data_yaml)
    out = args.index("--out")
    return args[:out] + args[out + 2 :]


def run(args: list[str], seed: int, flags: list[str], out: Path) -> dict:
    command = [sys.executable, "-m", "yoloprune", "compile", *args, "--seed", str(seed), *flags]
    command += ["--out", str(out)]
    print(shlex.join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    accuracy = report["accuracy"]["map50_95"]
    measured = report["plan"].get("sensitivity") or {}
    return {
        "seed": seed,
        "macs_kept": round(report["macs"]["ratio"], 4),
        "round_to": report["alignment"]["round_to"],
        "max_ratio": report["plan"]["max_ratio"],
        "map_original": accuracy["original"],
        "map_one_shot": accuracy["pruned"],
        "map_fine_tuned": accuracy["finetuned"],
        "latency_ratio": round(report["latency_ms"]["onnxruntime_cpu"]["ratio"], 4),
        "allocation_seconds": measured.get("seconds"),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    data_yaml = demo.demo_data(__doc__.splitlines()[0])
    args = make_compile_args(data_yaml)
    with tempfile.TemporaryDirectory() as scratch:
        runs = {
            name: [run(args, seed, flags, Path(scratch) / f"{i}-{seed}") for seed in SEEDS]
            for i, (name, flags) in enumerate(RECIPES.items())
        }
    result = {
        "benchmark": "demo_allocation",
        "machine": machine_info(),
        "command": "python -m yoloprune compile " + shlex.join(args) + " --seed S",
        "runs": runs,
    }
    demo.write_results("demo_allocation", result, render)


def render(result: dict) -> str:
    lines = [
        "# `make compile`: the sensitivity allocation against uniform, three seeds",
        "",
        f"Command: `{result['command']}` (plus `--allocation uniform` for the uniform rows). "
        f"{machine_text(result['machine'])}; latency: the compile's bench step, ONNX Runtime "
        "CPU fp32, batch 1, 2 threads, 20 interleaved runs (compile to compile it moves by "
        "about ±0.03).",
        "",
        "| allocation | seed | MACs kept | round_to | max ratio | one-shot mAP | fine-tuned mAP "
        "| latency ratio | allocation s | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in result["runs"].items():
        for r in runs:
            measured = "" if r["allocation_seconds"] is None else f"{r['allocation_seconds']:g}"
            lines.append(
                f"| {name} | {r['seed']} | {r['macs_kept']:.3f} | {r['round_to']} | "
                f"{r['max_ratio']:g} | {r['map_one_shot']:.4f} | {r['map_fine_tuned']:.4f} | "
                f"{r['latency_ratio']:.3f} | {measured} | {r['seconds']:.0f} |"
            )
    lines += ["", "Means over the seeds:", ""]
    for name, runs in result["runs"].items():
        mean = {
            key: statistics.mean(r[key] for r in runs)
            for key in ("map_one_shot", "map_fine_tuned", "latency_ratio", "seconds")
        }
        lines.append(
            f"- {name}: one-shot {mean['map_one_shot']:.4f}, fine-tuned "
            f"{mean['map_fine_tuned']:.4f}, latency ratio {mean['latency_ratio']:.3f}, "
            f"{mean['seconds']:.0f} s a compile"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
