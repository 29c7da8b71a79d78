"""``python -m yoloprune <command>``: thin wrappers over the passes. Flags default to None."""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
from pathlib import Path

from yoloprune.graphs.errors import YoloPruneError

EXAMPLES = """examples:
  python -m yoloprune compile yolov5x.pt --macs 0.5            # keep half the MACs
  python -m yoloprune compile yolov5s.pt --ratio 0.3 --global  # 30%% of channels, global ranking
  python -m yoloprune compile yolov5s.yaml --no-bench          # architecture only (random init)
  python -m yoloprune graph yolov5s.pt                          # show coupled channel groups
"""


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"yoloprune: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def int_in(low: int, high: int):
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in [{low}, {high}]")
        return value

    return parse


def round_to_value(text: str) -> int | str:
    """An argparse type for --round-to: ``auto`` or a channel count in [1, 1024]."""
    if text == "auto":
        return text
    if not text.strip().lstrip("+-").isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: give a channel count (8, 16, 32) or auto")
    return int_in(1, 1024)(text)


def float_in(low: float, high: float, open_low: bool = True):
    """An argparse type: a finite number in (low, high] (or [low, high])."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or not (
            (low < value if open_low else low <= value) and value <= high
        ):
            bound = "(" if open_low else "["
            raise argparse.ArgumentTypeError(f"{value:g} is not in {bound}{low:g}, {high:g}]")
        return value

    return parse


# compiler.score.IMPORTANCES' names (listed here so the parser imports no torch; a test keeps
# the two the same)
IMPORTANCE_NAMES = ("l1", "l2", "bn", "taylor", "energy", "obs", "random")
# compiler.options' ALLOCATIONS and DEFAULT_ALLOCATION_IMAGES (the same test keeps them equal)
ALLOCATIONS = ("uniform", "global", "sensitivity")
DEFAULT_ALLOCATION_IMAGES = 32
IMGSZ = int_in(32, 4096)
COUNT = int_in(1, 100_000)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="yolov5 release checkpoint (.pt), a yoloprune pruned .pt, or a model "
        "YAML (yolov5n/s/m/l/x[6].yaml are shipped)",
    )
    p.add_argument(
        "--imgsz",
        "--img",
        type=IMGSZ,
        default=None,
        help="inference size in pixels, square (default: 640, or the checkpoint's)",
    )
    p.add_argument(
        "--group-seconds",
        type=float,
        default=None,
        help="stop tracing/group building past this many seconds (default 120)",
    )
    p.add_argument(
        "--group-memory-gib",
        type=float,
        default=None,
        help="stop tracing/group building past this much extra memory, GiB (default 4)",
    )


def _plan_args(p: argparse.ArgumentParser) -> None:
    """compile's and plan's: one target, then how to plan it."""
    _target_args(p)
    _planning_args(p)


def _target_args(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--ratio",
        type=float,
        default=None,
        help="fraction of channels to remove from every prunable group, in (0, 1)",
    )
    target.add_argument(
        "--macs",
        type=float,
        default=None,
        help="fraction of MACs to keep, in (0, 1), met within ±3%% (default 0.5)",
    )
    target.add_argument(
        "--speedup",
        type=float,
        default=None,
        help="latency-aware: be this many times faster (e.g. 2.0), measured on the latency "
        "runtime; plans from a per-layer latency table, then checks and corrects by measuring",
    )
    target.add_argument(
        "--latency-ms",
        type=float,
        default=None,
        help="latency-aware: a latency budget in milliseconds on the latency runtime",
    )


def _planning_args(p: argparse.ArgumentParser) -> None:
    """How a target is planned (compile, plan and every sweep point)."""
    p.add_argument(
        "--latency-runtime",
        choices=["ort", "torch", "tensorrt"],
        default=None,
        help="where --speedup/--latency-ms and --round-to auto are measured: ort (ONNX Runtime "
        "CPU, default), torch (PyTorch CUDA fp16; needs a GPU) or tensorrt (--round-to auto "
        "only: conv-chain engines at compile's --precision, INT8 with explicit Q/DQ; fp32 in "
        "plan and sweep; needs TensorRT)",
    )
    p.add_argument(
        "--latency-table",
        type=Path,
        default=None,
        help="the latency planners' (--speedup, --latency-ms, --latency-aware) latency table JSON "
        "to use and extend (default: ~/.cache/yoloprune/latency/, one file per runtime, device, "
        "precision, batch and threads)",
    )
    p.add_argument(
        "--latency-batch",
        type=int,
        default=None,
        metavar="N",
        help="the batch size --speedup/--latency-ms/--latency-aware, --round-to auto and "
        "sweep's timing measure at (default 1; --latency-ms is then per batch of N): plan for the "
        "batch you deploy at (a big GPU at batch 1 is launch-bound, its latency barely moves "
        "with channel counts); the ONNX file takes that batch with --dynamic",
    )
    p.add_argument(
        "--importance",
        choices=IMPORTANCE_NAMES,
        default=None,
        help="channel score: weight L1/L2 norm over the group, BN scale, first-order Taylor "
        "(|weight x loss gradient| on 8 batches of --data's training images), energy (the "
        "output energy a channel carries into its consumers on unlabeled images), obs (the "
        "consumers' output error if it is removed and the rest re-fitted), or random (default: "
        "energy where images are at hand, --calib-images or --data's train split; else l2)",
    )
    p.add_argument(
        "--global",
        dest="global_allocation",
        action="store_true",
        help="rank channels across all groups (default: the same ratio per group)",
    )
    p.add_argument(
        "--allocation",
        choices=ALLOCATIONS,
        default=None,
        help="how many channels each group keeps: uniform (the same fraction; the default "
        "without images), global (= --global), or sensitivity (the default with --calib-images "
        "or --data): each group pruned alone on those unlabeled images, its error on the "
        "head's outputs measured, channels removed where they add the least error per MAC "
        "(--max-ratio defaults to 0.6, more below MACs 0.5: 0.75 at 0.35); with "
        "--latency-aware, --speedup or --latency-ms (given, not by default): the least error "
        "per millisecond",
    )
    p.add_argument(
        "--allocation-images",
        type=int_in(1, 100_000),
        default=None,
        help="at most this many unlabeled images --allocation sensitivity measures on, the first "
        f"of those reconstruction reads (default {DEFAULT_ALLOCATION_IMAGES} at 256 px, as many "
        "pixels at larger sizes, at least 8: 8 at 640)",
    )
    p.add_argument(
        "--latency-aware",
        action="store_true",
        help="with --macs: remove channels in order of importance lost per millisecond saved "
        "(per-layer latency table of --latency-runtime), so the MACs removed are the slow ones",
    )
    p.add_argument(
        "--round-to",
        type=round_to_value,
        default=None,
        help="kept channel counts are multiples of this, or auto (default): 8, 16 or 32, the "
        "candidate pruned models timed on the latency runtime and compared at equal speed (a "
        "cached conv-chain profile on tensorrt); the report says what was chosen and why",
    )
    p.add_argument(
        "--max-ratio",
        type=float,
        default=None,
        help="most any one group may lose, in (0, 1) (default 0.8; with --allocation "
        "sensitivity 0.6, or by the target below MACs 0.5: 0.75 at 0.35, at most 0.9)",
    )
    p.add_argument(
        "--drop-blocks",
        action="store_true",
        help="latency-aware plans (--speedup, --latency-ms, --macs with --latency-aware) may "
        "also remove whole residual bottlenecks, keeping their shortcut, where that saves more "
        "time per importance lost than any channel step (depth pruning; fixed per-layer costs "
        "go with the block)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of what is random in a compile: --importance random, the images "
        "reconstruction and recalibration use, the fine-tune's order of batches (default 0)",
    )
    _custom_modules_arg(p)


def _custom_modules_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-custom-modules",
        action="store_true",
        help="ultralytics models: let the two halves of a C2f/C3k2/C2PSA block keep different "
        "channel counts (by default they stay equal, so the -pruned-ultralytics.pt loads with "
        "stock ultralytics; with this flag the report names the blocks that then need yoloprune)",
    )


def _calib_images_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calib-images",
        type=Path,
        default=None,
        help="a folder of images for reconstruction (compile), --importance energy/obs, "
        "--allocation sensitivity and INT8 calibration (default: --data's train split; no labels)",
    )


def _precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "int8"],
        default=None,
        help="also write the model at this precision beside the fp32 ONNX (X.fp16.onnx: fp16 "
        "weights and activations, fp32 inputs and outputs; X.int8.onnx: explicit Q/DQ, PTQ "
        "with NVIDIA ModelOpt), parity checked at its own tolerance; TensorRT builds take "
        "the precision from the file",
    )
    _calib_images_arg(p)
    p.add_argument(
        "--precision-parity-tol",
        dest="precision_parity_tolerance",
        type=float_in(0, 1e6),
        default=None,
        help="max allowed ORT-vs-PyTorch difference of the fp16/int8 file (default: fp16 1e-2, "
        "int8 0.5 with its default fp16 float part, 0.25 with --int8-float fp32, against the "
        "fake-quantized model)",
    )
    p.add_argument(
        "--calib-count",
        type=int_in(1, 100_000),
        default=None,
        help="int8: at most this many calibration images, spread over the set (default 256; "
        "all of a smaller set: the output says how many were read)",
    )
    p.add_argument(
        "--calib-method",
        choices=["max", "entropy", "percentile"],
        default=None,
        help="int8: how activation ranges are set from the calibration images: max (default), "
        "entropy (KL divergence, TensorRT's classic calibrator) or percentile (99.99 %%)",
    )
    p.add_argument(
        "--int8-float",
        choices=["fp16", "fp32"],
        default=None,
        help="int8: the precision of everything the INT8 file leaves in float (activations "
        "between INT8 convs, SiLU, adds, the head, convs kept by --int8-max-map-drop): fp16 "
        "(default; what TensorRT runs fast, strongly typed) or fp32",
    )
    p.add_argument(
        "--int8-max-map-drop",
        type=float_in(0, 1, open_low=False),
        default=None,
        help="int8: keep the convs whose quantization costs most mAP out of INT8 (in the "
        "--int8-float precision) until the INT8 "
        "model is within this mAP@.5:.95 of the float one (e.g. 0.005; measured on "
        "--int8-sensitivity-images of --data's train split, held out from the val mAP; the "
        "report lists them)",
    )
    p.add_argument(
        "--int8-sensitivity-images",
        type=int_in(1, 1_000_000),
        default=None,
        help="train images the sensitivity pass measures each conv on, evenly spread (default "
        "64; more is steadier and slower)",
    )


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=["fp16", "fp32", "int8"],
        default=None,
        help="which ONNX file to build: X.onnx is fp32, X.fp16.onnx and X.int8.onnx beside it "
        "(the precision lives in the file: TensorRT builds strongly typed networks); default: "
        "the given file's own",
    )
    p.add_argument(
        "--max-batch",
        type=int_in(1, 4096),
        default=None,
        help="dynamic-batch ONNX: optimization profile maximum (default 32)",
    )
    p.add_argument(
        "--opt-batch",
        type=int_in(1, 4096),
        default=None,
        help="dynamic-batch ONNX: batch TensorRT tunes for (default 1)",
    )
    p.add_argument("--workspace", type=float_in(0, 1024), default=4.0, help="workspace limit, GiB")
    p.add_argument(
        "--timing-cache", type=Path, default=None, help="TensorRT timing cache file (reused)"
    )
    p.add_argument(
        "--triton",
        type=Path,
        default=None,
        help="also write a Triton model repository here (model.plan + config.pbtxt)",
    )


def _timing_args(p) -> None:
    """How the latency runtime is timed (compile, sweep)."""
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="ONNX Runtime intra-op threads (default: all available cores)",
    )
    p.add_argument(
        "--spinning",
        action="store_true",
        help="time ONNX Runtime with intra-op spinning on (its own default; here off by default: "
        "spinning sessions time unstably on few shared cores)",
    )
    p.add_argument(
        "--bench-runs",
        type=int,
        default=None,
        help="timed runs per model (default 20, after 3 warm-up runs)",
    )


def _recovery_args(p) -> None:
    """Recovery after pruning: reconstruction, recalibration, fine-tuning (compile, sweep)."""
    p.add_argument(
        "--no-reconstruct",
        dest="reconstruct",
        action="store_false",
        help="keep the kept weights as they were (default: wherever images are at hand, "
        "--calib-images or --data's train split, re-fit each pruned conv to reproduce the "
        "original's outputs: one-shot, no labels, no training)",
    )
    p.add_argument(
        "--reconstruct-images",
        type=int_in(1, 100_000),
        default=None,
        help="images reconstruction fits on, spread over the set (default 128)",
    )
    p.add_argument(
        "--recalibrate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="re-estimate BatchNorm statistics on 20 batches of --data's training images after "
        "pruning (default: only where no reconstruction ran; it sets the BatchNorms itself)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="fine-tune the pruned model for this many epochs (default: none)",
    )
    p.add_argument("--batch", type=int, default=None, help="fine-tune batch size (default 8)")
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="fine-tune: measure mAP every N epochs and after the last, keeping the best (default "
        "1; 0: only after the last, about 2.5 s per epoch saved on the embedded model)",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fine-tune on flipped, HSV- and scale-jittered images (default: off; the original's "
        "distilled outputs carry the signal in a short fine-tune)",
    )
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fine-tune in mixed precision: fp16 on CUDA, bf16 on the CPU (default: on CUDA and "
        "on CPUs with bf16 instructions, avx512_bf16 or amx_bf16; elsewhere bf16 is emulated)",
    )
    p.add_argument(
        "--distill",
        type=float,
        default=None,
        help="weight of output-level distillation from the original (default 1; 0: labels only)",
    )
    p.add_argument(
        "--optimizer",
        choices=["sgd", "adamw"],
        default=None,
        help="fine-tune optimizer (default adamw)",
    )
    p.add_argument(
        "--lr0",
        type=float,
        default=None,
        help="initial learning rate (default 0.003 adamw, 0.01 sgd)",
    )


def _export_mode_arg(p) -> None:
    """The ONNX output form (compile, sweep)."""
    p.add_argument(
        "--export-mode",
        choices=["raw", "end2end"],
        default=None,
        help="raw: decoded boxes and scores before NMS; end2end: NMS-free top-k (x1, y1, x2, y2, "
        "score, class), for heads with a one-to-one branch (YOLO26, where it is the default)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="yoloprune",
        description="yoloprune: structured channel pruning for YOLO detectors; the result is a "
        "smaller dense model, an ONNX file checked against PyTorch, and a report.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "compile",
        help="prune, export, check and report (the whole job)",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_args(c)
    _plan_args(c)
    c.add_argument(
        "--plan",
        type=Path,
        default=None,
        help="replay a plan JSON (from `plan` or an earlier compile) instead of planning",
    )
    c.add_argument("--out", type=Path, default=None, help="output folder (default runs/compile)")
    _precision_arg(c)
    c.add_argument(
        "--no-bench", dest="bench", action="store_false", help="skip the latency measurement"
    )
    c.add_argument(
        "--profile",
        action="store_true",
        help="also profile the original and pruned ONNX files (ONNX Runtime's profiler) and "
        "split the latency ratio into MACs, convolution efficiency lost and other operators",
    )
    c.add_argument("--dynamic", action="store_true", help="ONNX with a dynamic batch axis")
    _export_mode_arg(c)
    c.add_argument("--no-simplify", dest="simplify", action="store_false", help="skip onnxsim")
    c.add_argument(
        "--parity-tol",
        dest="parity_tolerance",
        type=float,
        default=None,
        help="max allowed ORT-vs-PyTorch difference (default 1e-3, see report)",
    )

    _timing_args(c)
    c.add_argument(
        "--method",
        choices=["structured", "unstructured"],
        default="structured",
        help="structured (remove channels, default) or unstructured (the baseline: zero --ratio "
        "of each conv's weights, as yolov5's torch_utils.prune)",
    )
    acc = c.add_argument_group("accuracy (needs --data)")
    acc.add_argument(
        "--data",
        type=Path,
        default=None,
        help="data YAML (yolov5 format): mAP before/after pruning is reported",
    )
    _recovery_args(acc)
    acc.add_argument(
        "--steps",
        type=int,
        default=None,
        help="iterative mode: prune in this many steps, fine-tuning --epochs/steps between "
        "them (default 1)",
    )

    sw = sub.add_parser(
        "sweep",
        help="compile several targets from one trace; latency-mAP front and a recommendation",
    )
    _model_args(sw)
    points = sw.add_mutually_exclusive_group(required=True)
    points.add_argument("--macs", default=None, help="MACs fractions to keep, e.g. 0.9,0.7,0.5")
    points.add_argument("--speedup", default=None, help="measured speed-ups, e.g. 1.5,2,3")
    sw.add_argument("--data", type=Path, required=True, help="data YAML: mAP of every point")
    pick = sw.add_mutually_exclusive_group()
    pick.add_argument(
        "--max-map-drop",
        type=float_in(0, 1, open_low=False),
        default=None,
        help="recommend the fastest point within this much mAP@.5:.95 of the original",
    )
    pick.add_argument(
        "--latency-ms",
        type=float_in(0, 1e7),
        default=None,
        help="recommend the most accurate point within this latency (ms, on --latency-runtime "
        "at --latency-batch, as the sweep times its points)",
    )
    sw.add_argument("--out", type=Path, default=None, help="folder (default runs/sweep)")
    sw.add_argument(
        "--dynamic",
        action="store_true",
        help="every point's ONNX with a dynamic batch axis (needed to time them at "
        "--latency-batch N > 1)",
    )
    # every point is a compile: the same planning, recovery, export and timing flags
    _planning_args(sw)
    _recovery_args(sw)
    _calib_images_arg(sw)
    _export_mode_arg(sw)
    _timing_args(sw)

    g = sub.add_parser("graph", help="print the coupled channel groups of a model")
    _model_args(g)
    g.add_argument("--members", action="store_true", help="list every member of every group")
    _custom_modules_arg(g)

    e = sub.add_parser("eval", help="mAP of a model (or its exported ONNX) on a data YAML")
    _model_args(e)
    e.add_argument("--data", type=Path, required=True, help="data YAML (yolov5 format)")
    e.add_argument(
        "--onnx",
        type=Path,
        default=None,
        help="evaluate this ONNX file through ONNX Runtime instead of MODEL through PyTorch "
        "(MODEL is then not read; the output names the file measured)",
    )
    e.add_argument("--batch", type=int_in(1, 4096), default=16)
    e.add_argument(
        "--conf",
        type=float_in(0, 1, open_low=False),
        default=0.001,
        help="confidence threshold (val.py)",
    )
    e.add_argument("--iou", type=float_in(0, 1), default=0.6, help="NMS IoU threshold (val.py)")
    e.add_argument("--max-det", type=COUNT, default=300)
    e.add_argument("--threads", type=int_in(1, 1024), default=None)

    d = sub.add_parser("data", help="generate the synthetic shapes dataset (YOLO format)")
    d.add_argument(
        "--out",
        type=Path,
        default=Path("runs/data/shapes"),
        help="a new or empty folder, or an earlier dataset of this command, which is replaced "
        "(default runs/data/shapes)",
    )
    d.add_argument("--train", type=int_in(0, 1_000_000), default=2000, help="training images")
    d.add_argument("--val", type=int_in(1, 1_000_000), default=300, help="validation images")
    d.add_argument("--imgsz", type=IMGSZ, default=256, help="image size in pixels (default 256)")
    d.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, help="the images' seed")

    b = sub.add_parser(
        "bench",
        help="latency of models on a runtime (ORT CPU, PyTorch CUDA/CPU, TensorRT), interleaved",
    )
    b.add_argument(
        "models",
        metavar="MODEL",
        nargs="+",
        help="models to time A B A B ...; ratios are against the first (.pt, .yaml, .onnx; "
        ".engine for tensorrt)",
    )
    b.add_argument("--runtime", choices=["ort", "torch", "tensorrt"], default="ort")
    b.add_argument("--device", default=None, help="torch: cuda (default) or cpu")
    b.add_argument(
        "--precision",
        choices=["fp32", "fp16", "int8"],
        default=None,
        help="default: fp32 on CPU, fp16 on GPU (int8: tensorrt only)",
    )
    b.add_argument("--batch", type=int_in(1, 4096), default=1)
    b.add_argument("--imgsz", "--img", type=IMGSZ, default=None, help="default: the first model's")
    b.add_argument("--threads", type=int_in(1, 1024), default=None, help="ORT intra-op threads")
    b.add_argument(
        "--spinning",
        action="store_true",
        help="ORT: intra-op spinning on (ONNX Runtime's default; off unless given, for stable "
        "timings on few shared cores)",
    )
    b.add_argument("--runs", type=COUNT, default=50, help="timed runs per model (median reported)")
    b.add_argument("--warmup", type=int_in(0, 100_000), default=10)
    b.add_argument("--cuda-graph", action="store_true", help="torch on CUDA: replay a CUDA graph")
    b.add_argument(
        "--profile",
        action="store_true",
        help="ort: also profile each model (ONNX Runtime's profiler): convolution and other "
        "operators' time, and each model's ratio to the first split into MACs, convolution "
        "efficiency lost and other operators, with a floor",
    )
    b.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")

    t = sub.add_parser(
        "build",
        help="TensorRT engine from an ONNX file (needs TensorRT and a GPU), with metadata JSON",
    )
    t.add_argument("onnx", metavar="ONNX", type=Path, help="exported model (e.g. from compile)")
    _engine_args(t)
    t.add_argument(
        "--out", type=Path, default=None, help="engine path (default: ONNX with .engine)"
    )

    x = sub.add_parser(
        "export",
        help="ONNX of any model the compiler accepts (a release, YAML or pruned model), exactly "
        "as compile exports its result, with parity checked: the unpruned baseline, say",
    )
    _model_args(x)
    x.add_argument(
        "--out", type=Path, default=None, help="ONNX file to write (default runs/export/NAME.onnx)"
    )
    x.add_argument("--dynamic", action="store_true", help="ONNX with a dynamic batch axis")
    x.add_argument("--no-simplify", dest="simplify", action="store_false", help="skip onnxsim")
    x.add_argument("--export-mode", choices=["raw", "end2end"], default=None)
    x.add_argument(
        "--parity-tol",
        type=float_in(0, 1e6),
        default=None,
        help="max allowed ORT-vs-PyTorch difference (default 1e-3)",
    )
    x.add_argument("--threads", type=int_in(1, 1024), default=None)
    x.add_argument(
        "--data",
        type=Path,
        default=None,
        help="data YAML: --precision int8 calibrates on its train split",
    )
    _precision_arg(x)

    pl = sub.add_parser("plan", help="write a pruning plan JSON without applying it")
    _model_args(pl)
    _plan_args(pl)
    pl.add_argument("--out", type=Path, required=True, help="plan JSON path to write")
    pl.add_argument(
        "--data",
        type=Path,
        default=None,
        help="data YAML: training images for --importance taylor; its train split's images "
        "(unlabeled) for --importance energy/obs and --allocation sensitivity",
    )
    _calib_images_arg(pl)
    return parser


def cmd_compile(args) -> int:
    from yoloprune.compiler.options import refuse_timing_flags_without_bench
    from yoloprune.compiler.pipeline import CompileOptions, compile_model
    from yoloprune.compiler.report import alignment_text, profile_text, sensitivity_text

    fields = CompileOptions.__dataclass_fields__
    options = CompileOptions(**{k: v for k, v in vars(args).items() if k in fields})
    refuse_timing_flags_without_bench(options)
    report = compile_model(options)
    out = options.settings.out
    latency = report["latency_ms"].get("onnxruntime_cpu")
    print(
        f"params {report['params']['before']:,} -> {report['params']['after']:,} "
        f"({report['params']['ratio']:.3f})"
    )
    print(
        f"MACs   {report['macs']['before']:,} -> {report['macs']['after']:,} "
        f"({report['macs']['ratio']:.3f})"
    )
    if latency:
        print(
            f"ORT CPU latency (batch 1, {latency['threads']} threads, spinning "
            f"{'on' if latency.get('spinning') else 'off'}, median ms) "
            f"{latency['before']['median_ms']:.1f} -> {latency['after']['median_ms']:.1f} "
            f"({latency['ratio']:.3f})"
        )
        if "profile" in latency:
            print(profile_text(latency))
    chosen = report["alignment"].get("chosen_by")
    if chosen:
        source = " (as recorded in the replayed plan)" if options.plan else ""
        print(f"alignment{source}: {alignment_text(chosen)}")
    planned = report["plan"]
    if planned.get("sensitivity"):
        text = sensitivity_text(
            planned["allocation"],
            planned["target"]["kind"],
            planned["max_ratio"],
            planned["sensitivity"],
            replayed=options.plan is not None,
        )
        print(f"allocation: {text}")
    if report["alignment"].get("precision_note"):
        print(f"alignment note: {report['alignment']['precision_note']}")
    print(f"parity {report['parity']['max_abs_diff']:.2e} <= {report['parity']['tolerance']:g}")
    for precision, lowered in report.get("precisions", {}).items():
        if precision == "fp32":
            continue  # the parity line above
        accuracy = f", mAP@.5:.95 {lowered['map50_95']:.4f}" if "map50_95" in lowered else ""
        record = lowered.get("quantization") if precision == "int8" else None
        method = (record or {}).get("method", "").split(",")[0]
        if record and "float" in record:
            method += f", {record['float'].split()[0]} elsewhere"
        if record and "calibration_images" in record:
            method += f", calibrated on {record['calibration_images']} images"
        print(
            f"{precision}: {lowered['file']}{f' ({method})' if method else ''}, parity "
            f"{lowered['parity']['max_abs_diff']:.2e} <= {lowered['parity']['tolerance']:g}"
            f"{accuracy}"
        )
        _warn_sensitivity((record or {}).get("sensitivity"))
    rebuilt = report.get("reconstruction")
    if rebuilt:
        print(
            f"reconstructed {rebuilt['convs_fitted']} convs on {rebuilt['images']} unlabeled "
            f"images in {rebuilt['seconds']:.1f} s (head output error "
            f"{rebuilt['head_error_before']:.3f} -> {rebuilt['head_error_after']:.3f})"
        )
    tuned = report.get("accuracy", {}).get("finetune")
    if tuned:
        from yoloprune.compiler.report import finetune_summary

        print(f"fine-tuned {finetune_summary(tuned)}")
    accuracy = report.get("accuracy", {}).get("map50_95", {})
    for stage, value in accuracy.items():
        print(f"mAP@.5:.95 {stage:<10} {value:.4f}")
    if (
        "pruned" in accuracy
        and "finetuned" not in accuracy
        and accuracy["pruned"] < 0.5 * accuracy.get("original", 0)
    ):
        print(
            "note: pruning without fine-tuning lost most of the accuracy; fine-tune to recover "
            "it, e.g. --epochs 8 (make compile EPOCHS=8)"
        )
    print(
        f"wrote {out}/: " + ", ".join(sorted(report["files"].values())) + ", report.json, report.md"
    )
    for warning in report["warnings"]:  # also in report.md; repeated last, where it is seen
        print(f"WARNING: {warning}")  # stdout, as the compile's other warnings
    return 0


def cmd_graph(args) -> int:
    from yoloprune.compiler.pipeline import CompileOptions, prepare

    options = CompileOptions(
        args.model, group_seconds=args.group_seconds, group_memory_gib=args.group_memory_gib
    )
    prepared = prepare(args.model, args.imgsz, options.settings.grouping, args.allow_custom_modules)
    groups = prepared.groups
    width = max(len(g.id) for g in groups)
    print(f"{'group (root conv)':<{width}}  channels  members  status")
    for g in groups:
        status = f"protected: {g.reason}" if g.protected else "prunable"
        print(f"{g.id:<{width}}  {g.size:>8}  {len(g.members):>7}  {status}")
        if args.members:
            for m in g.members:
                print(f"{'':<{width}}    {m}")
    prunable = [g for g in groups if not g.protected]
    print(
        f"{len(groups)} groups: {len(prunable)} prunable ({sum(g.size for g in prunable):,} "
        f"channels), {len(groups) - len(prunable)} protected"
    )
    return 0


def cmd_plan(args) -> int:
    from yoloprune.compiler.pipeline import CompileOptions, plan_for, prepare

    fields = CompileOptions.__dataclass_fields__
    options = CompileOptions(**{k: v for k, v in vars(args).items() if k in fields and k != "out"})
    if args.out.is_dir():
        raise YoloPruneError(f"--out {args.out}: is a folder; give the plan's JSON file path")
    prepared = prepare(
        args.model, args.imgsz, options.settings.grouping, options.allow_custom_modules
    )
    plan = plan_for(prepared, options)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        plan.save(args.out)
    except OSError as exc:
        raise YoloPruneError(f"--out {args.out}: cannot write the plan ({exc.strerror})") from exc
    print(
        f"MACs kept {plan.macs_ratio:.3f}; {sum(g.pruned for g in plan.groups)} of "
        f"{len(plan.groups)} groups pruned; wrote {args.out}"
    )
    if plan.alignment and options.plan is None:
        from yoloprune.compiler.report import alignment_text

        print(f"alignment: {alignment_text(plan.alignment)}")
    if plan.sensitivity:
        from yoloprune.compiler.report import sensitivity_text

        text = sensitivity_text(
            plan.allocation,
            plan.target["kind"],
            plan.max_ratio,
            plan.sensitivity,
            replayed=options.plan is not None,
        )
        print(f"allocation: {text}")
    return 0


def _warn_sensitivity(sensitivity: dict | None) -> None:
    if sensitivity and not sensitivity["within_tolerance"]:
        print(
            f"WARNING: int8 mAP {sensitivity['map50_95_after']:.4f} is not within "
            f"--int8-max-map-drop {sensitivity['max_map_drop']:g} of float "
            f"{sensitivity['map50_95_float']:.4f}, with {len(sensitivity['kept_in_float'])} convs "
            f"(the cap: a quarter) kept in {sensitivity.get('kept_precision', 'fp32')}",
            file=sys.stderr,
        )


def cmd_export(args) -> int:

    from yoloprune.compiler.export import DEFAULT_PARITY_TOLERANCE, export_mode
    from yoloprune.compiler.options import sensitivity_for
    from yoloprune.compiler.pipeline import check_imgsz
    from yoloprune.compiler.quantize import calibration_for, refuse_unused_flags
    from yoloprune.graphs.checkpoint import load_model

    flags = {"--data": args.data, "--calib-images": args.calib_images}
    counts = {
        "--calib-count": args.calib_count,
        "--calib-method": args.calib_method,
        "--int8-float": args.int8_float,
        "--int8-max-map-drop": args.int8_max_map_drop,
        "--int8-sensitivity-images": args.int8_sensitivity_images,
    }
    refuse_unused_flags(args.precision, args.precision_parity_tolerance, {**flags, **counts})
    sensitivity = sensitivity_for(args.int8_max_map_drop, args.int8_sensitivity_images)
    if sensitivity is not None and args.data is None:
        raise YoloPruneError(
            "--int8-max-map-drop measures mAP: add --data data.yaml (its train split)"
        )
    model, info = load_model(args.model)
    out = args.out or Path("runs/export") / f"{info.name}.onnx"
    if out.is_dir():
        raise YoloPruneError(f"--out {out}: is a folder; give the ONNX file path to write")
    if out.suffix != ".onnx":
        raise YoloPruneError(f"--out {out}: the file written is ONNX; give a path ending in .onnx")
    imgsz = check_imgsz(info.imgsz if args.imgsz is None else args.imgsz, info)
    mode = export_mode(model, args.export_mode)
    tolerance = DEFAULT_PARITY_TOLERANCE if args.parity_tol is None else args.parity_tol
    calibration = calibration_for(
        args.precision,
        args.calib_images,
        args.data,
        args.calib_count,
        args.calib_method,
        args.int8_float,
    )
    keep_float = None
    if sensitivity is not None:
        from yoloprune.compiler.sensitivity import keeper
        from yoloprune.compiler.train.data import read_data_yaml

        data = read_data_yaml(args.data)
        if data.nc != info.nc:
            raise YoloPruneError(
                f"{args.data}: {data.nc} classes but {args.model} has {info.nc}; measure a "
                "model on the data it was trained for"
            )
        keep_float = keeper(sensitivity, data, imgsz, mode, exclude=calibration.files)
    written = _export_files(args, model, info, out, imgsz, mode, tolerance, calibration, keep_float)
    print("\n".join(written))
    return 0


def _staging_folder(out: Path):
    """A temporary folder beside ``out`` (same file system: the files move in at the end), or
    the one line saying ``out``'s folder cannot be written."""
    import tempfile

    try:
        return tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.")
    except OSError as exc:
        raise YoloPruneError(f"--out {out}: cannot write there ({exc.strerror or exc})") from exc


