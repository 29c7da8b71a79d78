"""Evaluation pass: inference + NMS + COCO metrics (pycocotools), on PyTorch or ONNX Runtime.

val.py's conventions: conf 0.001, IoU 0.6, at most 300 detections per image, multi-label,
boxes scaled back to the original image before matching. mAP@.5:.95 and mAP@.5 come from
pycocotools' COCOeval; per-class AP@.5:.95 from its precision table.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from yoloprune.compiler.evaluation.nms import detections as to_detections
from yoloprune.compiler.train.data import DataConfig, YoloDataset, loader


@dataclass(frozen=True)
class EvalSettings:
    conf: float = 0.001
    iou: float = 0.6
    max_det: int = 300
    batch: int = 16


@dataclass(frozen=True)
class Predictor:
    """Maps a batch of letterboxed images to output0 in ``layout`` (see nms.detections).

    One that holds a runtime (:func:`onnx_predictor`'s session) releases it in :meth:`close`;
    use it as ``with onnx_predictor(path) as predict:``. Closing twice is harmless; predicting
    after closing raises."""

    run: Callable[[torch.Tensor], torch.Tensor]
    layout: str = "yolov5"
    release: Callable[[], None] | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(images)

    def close(self) -> None:
        if self.release is not None:
            self.release()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class Metrics:
    map50_95: float
    map50: float
    per_class: dict
    images: int
    instances: int
    runtime: str
    seconds: float
    data_check: str

    def to_dict(self) -> dict:
        return asdict(self)


def coco_ground_truth(dataset: YoloDataset, names) -> dict:
    """Labels of every image as a COCO dict, boxes in original-image pixels."""
    images, annotations = [], []
    for image_id, (labels, (h, w)) in enumerate(zip(dataset.labels, dataset.shapes, strict=True)):
        images.append({"id": image_id, "width": w, "height": h, "file_name": str(image_id)})
        for cls, xc, yc, bw, bh in labels.tolist():
            box = [(xc - bw / 2) * w, (yc - bh / 2) * h, bw * w, bh * h]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cls),
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i, "name": n} for i, n in enumerate(names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_metrics(ground_truth: dict, detections: list[dict]) -> tuple[float, float, dict]:
    """(mAP@.5:.95, mAP@.5, {class name: AP@.5:.95}) from pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    if not detections or not ground_truth["annotations"]:
        return 0.0, 0.0, {n: 0.0 for n in names.values()}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"]  # [iou, recall, class, area, maxdets]
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        per_class[names[cat_id]] = float(values.mean()) if values.size else 0.0
    return float(evaluator.stats[0]), float(evaluator.stats[1]), per_class


def _to_original(det: torch.Tensor, meta: dict) -> torch.Tensor:
    """Undo the letterbox: boxes back to original-image pixels, clipped."""
    det = det.clone()
    left, top = meta["pad"]
    det[:, [0, 2]] = (det[:, [0, 2]] - left) / meta["ratio"]
    det[:, [1, 3]] = (det[:, [1, 3]] - top) / meta["ratio"]
    h, w = meta["shape"]
    det[:, [0, 2]] = det[:, [0, 2]].clamp(0, w)
    det[:, [1, 3]] = det[:, [1, 3]].clamp(0, h)
    return det


def evaluate(
    predict: Callable[[torch.Tensor], torch.Tensor],
    dataset: YoloDataset,
    names,
    settings: EvalSettings | None = None,
    runtime: str = "pytorch",
    progress: bool = True,
) -> Metrics:
    """``predict`` maps a batch of letterboxed images to output0: a :class:`Predictor` names its
    layout; a plain function gives yolov5's decoded (B, N, 5+nc)."""
    from tqdm import tqdm

    settings = settings or EvalSettings()
    layout = predict.layout if isinstance(predict, Predictor) else "yolov5"
    detections, image_id, start = [], 0, time.perf_counter()
    batches = loader(dataset, settings.batch)
    for images, _, metas in tqdm(
        batches, desc=f"eval ({runtime})", leave=False, disable=not progress or None
    ):
        with torch.no_grad():
            outputs = predict(images)
        results = to_detections(
            outputs.float(), layout, settings.conf, settings.iou, settings.max_det
        )
        for det, meta in zip(results, metas, strict=True):
            det = _to_original(det, meta)
            for x0, y0, x1, y1, score, cls in det.tolist():
                detections.append(
                    {
                        "image_id": image_id,
                        "category_id": int(cls),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": score,
                    }
                )
            image_id += 1
    ground_truth = coco_ground_truth(dataset, names)
    map50_95, map50, per_class = coco_metrics(ground_truth, detections)
    return Metrics(
        map50_95,
        map50,
        per_class,
        len(dataset),
        len(ground_truth["annotations"]),
        runtime,
        round(time.perf_counter() - start, 2),
        dataset.check.summary(),
    )


def torch_predictor(model: torch.nn.Module, mode: str | None = None) -> Predictor:
    """The PyTorch model as it would be exported in ``mode`` (default: the model's own, so
    YOLO26 is evaluated end to end, as deployed)."""
    from yoloprune.compiler.export import deployed_model, export_mode, output_layout
    from yoloprune.kernels.torch_runtime import memory_layout

    mode = export_mode(model, mode)
    deployed = deployed_model(model, mode, runtime_forms=False)
    device = next(model.parameters()).device
    layout = memory_layout(deployed)
    deployed.to(device).to(memory_format=layout)

    def predict(images: torch.Tensor) -> torch.Tensor:
        return deployed(images.to(device).contiguous(memory_format=layout)).cpu()

    return Predictor(predict, output_layout(model, mode))


def onnx_predictor(path: Path, threads: int | None = None) -> Predictor:
    """The deployed artifact itself, read in the layout its metadata records (yoloprune's
    exports; yolov5's own when absent); a static-batch file is fed a batch at a time. The
    ONNX Runtime session is open until the predictor is closed (use it in a ``with``)."""
    from yoloprune.kernels.ort import OrtRunner

    runner = OrtRunner(path, threads).activate()
    try:
        layout = runner.metadata().get("layout", "yolov5")
        static_batch = runner.input_shape()[0]
    except BaseException:
        runner.deactivate()
        raise

    def predict(images: torch.Tensor) -> torch.Tensor:
        array = images.numpy()
        if isinstance(static_batch, int):
            chunks = [
                runner.infer(array[i : i + static_batch])[0]
                for i in range(0, len(array), static_batch)
            ]
            return torch.from_numpy(np.concatenate(chunks))
        return torch.from_numpy(runner.infer(array)[0])

    return Predictor(predict, layout, release=runner.deactivate)


def val_dataset(config: DataConfig, imgsz: int) -> YoloDataset:
    return YoloDataset(config.val, config.nc, imgsz, augment=False)
