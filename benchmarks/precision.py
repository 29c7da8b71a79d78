"""Precision table: the embedded models (YOLOv5n, and the YOLOv8n trained by
train_default_model.py --model yolov8n where present), unpruned and pruned (compile's default
MACs 0.5, with BatchNorm recalibration, no fine-tune), each exported at fp32 and lowered to fp16
and int8 as compile does (`--precision`): ONNX bytes, ONNX Runtime CPU latency (batch 1,
interleaved), parity against PyTorch fp32 and its tolerance, mAP@.5:.95 and mAP@.5 of the
ONNX file itself on the synthetic val split. Then which ops fp16 must keep in fp32, by
measurement: the converter's block list alone against keeping the exponentials, top-k or box
decoding in fp32 as well.

INT8: post-training quantization with NVIDIA ModelOpt (max calibration on 256 training images,
symmetric, per-channel weights, per-tensor activations, BatchNorm folded), explicit Q/DQ in the
ONNX; its parity is against the fake-quantized PyTorch model on calibration images. QAT and the
sensitivity pass are not built yet (README).

    python benchmarks/precision.py [--runs 30]
Writes benchmarks/results/precision.{json,md,png}.
"""

from __future__ import annotations

import argparse
import contextlib
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
from yoloprune.compiler.precision import PARITY_TOLERANCES, lower_checked  # noqa: E402
from yoloprune.compiler.quantize import Calibration  # noqa: E402
from yoloprune.compiler.train.data import read_data_yaml  # noqa: E402
from yoloprune.compiler.train.synthetic import SyntheticSpec, generate  # noqa: E402
from yoloprune.graphs.files import atomic_path, write_text_atomic  # noqa: E402
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
    parser.add_argument(
        "--models",
        nargs="+",
        type=Path,
        default=[p for p in MODELS if p.is_file()],
        help="trained checkpoints on the shapes data (default: the embedded ones)",
    )
    args = parser.parse_args()
    data_yaml = args.data / "data.yaml"
    if not data_yaml.exists():
        generate(args.data, SyntheticSpec())
    data = read_data_yaml(data_yaml)
    models, imgsz, first = {}, None, None
    for checkpoint in args.models:
        prepared = prepare(str(checkpoint))
        imgsz = imgsz or prepared.imgsz
        if prepared.imgsz != imgsz:
            raise SystemExit(f"{checkpoint}: trained at {prepared.imgsz} px, not {imgsz}")
        options = CompileOptions(str(checkpoint), macs=0.5, data=data_yaml)
        pruned = prune_in_memory(options, prepared)["pruned"]
        label = checkpoint.name.removesuffix(".pt")
        models[f"{label} original"] = prepared.model
        models[f"{label} pruned MACs 0.5"] = pruned
        first = first or (prepared.model, f"{label} original")
    val = val_dataset(data, imgsz)
    rows, study = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for i, (name, model) in enumerate(models.items()):
            fp32 = export_onnx(model, Path(tmp) / f"m{i}.onnx", imgsz)
            fp16, parity16, _ = lower_checked(model, fp32, imgsz, "fp16")
            int8, parity8, record8 = lower_checked(
                model, fp32, imgsz, "int8", calibration=Calibration(data=data_yaml)
            )
            parity32 = check_parity(model, fp32, imgsz)
            lowered = (("fp32", fp32, parity32), ("fp16", fp16, parity16), ("int8", int8, parity8))
            for precision, path, parity in lowered:
                key = f"{name} {precision}"
                files[key] = path
                with onnx_predictor(path) as predict:
                    metrics = evaluate(predict, val, data.names, runtime="onnxruntime")
                rows[key] = {
                    "model": name,
                    "precision": precision,
                    "quantization": record8 if precision == "int8" else None,
                    "onnx_bytes": path.stat().st_size,
                    "parity": parity.to_dict(),
                    "map50_95": metrics.map50_95,
                    "map50": metrics.map50,
                }
                print(f"{key}: mAP {metrics.map50_95:.4f}, parity {parity.max_abs_diff:.2e}")
        timings = measure(files, imgsz, args.runs)
        for key, timing in timings.items():
            rows[key]["latency_ms"] = timing.to_dict()
        study = op_study(first[0], files[f"{first[1]} fp32"], imgsz, Path(tmp))
    result = {
        "models": [str(p) for p in args.models],
        "imgsz": imgsz,
        "batch": 1,
        "runtime": "onnxruntime (CPUExecutionProvider, ORT_ENABLE_ALL)",
        "order": order_text(False),
        "runs": args.runs,
        "pruning": "compile's default: uniform L2, MACs 0.5, round_to 8, BatchNorm recalibrated "
        "(20 x 32 train images), no fine-tune",
        "fp16_method": "onnxconverter-common float16 (keep_io_types), converter's op block list",
        "int8_method": "PTQ, NVIDIA ModelOpt INT8_DEFAULT_CFG (max), 256 train images, BN folded",
        "tolerances": PARITY_TOLERANCES,
        "val_images": len(val),
        "machine": machine_info(),
        "rows": rows,
        "fp32_ops_study": study,
        "op_study_model": first[1],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / "precision.json", json.dumps(result, indent=1) + "\n")
    plot(result, RESULTS / "precision.png")
    write_text_atomic(RESULTS / "precision.md", render(result, "precision.png"))
    print(render(result, "precision.png"))


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, row in result["rows"].items():
        marker = {"fp32": "o", "fp16": "s", "int8": "^"}[row["precision"]]
        ax.scatter(row["latency_ms"]["median_ms"], row["map50_95"], marker=marker, s=50)
        ax.annotate(key, (row["latency_ms"]["median_ms"], row["map50_95"]), fontsize=7)
    ax.set_xlabel("ONNX Runtime CPU latency, batch 1 (median ms)")
    ax.set_ylabel("mAP@.5:.95 (synthetic val)")
    ax.set_title(f"Embedded models at {result['imgsz']} px: fp32, fp16, int8 ONNX")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=120, format="png")
    plt.close(fig)


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
        "| model | precision | MB | median ms | mAP@.5:.95 | mAP@.5 | parity (tolerance) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"].values():
        parity = row["parity"]
        lines.append(
            f"| {row['model']} | {row['precision']} | {row['onnx_bytes'] / 1e6:.2f} | "
            f"{row['latency_ms']['median_ms']:.2f} | {row['map50_95']:.4f} | {row['map50']:.4f} | "
            f"{parity['max_abs_diff']:.2e} ({parity['tolerance']:g}) |"
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