def _export_files(args, model, info, out, imgsz, mode, tolerance, calibration, keep_float):
    """Write the fp32 file and the asked precision's beside it, all together or none (an
    earlier export's other siblings removed, and said so); the lines to print."""
    import os

    from yoloprune.compiler.export import export_checked
    from yoloprune.compiler.precision import PRECISIONS, lower_checked, precision_path
    from yoloprune.graphs.files import parent_made, signals_held

    with parent_made(out), _staging_folder(out) as tmp:
        staged = {"fp32": Path(tmp) / out.name}  # every file appears together, or none
        parity = export_checked(
            model,
            staged["fp32"],
            imgsz,
            dynamic=args.dynamic,
            simplify=args.simplify,
            mode=mode,
            tolerance=tolerance,
            threads=args.threads,
        )
        lines = [
            f"{info.family} model at {imgsz} px, {mode} output; parity "
            f"{parity.max_abs_diff:.2e} <= {parity.tolerance:g}; wrote {out}"
        ]
        if args.precision not in (None, "fp32"):
            staged[args.precision], lowered, record = lower_checked(
                model,
                staged["fp32"],
                imgsz,
                args.precision,
                tolerance=args.precision_parity_tolerance,
                threads=args.threads,
                calibration=calibration,
                mode=mode,
                dynamic=args.dynamic,
                keep_float=keep_float,
            )
            lines.append(
                f"{args.precision}: parity {lowered.max_abs_diff:.2e} <= {lowered.tolerance:g}; "
                f"wrote {precision_path(out, args.precision)}"
            )
            _warn_sensitivity(record.get("sensitivity"))
        with signals_held():
            for precision in PRECISIONS:  # siblings of an earlier export would not match
                sibling = precision_path(out, precision)
                if precision not in staged and sibling.exists():
                    sibling.unlink()
                    lines.append(f"removed {sibling}: an earlier export's, not of this one")
            for precision, path in staged.items():
                os.replace(path, precision_path(out, precision))
    return lines


