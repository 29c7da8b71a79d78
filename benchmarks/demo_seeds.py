"""How much of `make compile`'s mAP is the seed's, and whether a higher learning rate is better
beyond it.

From `make compile`'s one-shot start until 2026-12-02 (``compile --macs 0.35 --round-to 16
--allocation uniform --data D``), its fine-tune exactly (``--epochs 7 --eval-every 0``: the last
epoch's model) is run with seeds 0, 1 and 2 (``--seed``: the order of batches), with the
defaults (AdamW lr0 0.003) and with ``--lr0 0.005``, the one variant of ``demo_budget.py`` that
looked better at seed 0. (That was `make compile`'s fine-tune, at the CLI's batch 8, until
2026-12-01's evening; it now runs ``--batch 16 --lr0 0.005``: ``demo_batch.py``.)

Writes benchmarks/results/demo_seeds.{json,md}. About 14 minutes on 2 CPU cores.
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

from yoloprune.kernels.ort import machine_text  # noqa: E402

SEEDS = (0, 1, 2)
RECIPES = {"defaults (lr0 0.003)": {}, "--lr0 0.005": {"lr0": 0.005}}


def main() -> None:
    data_yaml = demo.demo_data(__doc__.splitlines()[0])
    with tempfile.TemporaryDirectory() as scratch:
        start, one_shot = demo.one_shot_start(data_yaml, Path(scratch))
        runs = {
            name: [fine_tune(start, data_yaml, seed, **changes) for seed in SEEDS]
            for name, changes in RECIPES.items()
        }
    result = {
        **demo.header("demo_seeds", one_shot),
        "fine_tune": f"--epochs {demo.DEMO_EPOCHS} --eval-every 0",
        "runs": runs,
    }
    demo.write_results("demo_seeds", result, render)


def fine_tune(start: Path, data_yaml: Path, seed: int, **changes) -> dict:
    """`make compile`'s fine-tune of ``start`` at ``seed`` with ``changes`` to its flags."""
    print(f"fine-tune: seed {seed} {changes or ''}", flush=True)
    flags = {"epochs": demo.DEMO_EPOCHS, "eval_every": 0, "seed": seed, **changes}
    result = demo.trained(start, data_yaml, **flags)
    return {"seed": seed, "map": round(result.best["map50_95"], 4), "seconds": result.seconds}


def render(result: dict) -> str:
    original = result["one_shot"]["map_original"]
    names = list(result["runs"])
    lines = [
        "# `make compile`'s fine-tune: seed against learning rate",
        "",
        f"Machine: {machine_text(result['machine'])}; {result['threads']} threads. Model: "
        f"{result['model']}; data: {result['data']}. Start: `{result['start']}`, one-shot "
        f"mAP@.5:.95 {result['one_shot']['map_one_shot']:.4f} (original {original:.4f}). "
        f"Fine-tune: `{result['fine_tune']}` (the model `make compile` keeps), mAP@.5:.95 "
        "(pycocotools, val.py conventions); `--seed` sets the order of batches.",
        "",
        "| recipe | "
        + " | ".join(f"seed {r['seed']}" for r in result["runs"][names[0]])
        + " | mean | spread |",
        "|---|" + "---:|" * (len(result["runs"][names[0]]) + 2),
    ]
    for name in names:
        maps = [r["map"] for r in result["runs"][name]]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{m:.4f}" for m in maps)
            + f" | {statistics.mean(maps):.4f} ({statistics.mean(maps) / original:.1%}) | "
            f"{max(maps) - min(maps):.4f} |"
        )
    if len(names) == 2:
        first, second = (result["runs"][n] for n in names)
        gains = [b["map"] - a["map"] for a, b in zip(first, second, strict=True)]
        lines += [
            "",
            f"`{names[1]}` minus the defaults, seed by seed: "
            + ", ".join(f"{g:+.4f}" for g in gains)
            + f" (mean {statistics.mean(gains):+.4f}, standard deviation "
            f"{statistics.stdev(gains):.4f}).",
        ]
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    main()
