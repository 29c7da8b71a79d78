"""Precision table: the embedded models (YOLOv5n, and the YOLOv8n trained by
train_default_model.py --model yolov8n where present), unpruned and pruned (compile's default
MACs 0.5, BatchNorm recalibrated, then fine-tuned as accuracy.md does: 8 epochs, AdamW lr
0.003, distillation from the unpruned model), each exported at fp32 and lowered to fp16 and
int8 as compile does (`--precision`): ONNX bytes, ONNX Runtime CPU latency (batch 1,
interleaved), parity against PyTorch and its tolerance, mAP@.5:.95 and mAP@.5 of the ONNX file
itself on the synthetic val split, and each lowered file's mAP as a share of its fp32 file's.

INT8: post-training quantization with NVIDIA ModelOpt (max calibration on 256 training images,
symmetric, per-channel weights, per-tensor activations, BatchNorm folded), explicit Q/DQ in the
ONNX; and, for the fine-tuned pruned models, quantization-aware training (compile's
`--precision int8 --epochs N`: 4 epochs from the fine-tuned model, AdamW lr 1e-4, no warm-up,
distillation from the unpruned fp32 model). Then the calibrators compared on the first pruned
model (max, entropy, percentile), and which ops fp16 must keep in fp32, by measurement.

    python benchmarks/precision.py [--runs 30] [--epochs 8] [--qat-epochs 4]
Writes benchmarks/results/precision.{json,md,png}; fine-tuned checkpoints are kept under
runs/precision/ and reused by a later run with the same settings.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from yoloprune.compiler.evaluation.evaluate import evaluate, onnx_predictor, val_dataset  # noqa: E402
from yoloprune.compiler.export import check_parity, export_onnx  # noqa: E402
from yoloprune.compiler.pipeline import CompileOptions, prepare, prune_in_memory  # noqa: E402
from yoloprune.compiler.precision import (  # noqa: E402
    INT8_FP16_PARITY_TOLERANCE,
    PARITY_TOLERANCES,
    lower_checked,
)
from yoloprune.compiler.quantize import Calibration  # noqa: E402
from yoloprune.compiler.train.data import read_data_yaml  # noqa: E402
from yoloprune.compiler.train.qat import quantization_aware_training  # noqa: E402
from yoloprune.compiler.train.synthetic import SyntheticSpec, generate  # noqa: E402
from yoloprune.graphs.files import save_png_atomic, write_text_atomic  # noqa: E402
from yoloprune.kernels.ort import OrtRunner, machine_info, machine_text, order_text, time_runners  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODELS = [ROOT / "graphs" / "weights" / f"{name}-shapes.pt" for name in ("yolov5n", "yolov8n")]
EXTRA_FP32_OPS = {
    "converter's block list only (ours)": [],
    "+ Exp, Softmax, Sigmoid": ["Exp", "Softmax", "Sigmoid"],
    "+ TopK, GatherElements": ["TopK", "GatherElements"],
    "+ box decoding (Mul, Add, Sub, Div, Pow)": ["Mul", "Add", "Sub", "Div", "Pow"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "data" / "shapes")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=8, help="fp32 fine-tune of the pruned")
    parser.add_argument("--qat-epochs", type=int, default=4)
    parser.add_argument("--qat-lr0", type=float, default=1e-4)
    parser.add_argument(
        "--models",
        nargs="+",
        type=Path,
        default=[p for p in MODELS if p.is_file()],
        help="trained checkpoints on the shapes data (default: the embedded ones)",
    )
    args = parser.parse_args()
    data_yaml, data = shapes(args.data)
    calibration = Calibration(data=data_yaml)  # the default: fp16 elsewhere
    fp32_elsewhere = Calibration(data=data_yaml, float_precision="fp32")
    entries, imgsz, first_pruned, seconds = [], None, None, {}
    for checkpoint in args.models:
        prepared = prepare(str(checkpoint))
        imgsz = imgsz or prepared.imgsz
        if prepared.imgsz != imgsz:
            raise SystemExit(f"{checkpoint}: trained at {prepared.imgsz} px, not {imgsz}")
        label = checkpoint.name.removesuffix(".pt")
        tuned = fine_tuned(prepared, checkpoint, data_yaml, data, args.epochs)
        start = time.perf_counter()
        qat = quantization_aware_training(
            tuned,
            prepared.info,
            data,
            qat_settings(args.qat_epochs, imgsz, args.qat_lr0),
            calibration,
            teacher=prepared.model,
        )
        seconds[f"{label} QAT"] = round(time.perf_counter() - start, 1)
        pruned_label = f"{label} pruned MACs 0.5, fine-tuned"
        entries += [(f"{label} original", prepared.model, None), (pruned_label, tuned, qat)]
        first_pruned = first_pruned or (tuned, pruned_label)
    val = val_dataset(data, imgsz)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}

        def add(key, model_name, precision, path, parity, record=None):
            with onnx_predictor(path) as predict:
                metrics = evaluate(predict, val, data.names, runtime="onnxruntime")
            files[key] = path
            rows[key] = {
                "model": model_name,
                "precision": precision,
                "quantization": record,
                "onnx_bytes": path.stat().st_size,
                "parity": parity.to_dict(),
                "map50_95": metrics.map50_95,
                "map50": metrics.map50,
            }
            reference = rows[f"{model_name} fp32"]["map50_95"]
            rows[key]["share_of_fp32"] = metrics.map50_95 / reference
            print(f"{key}: mAP {metrics.map50_95:.4f}, parity {parity.max_abs_diff:.2e}")

        for i, (name, model, qat) in enumerate(entries):
            fp32 = export_onnx(model, Path(tmp) / f"m{i}.onnx", imgsz)
            add(f"{name} fp32", name, "fp32", fp32, check_parity(model, fp32, imgsz))
            fp16, parity16, _ = lower_checked(model, fp32, imgsz, "fp16")
            add(f"{name} fp16", name, "fp16", fp16, parity16)
            int8, parity8, record8 = lower_checked(
                model, fp32, imgsz, "int8", calibration=calibration
            )
            add(f"{name} int8 PTQ", name, "int8", int8, parity8, record8)
            fp32_body = export_onnx(model, Path(tmp) / f"m{i}body.onnx", imgsz)
            int8b, parityb, recordb = lower_checked(
                model, fp32_body, imgsz, "int8", calibration=fp32_elsewhere
            )
            add(f"{name} int8 PTQ, fp32 elsewhere", name, "int8", int8b, parityb, recordb)
            if qat is not None:  # its own fp32 base name, so the two int8 files do not collide
                base = export_onnx(qat.fp32, Path(tmp) / f"m{i}qat.onnx", imgsz)
                int8q, parityq, recordq = lower_checked(
                    qat.fp32, base, imgsz, "int8", calibration=calibration, trained=qat
                )
                add(f"{name} int8 QAT", name, "int8", int8q, parityq, recordq)
        timings = measure(files, imgsz, args.runs)
        for key, timing in timings.items():
            rows[key]["latency_ms"] = timing.to_dict()
        calibrators = calibrator_study(first_pruned, imgsz, data_yaml, val, data, Path(tmp))
        original = entries[0]
        study = op_study(original[1], files[f"{original[0]} fp32"], imgsz, Path(tmp))
    result = {
        "models": [str(p) for p in args.models],
        "imgsz": imgsz,
        "batch": 1,
        "runtime": "onnxruntime (CPUExecutionProvider, ORT_ENABLE_ALL)",
        "order": order_text(False),
        "runs": args.runs,
        "pruning": "compile's default: uniform L2, MACs 0.5, round_to 8, BatchNorm recalibrated "
        f"(20 x 32 train images), then fine-tuned {args.epochs} epochs as accuracy.md (AdamW "
        "lr 0.003, batch 16, EMA, distillation 1.0 from the unpruned model)",
        "fp16_method": "onnxconverter-common float16 (keep_io_types), converter's op block list",
        "int8_method": "NVIDIA ModelOpt INT8 (max calibration), 256 train images, BN folded, "
        "everything left in float at fp16 (the default; Q/DQ scales fp16, opset 19) unless the row "
        "says fp32 elsewhere; "
        f"PTQ, and QAT: {args.qat_epochs} epochs from the fine-tuned model, AdamW lr0 "
        f"{args.qat_lr0:g}, no warm-up, distillation 1.0 from the unpruned fp32 model",
        "qat_seconds": seconds,
        "tolerances": {**PARITY_TOLERANCES, "int8, fp16 elsewhere": INT8_FP16_PARITY_TOLERANCE},
        "targets": TARGETS,
        "val_images": len(val),
        "machine": machine_info(),
        "rows": rows,
        "calibrators": calibrators,
        "calibrator_model": first_pruned[1],
        "fp32_ops_study": study,
        "op_study_model": original[0],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / "precision.json", json.dumps(result, indent=1) + "\n")
    plot(result, RESULTS / "precision.png")
    write_text_atomic(RESULTS / "precision.md", render(result, "precision.png"))
    print(render(result, "precision.png"))


def shapes(folder: Path):
    """The synthetic shapes set in ``folder`` (generated if missing): its YAML and config."""
    data_yaml = folder / "data.yaml"
    if not data_yaml.exists():
        generate(folder, SyntheticSpec())
    return data_yaml, read_data_yaml(data_yaml)


# The issue's accuracy targets, as a share of the same model's fp32 file's mAP@.5:.95.
TARGETS = {"fp16": "within 0.002", "int8 PTQ": ">= 98.5 %", "int8 QAT": ">= 99.5 %"}


def target_met(key: str, row: dict, fp32_map: float) -> str:
    if row["precision"] == "fp16":
        return "yes" if abs(row["map50_95"] - fp32_map) <= 0.002 else "no"
    if row["precision"] == "int8" and "pruned" in row["model"]:
        need = 0.995 if key.endswith("QAT") else 0.985
        return "yes" if row["share_of_fp32"] >= need else "no"
    return "-"


def fine_tuned(prepared, checkpoint: Path, data_yaml: Path, data, epochs: int):
    """The pruned model (compile's stages) fine-tuned as accuracy.md does; cached in runs/."""
    from benchmarks.accuracy import finetune_settings
    from yoloprune.compiler.train.finetune import train
    from yoloprune.graphs.checkpoint import load_model, save_pruned

    cache = ROOT / "runs" / "precision" / f"{checkpoint.stem}-macs0.5-ft{epochs}.pt"
    if cache.is_file():
        return load_model(cache)[0]
    # the recipe precision.md was measured with (before reconstruction became the default)
    options = CompileOptions(
        str(checkpoint), macs=0.5, data=data_yaml, importance="l2", reconstruct=False, round_to=8
    )
    pruned = prune_in_memory(options, prepared)["pruned"]
    settings = finetune_settings(epochs, prepared.imgsz, 0.003, distill=1.0)
    tuned = train(pruned, prepared.info, data, settings, teacher=prepared.model).model
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_pruned(tuned, prepared.info, cache)
    return tuned


def qat_settings(epochs: int, imgsz: int, lr0: float):
    """accuracy.md's fine-tune, without warm-up, distilling from the unpruned model."""
    from benchmarks.accuracy import finetune_settings

    return dataclasses.replace(
        finetune_settings(epochs, imgsz, lr0), warmup_epochs=0.0, distill=1.0
    )


def calibrator_study(first, imgsz: int, data_yaml: Path, val, data, folder: Path) -> dict:
    """INT8 PTQ of one model with each activation calibrator: mAP of the ONNX file."""
    from yoloprune.compiler.quantize import CALIBRATION_METHODS

    model, _ = first
    fp32 = export_onnx(model, folder / "calibrators.onnx", imgsz)
    study = {}
    for method in CALIBRATION_METHODS:
        calibration = Calibration(data=data_yaml, method=method)
        path, parity, record = lower_checked(model, fp32, imgsz, "int8", calibration=calibration)
        with onnx_predictor(path) as predict:
            metrics = evaluate(predict, val, data.names, runtime="onnxruntime")
        study[method] = {
            "calibrator": record["calibrator"],
            "map50_95": metrics.map50_95,
            "map50": metrics.map50,
            "parity": parity.max_abs_diff,
        }
        print(f"calibrator {method}: mAP {metrics.map50_95:.4f}")
    return study


def measure(files: dict, imgsz: int, runs: int) -> dict:
    """Every file timed against the others, interleaved, on one fixed input."""
    images = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    with contextlib.ExitStack() as active:
        runners = {k: active.enter_context(OrtRunner(p)) for k, p in files.items()}
        return time_runners(runners, images, runs, warmup=5)


def op_study(model, fp32: Path, imgsz: int, folder: Path) -> dict:
    """Parity of fp16 files that keep more op types in fp32 than the converter's list."""
    from onnxconverter_common import float16

    from yoloprune.compiler.precision import _casts_follow_their_outputs, _constants_as_initializers

    study = {}
    for label, extra in EXTRA_FP32_OPS.items():
        proto = onnx.load(str(fp32))
        _constants_as_initializers(proto)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            converted = float16.convert_float_to_float16(
                proto, keep_io_types=True, op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, *extra]
            )
        _casts_follow_their_outputs(converted, onnx.TensorProto)
        path = folder / f"study{len(study)}.onnx"
        onnx.save(converted, str(path))
        parity = check_parity(model, path, imgsz, tolerance=PARITY_TOLERANCES["fp16"])
        study[label] = {
            "extra_fp32_ops": extra,
            "parity": parity.max_abs_diff,
            "box_px": parity.max_abs_diff_pixels,
            "onnx_bytes": path.stat().st_size,
        }
    return study