def cmd_eval(args) -> int:
    from yoloprune.compiler.evaluation.evaluate import (
        EvalSettings,
        evaluate,
        onnx_predictor,
        torch_predictor,
        val_dataset,
    )
    from yoloprune.compiler.train.data import read_data_yaml
    from yoloprune.graphs.checkpoint import load_model

    data = read_data_yaml(args.data)
    settings = EvalSettings(conf=args.conf, iou=args.iou, max_det=args.max_det, batch=args.batch)
    if args.onnx is not None:
        if not args.onnx.is_file():
            raise YoloPruneError(f"{args.onnx}: ONNX file not found")
        from yoloprune.compiler.export import onnx_input_size

        imgsz = args.imgsz or onnx_input_size(args.onnx)
        predict, runtime = onnx_predictor(args.onnx, args.threads), "onnxruntime"
    else:
        model, info = load_model(args.model)
        imgsz = args.imgsz or info.imgsz
        predict, runtime = torch_predictor(model), "pytorch"
    with predict:  # an ONNX predictor holds its session until closed
        dataset = val_dataset(data, imgsz)
        for message in dataset.check.messages:
            print(f"WARNING: {message}", file=sys.stderr)
        metrics = evaluate(predict, dataset, data.names, settings, runtime=runtime)
    evaluated = args.onnx if args.onnx is not None else args.model  # the file measured
    print(
        f"{runtime} ({evaluated}): mAP@.5:.95 {metrics.map50_95:.4f}  mAP@.5 "
        f"{metrics.map50:.4f}  ({metrics.images} images, {metrics.instances} objects; "
        f"{metrics.data_check})"
    )
    for name, ap in metrics.per_class.items():
        print(f"  {name:<20} {ap:.4f}")
    return 0


