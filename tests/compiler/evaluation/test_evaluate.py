import contextlib
import io

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from yoloprune.compiler.evaluation.evaluate import EvalSettings, coco_ground_truth, evaluate
from yoloprune.compiler.evaluation.nms import xywh_to_xyxy
from yoloprune.compiler.train.data import YoloDataset, label_path, read_data_yaml

GT = {  # image name -> (width, height, [(cls, xc, yc, w, h) normalised])
    "a.png": (80, 40, [(0, 0.25, 0.5, 0.2, 0.4), (1, 0.7, 0.5, 0.3, 0.6)]),
    "b.png": (64, 64, [(1, 0.5, 0.5, 0.5, 0.5)]),
    "c.png": (40, 80, [(0, 0.5, 0.3, 0.6, 0.2), (0, 0.5, 0.8, 0.4, 0.2)]),
}
IMGSZ = 64


@pytest.fixture
def dataset(tmp_path):
    for name, (w, h, labels) in GT.items():
        image = tmp_path / "images" / name
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (90, 90, 90)).save(image)
        path = label_path(image)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{c} {x} {y} {bw} {bh}\n" for c, x, y, bw, bh in labels))
    (tmp_path / "data.yaml").write_text(
        yaml.safe_dump({"val": "images", "names": ["p", "q"], "path": str(tmp_path)})
    )
    config = read_data_yaml(tmp_path / "data.yaml")
    return YoloDataset(config.val, config.nc, IMGSZ), config.names


def hand_made(dataset, jitter: float, drop: set):
    """Decoded outputs in letterboxed pixels: each GT box shifted by ``jitter`` of its width
    (IoU (1 - j) / (1 + j); avoid values that land exactly on a COCO threshold),
    score falling with its index, some GT boxes missing, plus one false positive per image."""
    rows = {}
    for k, (labels, (h, w)) in enumerate(zip(dataset.labels, dataset.shapes, strict=True)):
        ratio = min(IMGSZ / h, IMGSZ / w)
        left, top = round((IMGSZ - w * ratio) / 2 - 0.1), round((IMGSZ - h * ratio) / 2 - 0.1)
        out = []
        for j, (cls, xc, yc, bw, bh) in enumerate(labels.tolist()):
            if (k, j) in drop:
                continue
            row = [
                xc * w * ratio + left + jitter * bw * w * ratio,
                yc * h * ratio + top,
                bw * w * ratio,
                bh * h * ratio,
                0.9 - 0.1 * j,
                0.0,
                0.0,
            ]
            row[5 + int(cls)] = 1.0
            out.append(row)
        out.append([10.0, 10.0, 6.0, 6.0, 0.3, 1.0, 0.0])  # a false positive of class 0
        rows[k] = torch.tensor(out)
    return rows


def run(dataset, names, rows):
    order = iter(range(len(dataset)))

    def predict(images):
        outs = [rows[next(order)] for _ in range(len(images))]
        n = max(len(o) for o in outs)
        padded = torch.zeros(len(outs), n, 7)
        for i, o in enumerate(outs):
            padded[i, : len(o)] = o
        return padded

    return evaluate(predict, dataset, names, EvalSettings(batch=2), progress=False)


def pycocotools_directly(dataset, names, rows):
    """The same detections, converted by hand to original pixels, scored by pycocotools alone."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    detections = []
    for k, (h, w) in enumerate(dataset.shapes):
        ratio = min(IMGSZ / h, IMGSZ / w)
        left, top = round((IMGSZ - w * ratio) / 2 - 0.1), round((IMGSZ - h * ratio) / 2 - 0.1)
        for row in rows[k]:
            if row[4] <= 0.001 or (row[5:] * row[4]).max() <= 0.001:
                continue
            x0, y0, x1, y1 = xywh_to_xyxy(row[:4]).tolist()
            x0, x1 = [min(max((v - left) / ratio, 0), w) for v in (x0, x1)]
            y0, y1 = [min(max((v - top) / ratio, 0), h) for v in (y0, y1)]
            for cls in range(len(names)):
                score = float(row[4] * row[5 + cls])
                if score > 0.001:
                    detections.append(
                        {
                            "image_id": k,
                            "category_id": cls,
                            "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": score,
                        }
                    )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco_ground_truth(dataset, names)
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(detections), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0], ev.stats[1]


def test_perfect_predictions_score_one(dataset):
    data, names = dataset
    metrics = run(data, names, hand_made(data, 0.0, set()))
    # a false positive with a lower score than every true positive costs nothing
    assert metrics.map50_95 == pytest.approx(1.0) and metrics.map50 == pytest.approx(1.0)
    assert metrics.instances == 5 and metrics.images == 3


@pytest.mark.parametrize("jitter,drop", [(0.1, set()), (0.22, {(0, 1)}), (0.05, {(2, 0), (1, 0)})])
def test_evaluator_equals_pycocotools(dataset, jitter, drop):
    data, names = dataset
    rows = hand_made(data, jitter, drop)
    metrics = run(data, names, rows)
    expected = pycocotools_directly(data, names, rows)
    assert (metrics.map50_95, metrics.map50) == pytest.approx(expected, abs=1e-12)
    assert 0 < metrics.map50_95 < 1
    assert set(metrics.per_class) == {"p", "q"}
    assert np.mean(list(metrics.per_class.values())) == pytest.approx(metrics.map50_95, abs=1e-9)


def test_onnx_predictor_feeds_a_static_batch_in_chunks_and_releases_its_session(
    tmp_path, tiny_model
):
    from yoloprune.compiler.evaluation.evaluate import onnx_predictor
    from yoloprune.compiler.export import export_onnx
    from yoloprune.kernels.runner import RunnerStateError

    path = export_onnx(tiny_model, tmp_path / "m.onnx", 64)  # static batch 1
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with onnx_predictor(path, threads=1) as predict:
        assert predict.layout == "yolov5"
        out = predict(images)
        with torch.no_grad():
            want = tiny_model(images)[0]
    assert out.shape == (3, 252, 8)
    torch.testing.assert_close(out[..., 4:], want[..., 4:], rtol=0, atol=1e-4)
    with pytest.raises(RunnerStateError, match="not active"):
        predict(images)  # closed on leaving the with
    predict.close()  # closing again does nothing