def plot(result: dict, path: Path) -> None:
    """One panel per embedded model: latency against mAP of each file, marker by file kind,
    colour by unpruned or pruned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = sorted({row["model"].split()[0] for row in result["rows"].values()})
    fig, axes = plt.subplots(1, len(bases), figsize=(5.5 * len(bases), 5.2), squeeze=False)
    markers = {"fp32": "o", "fp16": "s", "int8 PTQ": "^", "int8 QAT": "v"}
    markers["int8 PTQ, fp32 elsewhere"] = "<"
    for ax, base in zip(axes[0], bases, strict=True):
        for key, row in result["rows"].items():
            if not row["model"].startswith(base):
                continue
            kind = key.removeprefix(f"{row['model']} ")
            pruned = "pruned" in row["model"]
            ax.scatter(
                row["latency_ms"]["median_ms"],
                row["map50_95"],
                marker=markers[kind],
                s=60,
                color="tab:orange" if pruned else "tab:blue",
                label=f"{'pruned MACs 0.5, fine-tuned' if pruned else 'original'} {kind}",
            )
        ax.set_title(base)
        ax.set_xlabel("ONNX Runtime CPU latency, batch 1 (median ms)")
        ax.set_ylabel("mAP@.5:.95 (synthetic val)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2)
    fig.suptitle(
        f"fp32, fp16 and int8 ONNX files at {result['imgsz']} px (CPU: INT8 is for TensorRT)"
    )
    save_png_atomic(fig, path)


def render(result: dict, image: str) -> str:
    m = result["machine"]
    lines = [
        "# Precision: fp32, fp16 and int8 ONNX of the embedded models, unpruned and pruned",
        "",
        f"{result['runtime']}, batch {result['batch']}, {result['imgsz']} px, "
        f"{m['cores_available']} threads, median of {result['runs']} runs, {result['order']}; "
        f"{machine_text(m)}, onnxruntime {m['onnxruntime']}. Pruning: {result['pruning']}. "
        f"fp16: {result['fp16_method']}. int8: {result['int8_method']} (parity against the "
        "fake-quantized PyTorch model on calibration images). mAP of each ONNX file on "
        f"{result['val_images']} synthetic val images (val.py conventions). Parity: ONNX "
        "Runtime vs the fp32 PyTorch model on seeded noise (boxes relative to max(imgsz, "
        "|box|), scores absolute).",
        "",
        "| model | file | MB | median ms | mAP@.5:.95 | mAP@.5 | % of fp32 | target met | "
        "parity (tolerance) |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for key, row in result["rows"].items():
        parity, fp32 = row["parity"], result["rows"][f"{row['model']} fp32"]["map50_95"]
        kind = key.removeprefix(f"{row['model']} ")
        lines.append(
            f"| {row['model']} | {kind} | {row['onnx_bytes'] / 1e6:.2f} | "
            f"{row['latency_ms']['median_ms']:.2f} | {row['map50_95']:.4f} | {row['map50']:.4f} | "
            f"{row['share_of_fp32']:.1%} | {target_met(key, row, fp32)} | "
            f"{parity['max_abs_diff']:.2e} ({parity['tolerance']:g}) |"
        )
    targets = ", ".join(f"{k} {v}" for k, v in result["targets"].items())
    lines += [
        "",
        f"Targets (pruned, fine-tuned rows; share of the same model's fp32 file): {targets}. "
        f"QAT took {', '.join(f'{k} {v:.0f} s' for k, v in result['qat_seconds'].items())}.",
        "",
        f"## INT8 calibrators (PTQ of {result['calibrator_model']})",
        "",
        "| calibrator | mAP@.5:.95 | mAP@.5 | parity vs fake-quantized |",
        "|---|---:|---:|---:|",
    ]
    for entry in result["calibrators"].values():
        lines.append(
            f"| {entry['calibrator']} | {entry['map50_95']:.4f} | {entry['map50']:.4f} | "
            f"{entry['parity']:.2e} |"
        )
    lines += [
        "",
        f"![latency vs mAP]({image})",
        "",
        f"## Which ops fp16 keeps in fp32 (measured on {result['op_study_model']})",
        "",
        "| ops kept in fp32 | parity | largest box difference (px) | MB |",
        "|---|---:|---:|---:|",
    ]
    for label, entry in result["fp32_ops_study"].items():
        lines.append(
            f"| {label} | {entry['parity']:.2e} | {entry['box_px']:.3f} | "
            f"{entry['onnx_bytes'] / 1e6:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"{time.perf_counter() - start:.0f} s")
