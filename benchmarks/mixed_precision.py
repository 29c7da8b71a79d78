"""`make compile`'s fine-tune in fp32 and in bf16 mixed precision on the CPU.

From `make compile`'s one-shot start until 2026-12-02 (``compile --macs 0.35 --round-to 16
--allocation uniform --data D``), its fine-tune exactly (``--epochs 7 --eval-every 0``) is run
with seeds 0, 1 and 2, each seed in fp32 (``--no-amp``) and then in bf16 (``--amp``: the
student's forward autocast to bf16, the losses and the teacher in fp32), so each pair runs back
to back on this shared machine. Then the pruned model's training forward and backward (batch 8)
is timed both ways, interleaved. (That was `make compile`'s fine-tune, at the CLI's batch 8,
until 2026-12-01's evening; it now runs ``--batch 16 --lr0 0.005``: ``demo_batch.py``, which
runs in the machine's default precision.)

Writes benchmarks/results/mixed_precision.{json,md}. About 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo_budget as demo  # noqa: E402

from yoloprune.compiler.train.finetune import cpu_computes_bf16  # noqa: E402
from yoloprune.graphs.checkpoint import load_model  # noqa: E402
from yoloprune.kernels.ort import machine_text  # noqa: E402
from yoloprune.kernels.torch_runtime import memory_layout  # noqa: E402

SEEDS = (0, 1, 2)
PRECISIONS = {"fp32 (--no-amp)": False, "bf16 (--amp)": True}
STEP_ROUNDS, STEPS_PER_ROUND, STEP_BATCH = 15, 10, 8


def main() -> None:
    data_yaml = demo.demo_data(__doc__.splitlines()[0])
    with tempfile.TemporaryDirectory() as scratch:
        start, one_shot = demo.one_shot_start(data_yaml, Path(scratch))
        runs = demo.seeded_runs(
            SEEDS, PRECISIONS, lambda seed, amp: fine_tune(start, data_yaml, seed, amp)
        )
        steps = step_times(start)
    result = {
        **demo.header("mixed_precision", one_shot),
        "cpu_computes_bf16": cpu_computes_bf16(),
        "fine_tune": f"--epochs {demo.DEMO_EPOCHS} --eval-every 0",
        "runs": runs,
        "steps": steps,
    }
    demo.write_results("mixed_precision", result, render)


def fine_tune(start: Path, data_yaml: Path, seed: int, amp: bool) -> dict:
    """`make compile`'s fine-tune of ``start`` at ``seed``, in bf16 (``amp``) or fp32."""
    print(f"fine-tune: seed {seed}, amp {amp}", flush=True)
    result = demo.trained(
        start, data_yaml, epochs=demo.DEMO_EPOCHS, eval_every=0, seed=seed, amp=amp
    )
    return {
        "seed": seed,
        "map": round(result.best["map50_95"], 4),
        "mixed_precision": result.mixed_precision,
        "seconds": result.seconds,
        "train_seconds": round(sum(h["train_seconds"] for h in result.history), 1),
    }


def step_times(start: Path) -> dict:
    """Median ms of the pruned model's training forward and backward at batch 8 and 256 px,
    fp32 and bf16 interleaved (rounds of 10 steps each)."""
    torch.manual_seed(0)
    model = load_model(start)[0].float().train()
    layout = memory_layout(model)
    model = model.to(memory_format=layout)
    images = torch.rand(STEP_BATCH, 3, 256, 256).contiguous(memory_format=layout)

    def step(low: bool) -> None:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            raw = model(images)
        sum(level.float().square().mean() for level in raw).backward()

    def round_ms(low: bool) -> float:
        begin = time.perf_counter()
        for _ in range(STEPS_PER_ROUND):
            step(low)
        return (time.perf_counter() - begin) / STEPS_PER_ROUND * 1e3

    for low in (False, True, False, True):  # warm-up
        step(low)
    fp32, bf16 = [], []
    for _ in range(STEP_ROUNDS):
        fp32.append(round_ms(False))
        bf16.append(round_ms(True))
    return {
        "batch": STEP_BATCH,
        "imgsz": 256,
        "rounds": STEP_ROUNDS,
        "steps_per_round": STEPS_PER_ROUND,
        "fp32_ms": round(statistics.median(fp32), 2),
        "bf16_ms": round(statistics.median(bf16), 2),
        "ratio": round(statistics.median(b / a for a, b in zip(fp32, bf16, strict=True)), 3),
    }


def render(result: dict) -> str:
    original = result["one_shot"]["map_original"]
    names = list(result["runs"])
    seeds = [r["seed"] for r in result["runs"][names[0]]]
    steps = result["steps"]
    lines = [
        "# `make compile`'s fine-tune: fp32 against bf16 mixed precision on the CPU",
        "",
        f"Machine: {machine_text(result['machine'])}; {result['threads']} threads; bf16 "
        f"instructions: {'yes' if result['cpu_computes_bf16'] else 'no (bf16 emulated)'}. "
        f"Model: {result['model']}; data: {result['data']}. Start: `{result['start']}`, "
        f"one-shot mAP@.5:.95 {result['one_shot']['map_one_shot']:.4f} (original "
        f"{original:.4f}). Fine-tune: `{result['fine_tune']}` (the model `make compile` "
        "keeps), mAP@.5:.95 (pycocotools, val.py conventions); bf16: the student's forward "
        "autocast to bf16, losses, teacher and weights in fp32. Each seed ran fp32 then bf16, "
        "back to back; fine-tune seconds include the teacher's first epoch and the last "
        "evaluation.",
        "",
        "| precision | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | fine-tune s |",
        "|---|" + "---:|" * (len(seeds) + 2),
    ]
    for name in names:
        runs = result["runs"][name]
        maps = [r["map"] for r in runs]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{m:.4f}" for m in maps)
            + f" | {statistics.mean(maps):.4f} ({statistics.mean(maps) / original:.1%}) | "
            + " / ".join(f"{r['seconds']:.0f}" for r in runs)
            + " |"
        )
    first, second = (result["runs"][n] for n in names)
    gains = [b["map"] - a["map"] for a, b in zip(first, second, strict=True)]
    times = [b["seconds"] / a["seconds"] for a, b in zip(first, second, strict=True)]
    lines += [
        "",
        f"bf16 minus fp32, seed by seed: {', '.join(f'{g:+.4f}' for g in gains)} (mean "
        f"{statistics.mean(gains):+.4f}). Fine-tune time, bf16 / fp32 per seed: "
        f"{', '.join(f'{t:.2f}' for t in times)}.",
        "",
        f"Training forward and backward of the pruned model (batch {steps['batch']}, "
        f"{steps['imgsz']} px, median of {steps['rounds']} interleaved rounds of "
        f"{steps['steps_per_round']} steps): fp32 {steps['fp32_ms']:.1f} ms, bf16 "
        f"{steps['bf16_ms']:.1f} ms (ratio {steps['ratio']:.3f}).",
    ]
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    main()
