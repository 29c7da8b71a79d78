"""INT8 sensitivity pass: keep in float the convs whose quantization costs the most mAP, until
the INT8 model is within a stated mAP drop of the same model in float.

Each quantized conv is measured alone (only its input and weight quantizers on, every other
conv in float): its cost is the mAP@.5:.95 it loses on a fixed subset of the train split.
Then, most costly first, convs are taken out of quantization (their Q/DQ disappear from the
ONNX, so TensorRT and ONNX Runtime run them at the file's float precision: fp16 by default,
``--int8-float``; the costs themselves are measured with the fake-quantized PyTorch model,
whose float part is fp32) and the whole INT8 model is measured
again, until the drop is within the tolerance or a quarter of the convs are kept. Labels are
needed (mAP): it measures on labelled images of --data's *train* split, evenly spread, with
the INT8 calibration images left out (costs measured on the images the ranges were fitted to
read low), so the convs are never chosen on the images the report's val mAP is measured on. A
fine-tune or QAT has trained on them, which it cannot avoid. The file's ``quantization`` metadata
and the compile report list the kept convs with their costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from yoloprune.graphs.errors import PlanError

DEFAULT_IMAGES = 64  # train images each measurement runs on (evenly spread)
MAX_KEPT_SHARE = 0.25  # never keep more than this share of the quantized convs in float


@dataclass(frozen=True)
class Sensitivity:
    max_map_drop: float  # mAP@.5:.95 the INT8 model may lose against the same model in float
    images: int = DEFAULT_IMAGES

    def __post_init__(self) -> None:
        if not 0 <= self.max_map_drop <= 1:
            raise PlanError(f"--int8-max-map-drop {self.max_map_drop:g}: must be in [0, 1]")


def spread_indices(total: int, count: int) -> list[int]:
    """``count`` of ``range(total)``, evenly spread, in order (all of them when fewer)."""
    if total <= count:
        return list(range(total))
    return sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(count)})


def quantized_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """The convs with enabled INT8 quantizers, in network order."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
        and getattr(m, "input_quantizer", None) is not None
        and m.input_quantizer.is_enabled
    }


def _quantize(conv: nn.Conv2d, on: bool) -> None:
    for quantizer in (conv.input_quantizer, conv.weight_quantizer):
        quantizer.enable() if on else quantizer.disable()


def keep_sensitive(
    model: nn.Module,
    measure: Callable[[nn.Module], float],
    settings: Sensitivity,
    progress: bool = True,
) -> dict:
    """Take the most mAP-costly convs of the fake-quantized ``model`` out of quantization, in
    place, until ``measure(model)`` (mAP@.5:.95) is within ``settings.max_map_drop`` of the
    model in float; returns the record of what was measured and kept."""
    from tqdm import tqdm

    convs = quantized_convs(model)
    for conv in convs.values():
        _quantize(conv, False)
    in_float = measure(model)
    for conv in convs.values():
        _quantize(conv, True)
    int8 = measure(model)
    record = {
        "max_map_drop": settings.max_map_drop,
        "images": settings.images,
        "map50_95_float": in_float,
        "map50_95_int8": int8,
        "kept_in_float": [],
        "convs_measured": 0,
    }
    if in_float - int8 <= settings.max_map_drop:
        record.update(map50_95_after=int8, within_tolerance=True)
        return record
    costs = {}
    for conv in convs.values():
        _quantize(conv, False)
    for name, conv in tqdm(convs.items(), desc="int8 sensitivity", disable=not progress or None):
        _quantize(conv, True)
        costs[name] = in_float - measure(model)
        _quantize(conv, False)
    for conv in convs.values():
        _quantize(conv, True)
    after, limit = int8, max(1, int(len(convs) * MAX_KEPT_SHARE))
    for name in sorted(costs, key=costs.get, reverse=True)[:limit]:
        _quantize(convs[name], False)
        record["kept_in_float"].append({"conv": name, "map_cost_alone": costs[name]})
        after = measure(model)
        if in_float - after <= settings.max_map_drop:
            break
    record["map50_95_after"] = after
    record["within_tolerance"] = in_float - after <= settings.max_map_drop
    record["convs_measured"] = len(costs)
    return record


def map_measure(dataset, names, mode: str) -> Callable[[nn.Module], float]:
    """mAP@.5:.95 of a PyTorch model (as exported in ``mode``) on ``dataset``."""
    from yoloprune.compiler.evaluation.evaluate import evaluate, torch_predictor

    def measure(model: nn.Module) -> float:
        return evaluate(torch_predictor(model, mode), dataset, names, progress=False).map50_95

    return measure


def measured_files(data, count: int, exclude=()) -> tuple[list, int]:
    """The images the pass measures on: ``count`` of ``data``'s train split (a DataConfig),
    evenly spread, the ``exclude``d ones (the INT8 calibration images) left out, each with a
    label file (a one-line error otherwise: the pass measures mAP); and how many train images
    were left out. Reads no image."""
    from yoloprune.compiler.train.data import image_files, label_path

    if not data.train:
        raise PlanError(
            "--int8-max-map-drop measures mAP on the data YAML's 'train' split (the val split "
            "stays for the report's mAP); add one"
        )
    left_out = {Path(p).resolve() for p in exclude}
    train = image_files(data.train)
    pool = [p for p in train if p.resolve() not in left_out]
    if not pool:
        raise PlanError(
            f"{data.train[0]}: every train image calibrates INT8, none is left for the "
            "sensitivity pass to measure on; lower --calib-count or pass --calib-images DIR"
        )
    chosen = [pool[i] for i in spread_indices(len(pool), count)]
    unlabelled = [p for p in chosen if not label_path(p).is_file()]
    if len(unlabelled) == len(chosen):
        raise PlanError(
            f"{data.train[0]}: the sensitivity pass measures mAP on labelled train images and "
            f"none of the {len(chosen)} it picked has a label file (e.g. "
            f"{label_path(chosen[0])}); label the train split or drop --int8-max-map-drop"
        )
    return chosen, len(train) - len(pool)


def keeper(
    settings: Sensitivity, data, imgsz: int, mode: str, exclude=()
) -> Callable[[nn.Module], dict]:
    """The ``keep_float`` step of an INT8 export (compiler.quantize.to_int8): this pass on
    :func:`measured_files` of ``data``'s train split (``exclude``: the calibration images),
    measuring the model as exported in ``mode``."""
    from yoloprune.compiler.train.data import YoloDataset

    files, left_out = measured_files(data, settings.images, exclude)
    dataset = YoloDataset(tuple(files), data.nc, imgsz, augment=False)
    measure = map_measure(dataset, data.names, mode)
    where = {
        "split": "train",
        "images_measured": len(dataset.files),
        "calibration_images_left_out": left_out,
    }
    return lambda model: {**keep_sensitive(model, measure, settings), **where}