def cmd_bench(args) -> int:
    import json

    from yoloprune.compiler.bench import BenchSettings, bench, render

    settings = BenchSettings(
        runtime=args.runtime,
        batch=args.batch,
        imgsz=args.imgsz,
        precision=args.precision,
        device=args.device,
        threads=args.threads,
        spinning=args.spinning,
        runs=args.runs,
        warmup=args.warmup,
        cuda_graph=args.cuda_graph,
        profile=args.profile,
    )
    if args.out is not None and args.out.is_dir():
        raise YoloPruneError(f"--out {args.out}: is a folder; give the JSON file path to write")
    result = bench(args.models, settings)
    print(render(result))
    if args.out is not None:
        from yoloprune.graphs.files import write_text_atomic

        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_build(args) -> int:
    from yoloprune.kernels.tensorrt import BuildSettings, build_engine, write_triton_repository

    onnx_path = onnx_at_precision(args.onnx, args.precision)
    settings = BuildSettings(
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        workspace_gib=args.workspace,
        timing_cache=args.timing_cache,
    )
    engine = args.out or onnx_path.with_suffix(".engine")
    built = build_engine(onnx_path, engine, settings, _engine_extras(args.onnx))
    print(f"wrote {built.engine} and {built.metadata}")
    if args.triton is not None:
        folder = write_triton_repository(
            built.engine, built.metadata, args.triton, onnx_path.stem.replace(".", "_")
        )
        print(f"wrote Triton model {folder}")
    return 0


