"""`make compile`'s fine-tune at batch 8 against batch 16 with a higher learning rate.

A training step of the pruned embedded model costs less per image at batch 16 than at batch 8 on
2 CPU cores (the convolutions are larger, the optimizer and EMA run half as often), but half as
many updates need a larger step. From `make compile`'s one-shot start until 2026-12-02
(``compile --macs 0.35 --round-to 16 --allocation uniform --data D``), its fine-tune
(``--eval-every 0``: the last epoch's model, mixed precision as the machine's default) is run
with seeds 0, 1 and 2 (``--seed``: the order of batches), each seed's recipes back to back on
this shared machine:

- the compile's defaults, 7 epochs (batch 8, AdamW lr0 0.003: `make compile` before
  2026-12-01's evening);
- ``--batch 16 --lr0 0.005``, 7 epochs (lr0 0.003 and 0.006 at seed 0, by hand: 0.7949 and 0.7981
  against 0.8010);
- ``--batch 16 --lr0 0.005``, 8 epochs.

Writes benchmarks/results/demo_batch.{json,md,png}. About 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo_budget as demo  # noqa: E402

from yoloprune.graphs.files import save_png_atomic  # noqa: E402
from yoloprune.kernels.ort import machine_text  # noqa: E402

SEEDS = (0, 1, 2)
RECIPES = {
    "batch 8, lr0 0.003, 7 epochs (defaults)": {"epochs": 7},
    "batch 16, lr0 0.005, 7 epochs": {"epochs": 7, "batch": 16, "lr0": 0.005},
    "batch 16, lr0 0.005, 8 epochs": {"epochs": 8, "batch": 16, "lr0": 0.005},
}


def main() -> None:
    data_yaml = demo.demo_data(__doc__.splitlines()[0])
    with tempfile.TemporaryDirectory() as scratch:
        start, one_shot = demo.one_shot_start(data_yaml, Path(scratch))
        runs = demo.seeded_runs(
            SEEDS, RECIPES, lambda seed, changes: fine_tune(start, data_yaml, seed, **changes)
        )
    result = {
        **demo.header("demo_batch", one_shot),
        # what the fine-tunes ran in, as they recorded it (the machine's default)
        "mixed_precision": runs[next(iter(RECIPES))][0]["mixed_precision"] or "fp32",
        "fine_tune": "--eval-every 0",
        "runs": runs,
    }
    demo.write_results("demo_batch", result, render, plot)


def fine_tune(start: Path, data_yaml: Path, seed: int, **changes) -> dict:
    """`make compile`'s fine-tune of ``start`` at ``seed`` with ``changes`` to its flags."""
    print(f"fine-tune: seed {seed} {changes}", flush=True)
    result = demo.trained(start, data_yaml, eval_every=0, seed=seed, **changes)
    return {
        "seed": seed,
        "map": round(result.best["map50_95"], 4),
        "seconds": round(result.seconds, 1),
        "mixed_precision": result.mixed_precision,
    }


def summary(runs: list[dict]) -> tuple[float, float]:
    return statistics.mean(r["map"] for r in runs), statistics.mean(r["seconds"] for r in runs)


def render(result: dict, png: str) -> str:
    original = result["one_shot"]["map_original"]
    first = next(iter(result["runs"].values()))
    _, base_seconds = summary(first)
    lines = [
        "# `make compile`'s fine-tune: batch 8 against batch 16",
        "",
        f"Machine: {machine_text(result['machine'])}; {result['threads']} threads; the student's "
        f"forward in {result['mixed_precision']} (the machine's default). Model: "
        f"{result['model']}; data: {result['data']}. Start: `{result['start']}`, one-shot "
        f"mAP@.5:.95 {result['one_shot']['map_one_shot']:.4f} (original {original:.4f}). "
        f"Fine-tune: the compile's, `{result['fine_tune']}` (the model `make compile` keeps), "
        "AdamW, distillation 1, EMA, no augmentation; mAP@.5:.95 by pycocotools (val.py "
        "conventions); `--seed` sets the order of batches; each seed's recipes ran back to back. "
        "Seconds: the fine-tune's (the first epoch also runs the teacher).",
        "",
        "| recipe | "
        + " | ".join(f"seed {r['seed']}: mAP, s" for r in first)
        + " | mean mAP (of original) | mean s | time / defaults |",
        "|---|" + "---:|" * (len(first) + 3),
    ]
    for name, runs in result["runs"].items():
        mean_map, mean_seconds = summary(runs)
        lines.append(
            f"| {name} | "
            + " | ".join(f"{r['map']:.4f}, {r['seconds']:.0f}" for r in runs)
            + f" | {mean_map:.4f} ({mean_map / original:.1%}) | {mean_seconds:.0f} | "
            f"{mean_seconds / base_seconds:.2f} |"
        )
    return "\n".join([*lines, "", f"![mAP against fine-tune seconds]({png})", ""])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, runs in result["runs"].items():
        ax.scatter([r["seconds"] for r in runs], [r["map"] for r in runs], label=name)
    ax.axhline(result["one_shot"]["map_original"], color="grey", ls="--", label="original")
    ax.set_xlabel("fine-tune seconds (2 CPU cores)")
    ax.set_ylabel("mAP@.5:.95")
    ax.set_title("make compile's fine-tune, three seeds per recipe")
    ax.legend(fontsize=8)
    save_png_atomic(fig, path)


if __name__ == "__main__":
    main()
