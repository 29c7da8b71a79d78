"""What more fine-tuning would buy `make compile`'s 2x model, and what its defaults were tried
against.

From one one-shot start (``compile --macs 0.35 --round-to 16 --allocation uniform --data D``:
`make compile`'s target and allocation until 2026-12-02 at the alignment it measures on AVX-512,
reconstruction on, no fine-tune), the compile's own fine-tune
(``CompileOptions(...).settings.train``: AdamW, distillation, batch 8, no augmentation) is run

1. for 3, 5, 7 (`make compile`'s), 8 and 12 epochs: mAP@.5:.95 of the best EMA (the model the
   compile keeps) after each epoch, against the seconds spent training (`make compile` measures
   mAP after the last epoch only, ``--eval-every 0``: these seconds plus one evaluation);
2. for 7 epochs with one flag changed: ``--distill 2`` and ``4``, ``--lr0 0.005`` and
   ``0.0015``.

Writes benchmarks/results/demo_budget.{json,md,png}. About 22 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from yoloprune.compiler.options import CompileOptions  # noqa: E402
from yoloprune.compiler.train.data import read_data_yaml  # noqa: E402
from yoloprune.compiler.train.finetune import train  # noqa: E402
from yoloprune.compiler.train.synthetic import SyntheticSpec, generate  # noqa: E402
from yoloprune.graphs.checkpoint import load_model  # noqa: E402
from yoloprune.graphs.files import save_png_atomic, write_text_atomic  # noqa: E402
from yoloprune.kernels.ort import machine_info, machine_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODEL = ROOT / "graphs" / "weights" / "yolov5n-shapes.pt"
# make compile's one-shot start until 2026-12-02 (uniform; since then make compile allocates by
# measured sensitivity: demo_allocation.py), kept so these studies of the fine-tune reproduce
START_FLAGS = ["--macs", "0.35", "--round-to", "16", "--allocation", "uniform"]
DEMO_EPOCHS = 7  # Makefile: DEMO_EPOCHS
EPOCHS = (3, 5, DEMO_EPOCHS, 8, 12)
VARIANTS = {
    "--distill 2": {"distill": 2.0},
    "--distill 4": {"distill": 4.0},
    "--lr0 0.005": {"lr0": 0.005},
    "--lr0 0.0015": {"lr0": 0.0015},
}


def demo_data(description: str) -> Path:
    """The data YAML of ``--data`` (default: the shapes `make compile` uses), generated if
    missing."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "data" / "shapes")
    args = parser.parse_args()
    if not (args.data / "data.yaml").exists():
        generate(args.data, SyntheticSpec())
    return args.data / "data.yaml"


def header(benchmark: str, one_shot: dict) -> dict:
    """What every result of the demo's start states: machine, model, data, the start."""
    return {
        "benchmark": benchmark,
        "machine": machine_info(),
        "threads": torch.get_num_threads(),
        "model": "embedded YOLOv5n (graphs/weights/yolov5n-shapes.pt), 256 px",
        "data": "synthetic shapes: 2000 train, 300 val images",
        "start": f"compile {' '.join(START_FLAGS)} --data D (one-shot)",
        "one_shot": one_shot,
    }


def main() -> None:
    data_yaml = demo_data(__doc__.splitlines()[0])
    with tempfile.TemporaryDirectory() as scratch:
        start, one_shot = one_shot_start(data_yaml, Path(scratch))
        curve = [fine_tune(start, data_yaml, epochs) for epochs in EPOCHS]
        variants = {
            name: fine_tune(start, data_yaml, DEMO_EPOCHS, **changes)
            for name, changes in VARIANTS.items()
        }
    result = {
        **header("demo_budget", one_shot),
        "demo_epochs": DEMO_EPOCHS,
        "curve": curve,
        "variants": variants,
    }
    write_results("demo_budget", result, render, plot)


def write_results(stem: str, result: dict, render, plot=None) -> None:
    """``result`` as benchmarks/results/<stem>.json, its plot as <stem>.png (``plot(result,
    path)``, if given) and ``render(result[, png name])`` as <stem>.md, which is printed."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    if plot is not None:
        plot(result, RESULTS / f"{stem}.png")
    text = render(result, f"{stem}.png") if plot is not None else render(result)
    write_text_atomic(RESULTS / f"{stem}.md", text)
    print(text)


def seeded_runs(seeds, recipes: dict, run) -> dict[str, list]:
    """Each seed's recipes back to back, so the machine's drift falls on all of them alike:
    ``{name: [run(seed, value) for each seed]}``."""
    runs: dict[str, list] = {name: [] for name in recipes}
    for seed in seeds:
        for name, value in recipes.items():
            runs[name].append(run(seed, value))
    return runs


def one_shot_start(data_yaml: Path, scratch: Path) -> tuple[Path, dict]:
    out = scratch / "start"
    command = [sys.executable, "-m", "yoloprune", "compile", str(MODEL), *START_FLAGS]
    command += ["--data", str(data_yaml), "--out", str(out), "--no-bench"]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    report = json.loads((out / "report.json").read_text())
    accuracy = report["accuracy"]["map50_95"]
    record = {
        "macs_kept": report["macs"]["ratio"],
        "map_original": accuracy["original"],
        "map_one_shot": accuracy["pruned"],
    }
    return out / report["files"]["checkpoint"], record


def trained(start: Path, data_yaml: Path, **flags):
    """The compile's fine-tune of ``start`` with ``flags`` (CompileOptions fields) given."""
    options = CompileOptions(str(MODEL), macs=0.35, **flags)
    settings = dataclasses.replace(options.settings.train, imgsz=256)
    teacher, _ = load_model(MODEL)
    student, info = load_model(start)
    return train(
        student, info, read_data_yaml(data_yaml), settings, teacher=teacher, progress=False
    )