def onnx_at_precision(onnx_path: Path, precision: str | None) -> Path:
    """The ONNX file to build: ``onnx_path`` itself, or its sibling at ``precision``
    (``X.onnx`` fp32, ``X.fp16.onnx``, ``X.int8.onnx``), which must exist and say so."""
    from yoloprune.kernels.tensorrt import onnx_properties

    if not onnx_path.is_file():
        raise YoloPruneError(f"{onnx_path}: ONNX file not found; export one with compile")
    own = onnx_properties(onnx_path).get("precision", "fp32")
    if precision is None or precision == own:
        return onnx_path
    base = onnx_path.name.removesuffix(".onnx").removesuffix(f".{own}")
    sibling = onnx_path.with_name(base + ("" if precision == "fp32" else f".{precision}") + ".onnx")
    if not sibling.is_file():
        raise YoloPruneError(
            f"{onnx_path}: is {own}, and no {precision} file {sibling.name} is beside it; "
            f"TensorRT takes the precision from the ONNX: write it with `export --precision "
            f"{precision}` (or build this file without --precision)"
        )
    found = onnx_properties(sibling).get("precision", "fp32")
    if found != precision:
        raise YoloPruneError(
            f"{sibling}: its metadata says {found}, not {precision}; export it again"
        )
    return sibling


