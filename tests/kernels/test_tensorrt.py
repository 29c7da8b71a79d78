"""TensorRT: the parts that need no TensorRT are tested everywhere; building and running
engines is tested only where TensorRT and a GPU are present (skipped here, with the reason)."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from yoloprune.graphs.errors import YoloPruneError
from yoloprune.kernels import tensorrt as trt_backend
from yoloprune.kernels.tensorrt import (
    BuildSettings,
    TensorRTUnavailable,
    calibration_batches,
    engine_metadata,
    triton_config,
    write_triton_repository,
)

TENSORS = [
    {"name": "images", "io": "input", "shape": [-1, 3, 64, 64], "dtype": "float32"},
    {"name": "output0", "io": "output", "shape": [-1, 252, 8], "dtype": "float32"},
]


def test_missing_tensorrt_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        trt_backend.tensorrt()
    ok, why = trt_backend.available()
    assert not ok and "--runtime torch" in why


def test_stub_package_is_recognised(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", type(sys)("tensorrt"))  # imports, but empty
    with pytest.raises(TensorRTUnavailable, match="stub"):
        trt_backend.tensorrt()


def test_build_settings_validation(tmp_path):
    with pytest.raises(YoloPruneError, match="precision"):
        BuildSettings(precision="fp8")
    with pytest.raises(YoloPruneError, match="min <= opt <= max"):
        BuildSettings(min_batch=4, opt_batch=2)
    with pytest.raises(YoloPruneError, match="calibration data"):
        BuildSettings(precision="int8")
    cache = tmp_path / "calib.cache"
    cache.write_bytes(b"cache")
    assert BuildSettings(precision="int8", calibration_cache=cache).precision == "int8"


def test_metadata_names_everything_a_deployment_needs():
    settings = BuildSettings(opt_batch=8, max_batch=16)
    meta = engine_metadata(
        [dict(t) for t in TENSORS],
        settings,
        "10.x",
        {"names": ["a", "b", "c"], "anchors": [[10, 13]], "pruning": {"macs_ratio": 0.5}},
    )
    image = meta["tensors"][0]
    assert image["strides"] == [3 * 64 * 64, 64 * 64, 64, 1]
    assert meta["precision"] == "fp16" and meta["tensorrt"] == "10.x"
    assert "114" in meta["preprocess"]["letterbox"] and meta["preprocess"]["color"] == "RGB"
    assert meta["names"] == ["a", "b", "c"] and meta["pruning"]["macs_ratio"] == 0.5
    assert meta["build"]["max_batch"] == 16
    json.dumps(meta)  # plain data


def test_triton_repository_layout(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan-bytes")
    meta_path = tmp_path / "model.json"
    meta = engine_metadata([dict(t) for t in TENSORS], BuildSettings(max_batch=8), "10.x")
    meta_path.write_text(json.dumps(meta))
    folder = write_triton_repository(engine, meta_path, tmp_path / "repo", "yolo")
    assert (folder / "1" / "model.plan").read_bytes() == b"plan-bytes"
    config = (folder / "config.pbtxt").read_text()
    assert config == triton_config("yolo", meta, 8)
    assert 'platform: "tensorrt_plan"' in config and "max_batch_size: 8" in config
    assert "dims: [ 3, 64, 64 ]" in config and "dims: [ 252, 8 ]" in config
    assert config.count("TYPE_FP32") == 2


def test_calibration_batches_are_letterboxed_and_padded(tmp_path):
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 80), (64, 64), (100, 50)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    batches = list(calibration_batches(tmp_path, 64, batch=2, count=5))
    assert len(batches) == 2
    assert all(b.shape == (2, 3, 64, 64) and b.dtype == np.float32 for b in batches)
    assert batches[0].min() >= 0.0 and batches[0].max() <= 1.0
    # the 40x80 image is letterboxed: the top rows are padding (114 / 255)
    assert np.allclose(batches[0][0, :, 0, :], 114 / 255)
    np.testing.assert_array_equal(batches[1][0], batches[1][1])  # last batch padded by repeat
    with pytest.raises(YoloPruneError, match="no images"):
        list(calibration_batches(tmp_path / "empty", 64, 2, 1))


needs_tensorrt = pytest.mark.skipif(
    not trt_backend.available()[0], reason=f"TensorRT unavailable: {trt_backend.available()[1]}"
)


@pytest.mark.gpu
@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_onnxruntime(tmp_path, tiny_model, precision):
    from yoloprune.compiler.export import export_onnx
    from yoloprune.kernels.ort import OrtRunner
    from yoloprune.kernels.tensorrt import EngineRunner, build_engine

    onnx_path = export_onnx(tiny_model, tmp_path / "m.onnx", 64, dynamic=True)
    settings = BuildSettings(
        precision=precision, max_batch=4, opt_batch=2, timing_cache=tmp_path / "timing.cache"
    )
    built = build_engine(onnx_path, tmp_path / "m.engine", settings, {"names": ["a", "b", "c"]})
    assert (tmp_path / "timing.cache").stat().st_size > 0
    meta = json.loads(built.metadata.read_text())
    assert meta["precision"] == precision and meta["names"] == ["a", "b", "c"]
    runner = EngineRunner(built.engine)
    runner.set_batch(2)
    images = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    import torch

    output = runner.run(torch.from_numpy(images).cuda())
    runner.sync()  # the engine runs on its own stream
    got = output.float().cpu().numpy()
    want = OrtRunner(onnx_path).run(images)[0]
    scale = np.array([64, 64, 64, 64] + [1] * (want.shape[-1] - 4), dtype=np.float32)
    atol = 1e-3 if precision == "fp32" else 2e-2
    np.testing.assert_allclose(got / scale, want / scale, atol=atol)