def fine_tune(start: Path, data_yaml: Path, epochs: int, **changes) -> dict:
    """The compile's fine-tune of ``start`` for ``epochs`` with ``changes`` to its flags."""
    print(f"fine-tune: {epochs} epochs {changes or ''}", flush=True)
    result = trained(start, data_yaml, epochs=epochs, **changes)
    return {
        "epochs": epochs,
        "changes": changes,
        "map_per_epoch": [round(h["map50_95"], 4) for h in result.history],
        "map_best": round(result.best["map50_95"], 4),
        "seconds": round(result.seconds, 1),
        "train_seconds": round(sum(h["train_seconds"] for h in result.history), 1),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    curve = result["curve"]
    seconds = [r["train_seconds"] for r in curve]
    ax.plot(seconds, [r["map_best"] for r in curve], "o-", label="defaults")
    for r in curve:
        ax.annotate(f"{r['epochs']} ep", (r["train_seconds"], r["map_best"]), fontsize=8)
    for name, r in result["variants"].items():
        ax.scatter([r["train_seconds"]], [r["map_best"]], marker="x")
        ax.annotate(name, (r["train_seconds"], r["map_best"]), fontsize=7)
    original = result["one_shot"]["map_original"]
    ax.axhline(original, color="grey", linestyle="--", label="original")
    ax.set_xlabel("training seconds, evaluations left out (2 CPU cores)")
    ax.set_ylabel("mAP@.5:.95 (best EMA)")
    ax.set_title(f"Embedded YOLOv5n, MACs {result['one_shot']['macs_kept']:.2f}: fine-tune budget")
    ax.legend(fontsize=8)
    save_png_atomic(fig, path)


def render(result: dict, image: str) -> str:
    one_shot = result["one_shot"]
    original = one_shot["map_original"]
    lines = [
        "# `make compile`'s 2x model: what more fine-tuning buys",
        "",
        f"Machine: {machine_text(result['machine'])}; {result['threads']} threads. Model: "
        f"{result['model']}; data: {result['data']}. Start: `{result['start']}`, MACs kept "
        f"{one_shot['macs_kept']:.3f}, mAP@.5:.95 {one_shot['map_one_shot']:.4f} one-shot "
        f"(original {original:.4f}). Fine-tune: the compile's own (AdamW lr 0.003, "
        "distillation 1, batch 8, no augmentation, cosine, EMA); mAP of the best EMA "
        "(pycocotools, val.py conventions), what the compile keeps and exports. Training s: "
        "the epochs' own time; evaluating after each epoch added the rest of fine-tune s. "
        "`make compile` evaluates after the last epoch only (`--eval-every 0`) and keeps that "
        "epoch's model: the last-epoch column.",
        "",
        "| epochs | mAP@.5:.95 best (of original) | last epoch | per epoch | training s | "
        "fine-tune s |",
        "|---:|---:|---:|---|---:|---:|",
    ]
    for r in result["curve"]:
        demo = " (`make compile`)" if r["epochs"] == result["demo_epochs"] else ""
        per_epoch = " → ".join(f"{m:.4f}" for m in r["map_per_epoch"])
        lines.append(
            f"| {r['epochs']}{demo} | {r['map_best']:.4f} ({r['map_best'] / original:.1%}) | "
            f"{r['map_per_epoch'][-1]:.4f} | {per_epoch} | "
            f"{r['train_seconds']:.0f} | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        f"## {result['demo_epochs']} epochs, one flag changed",
        "",
        "| flag | mAP@.5:.95 (of original) | training s |",
        "|---|---:|---:|",
    ]
    for name, r in result["variants"].items():
        lines.append(
            f"| `{name}` | {r['map_best']:.4f} ({r['map_best'] / original:.1%}) | "
            f"{r['train_seconds']:.0f} |"
        )
    lines += ["", f"![mAP against training seconds]({image})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