def _engine_extras(onnx_path: Path) -> dict:
    """Class names, anchors and the pruning summary of a compile output, when beside it."""
    import json

    report = onnx_path.parent / "report.json"
    if not report.is_file():
        return {}
    try:
        data = json.loads(report.read_text())
        return {
            "names": data["model"].get("names"),
            "anchors": data["model"].get("anchors"),
            "stride": data["model"].get("stride"),
            "pruning": {"plan": data["plan"], "macs": data["macs"], "params": data["params"]},
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise YoloPruneError(
            f"{report}: not a compile report ({type(exc).__name__}); move it away from the ONNX "
            "file or compile again"
        ) from exc


def cmd_data(args) -> int:
    from yoloprune.compiler.train.synthetic import SyntheticSpec, available_cores, generate

    spec = SyntheticSpec(train=args.train, val=args.val, imgsz=args.imgsz, seed=args.seed)
    path = generate(args.out, spec, workers=min(available_cores(), 8))
    print(f"wrote {path}")
    return 0


SWEEP_OWN = ("macs", "speedup", "latency_ms", "max_map_drop", "command")


def sweep_options(args):
    """The sweep the parsed flags ask for: its points, criterion and the compile options every
    point shares (every compile flag the sweep takes; its own --macs/--speedup lists and
    --latency-ms criterion are not a point's target)."""
    from yoloprune.compiler.options import CompileOptions
    from yoloprune.compiler.sweep import SweepOptions, parse_values

    if args.macs is not None:
        kind, values = "macs", parse_values(args.macs, "--macs", 0, 1, open_high=True)
    else:
        kind, values = "speedup", parse_values(args.speedup, "--speedup", 1, 1000, open_high=False)
    fields = set(CompileOptions.__dataclass_fields__) - set(SWEEP_OWN) - {"model"}
    shared = {k: v for k, v in vars(args).items() if k in fields}
    # where the points' planning times nothing (by the compile's own settings: a fixed
    # --round-to under --macs, say), the timing flags are the sweep's alone; the compile would
    # refuse them as unused
    timing = {k: shared.pop(k) for k in ("latency_batch", "latency_runtime")}
    # the base carries the first point's target, so flags that only some targets read (a
    # latency table, the latency batch) are checked as the points will use them
    base = CompileOptions(args.model, **{kind: values[0]}, **shared)
    if base.settings.latency is not None or base.settings.alignment is not None:
        base = CompileOptions(args.model, **{kind: values[0]}, **shared, **timing)
        timing = {}
    return SweepOptions(base, kind, values, args.max_map_drop, args.latency_ms, **timing)


def cmd_sweep(args) -> int:
    from yoloprune.compiler.sweep import run_sweep

    sweep = sweep_options(args)
    record = run_sweep(sweep)
    for point in record["points"]:
        print(
            f"{point['name']:<14} MACs {point['macs_ratio']:.3f}  mAP@.5:.95 "
            f"{point['map50_95']:.4f}  latency {point['latency_ms']:.2f} ms "
            f"({point['latency_ratio']:.3f})"
        )
    for point in record["unreachable"]:
        print(f"{point['name']:<14} not reachable: {point['why']}")
        if point["earlier_folder_removed"]:
            print(f"{'':<14} removed {sweep.out / point['name']}/, an earlier sweep's point")
    chosen = record["recommended"]
    if chosen and chosen["name"]:
        print(f"recommended: {chosen['name']} ({chosen['why']})")
    elif chosen:
        print(f"no recommendation: {chosen['why']}")
    print(f"wrote {sweep.out}/: sweep.json, sweep.md, sweep.png and one folder per point compiled")
    return 0


COMMANDS = {
    "sweep": cmd_sweep,
    "compile": cmd_compile,
    "graph": cmd_graph,
    "plan": cmd_plan,
    "export": cmd_export,
    "eval": cmd_eval,
    "data": cmd_data,
    "bench": cmd_bench,
    "build": cmd_build,
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a `timeout`, a CI cancel), unwound like Ctrl-C so nothing partial is left."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad flag (one line already printed by Parser)
        return exc.code
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    from yoloprune.kernels.ort import telemetry_off

    telemetry_off()  # before any library imports onnxruntime (see kernels/ort.py)
    try:
        return COMMANDS[args.command](args)
    except YoloPruneError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"yoloprune: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"yoloprune: {what}; nothing was written", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
