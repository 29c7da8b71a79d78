"""INT8 sensitivity pass on the embedded models: which convs `--int8-max-map-drop D` keeps out
of INT8 (in the file's float precision, fp16 by default), what it costs each alone, the mAP of
the whole INT8 ONNX file before and after, and its ONNX Runtime CPU latency (batch 1,
interleaved) against the fully quantized and the fp32 files.

    python benchmarks/int8_sensitivity.py [--drop 0.002] [--runs 30]
Writes benchmarks/results/int8_sensitivity.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.precision import MODELS, measure, shapes  # noqa: E402
from yoloprune.compiler.evaluation.evaluate import evaluate, onnx_predictor, val_dataset  # noqa: E402
from yoloprune.compiler.export import export_onnx  # noqa: E402
from yoloprune.compiler.pipeline import prepare  # noqa: E402
from yoloprune.compiler.precision import lower_checked  # noqa: E402
from yoloprune.compiler.quantize import Calibration  # noqa: E402
from yoloprune.compiler.sensitivity import Sensitivity, keeper  # noqa: E402
from yoloprune.graphs.files import write_text_atomic  # noqa: E402
from yoloprune.kernels.ort import machine_info, machine_text, order_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "data" / "shapes")
    parser.add_argument("--drop", type=float, default=0.002)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument(
        "--models", nargs="+", type=Path, default=[p for p in MODELS if p.is_file()]
    )
    args = parser.parse_args()
    data_yaml, data = shapes(args.data)
    calibration = Calibration(data=data_yaml)
    sensitivity = Sensitivity(args.drop)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for checkpoint in args.models:
            prepared = prepare(str(checkpoint))
            imgsz, label = prepared.imgsz, checkpoint.stem
            val = val_dataset(data, imgsz)
            fp32 = export_onnx(prepared.model, Path(tmp) / f"{label}.onnx", imgsz)
            full, _, _ = lower_checked(prepared.model, fp32, imgsz, "int8", calibration=calibration)
            whole = Path(tmp) / f"{label}-all.int8.onnx"
            full.rename(whole)
            start = time.perf_counter()
            keep = keeper(sensitivity, data, imgsz, "raw", exclude=calibration.files)
            kept, parity, record = lower_checked(
                prepared.model, fp32, imgsz, "int8", calibration=calibration, keep_float=keep
            )
            seconds = round(time.perf_counter() - start, 1)
            files = {"fp32": fp32, "int8 (every conv)": whole, "int8 (sensitive kept)": kept}
            maps = {}
            for name, path in files.items():
                with onnx_predictor(path) as predict:
                    maps[name] = evaluate(predict, val, data.names, runtime="onnxruntime").map50_95
            timings = measure(files, imgsz, args.runs)
            rows[label] = {
                "sensitivity": record["sensitivity"],
                "seconds": seconds,
                "parity": parity.to_dict(),
                "files": {
                    name: {
                        "map50_95": maps[name],
                        "onnx_bytes": path.stat().st_size,
                        "latency_ms": timings[name].to_dict(),
                    }
                    for name, path in files.items()
                },
            }
            print(label, json.dumps(rows[label]["sensitivity"]), maps)
    result = {
        "models": [str(p) for p in args.models],
        "max_map_drop": args.drop,
        "val_images": len(val),
        "runtime": "onnxruntime (CPUExecutionProvider, ORT_ENABLE_ALL)",
        "batch": 1,
        "imgsz": imgsz,
        "order": order_text(False),
        "runs": args.runs,
        "calibration": "PTQ, max, 256 train images",
        "machine": machine_info(),
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / "int8_sensitivity.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(RESULTS / "int8_sensitivity.md", render(result))
    print(render(result))


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# INT8 sensitivity pass: sensitive convs kept out of INT8",
        "",
        f"`--int8-max-map-drop {result['max_map_drop']:g}` on the embedded models, "
        f"{result['calibration']}. Each conv's cost is measured alone on the pass's 64 "
        f"{next(iter(result['rows'].values()))['sensitivity'].get('split', 'val')} "
        f"images; the mAP below is each ONNX file's on all {result['val_images']} synthetic val "
        f"images. Latency: {result['runtime']}, batch {result['batch']}, {result['imgsz']} px, "
        f"{m['cores_available']} threads, median of {result['runs']} runs, {result['order']}; "
        f"{machine_text(m)}, onnxruntime {m['onnxruntime']}.",
        "",
    ]
    for label, row in result["rows"].items():
        s = row["sensitivity"]
        kept = s["kept_in_float"]
        lines += [
            f"## {label}",
            "",
            f"On the pass's images: float {s['map50_95_float']:.4f}, int8 "
            f"{s['map50_95_int8']:.4f}, after {s['map50_95_after']:.4f}; "
            f"{len(kept)} conv(s) kept in {s.get('kept_precision', 'fp32')} of "
            f"{s.get('convs_measured', '-')} measured, "
            f"{row['seconds']:.0f} s: "
            + (", ".join(f"{k['conv']} ({k['map_cost_alone']:+.4f})" for k in kept) or "none")
            + ".",
            "",
            "| file | mAP@.5:.95 (all val) | MB | median ms |",
            "|---|---:|---:|---:|",
        ]
        for name, entry in row["files"].items():
            lines.append(
                f"| {name} | {entry['map50_95']:.4f} | {entry['onnx_bytes'] / 1e6:.2f} | "
                f"{entry['latency_ms']['median_ms']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
