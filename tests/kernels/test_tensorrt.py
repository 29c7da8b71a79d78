"""TensorRT: the parts that need no TensorRT are tested everywhere; building and running
engines is tested only where TensorRT and a GPU are present (skipped here, with the reason)."""

import json
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from yoloprune.graphs.errors import YoloPruneError
from yoloprune.kernels import tensorrt as trt_backend
from yoloprune.kernels.tensorrt import (
    BuildSettings,
    TensorRTUnavailable,
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


def test_build_settings_validation():
    with pytest.raises(YoloPruneError, match="min <= opt <= max"):
        BuildSettings(min_batch=4, opt_batch=2)
    with pytest.raises(YoloPruneError, match="positive integers"):
        BuildSettings(max_batch=0)
    assert BuildSettings().profile() == (1, 1, 32)
    assert BuildSettings(min_batch=4).profile() == (4, 4, 32)  # opt follows the given floor
    assert BuildSettings(max_batch=8, opt_batch=8).profile() == (1, 8, 8)
    with pytest.raises(TypeError):  # precision is the ONNX file's own, never a builder flag
        BuildSettings(precision="fp16")


def test_metadata_names_everything_a_deployment_needs():
    settings = BuildSettings(opt_batch=8, max_batch=16)
    properties = {"layout": "anchor_free", "precision": "fp16", "export_mode": "raw"}
    meta = engine_metadata(
        [dict(t) for t in TENSORS],
        settings,
        "10.x",
        properties,
        {"names": ["a", "b", "c"], "anchors": [[10, 13]], "pruning": {"macs_ratio": 0.5}},
    )
    image = meta["tensors"][0]
    assert image["strides"] == [3 * 64 * 64, 64 * 64, 64, 1]
    assert meta["precision"] == "fp16" and meta["tensorrt"] == "10.x"
    assert meta["network"] == "strongly typed"
    assert "114" in meta["preprocess"]["letterbox"] and meta["preprocess"]["color"] == "RGB"
    assert meta["names"] == ["a", "b", "c"] and meta["pruning"]["macs_ratio"] == 0.5
    assert meta["build"]["max_batch"] == 16 and meta["build"]["batch_profile"] == [1, 8, 16]
    assert meta["output"]["layout"] == "anchor_free"
    assert meta["output"]["output0"].startswith("(batch, 4 + nc, anchors)")
    assert "objectness" in meta["output"]["output0"]  # "no objectness", said outright
    json.dumps(meta)  # plain data


@pytest.mark.parametrize(
    ("layout", "start"),
    [
        ("yolov5", "(batch, anchors, 5 + nc)"),
        ("anchor_free", "(batch, 4 + nc, anchors)"),
        ("end2end", "(batch, max_det, 6)"),
        (None, "not recorded"),
    ],
)
def test_metadata_output_follows_the_exported_layout(layout, start):
    properties = {} if layout is None else {"layout": layout}
    meta = engine_metadata([dict(t) for t in TENSORS], BuildSettings(), "11.4", properties)
    assert meta["output"]["output0"].startswith(start)
    assert meta["precision"] == "fp32"  # an ONNX that states none is fp32


def test_triton_repository_layout(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan-bytes")
    meta_path = tmp_path / "model.json"
    meta = engine_metadata([dict(t) for t in TENSORS], BuildSettings(max_batch=8), "10.x")
    meta_path.write_text(json.dumps(meta))
    folder = write_triton_repository(engine, meta_path, tmp_path / "repo", "yolo")
    assert (folder / "1" / "model.plan").read_bytes() == b"plan-bytes"
    config = (folder / "config.pbtxt").read_text()
    assert config == triton_config("yolo", meta)
    assert 'platform: "tensorrt_plan"' in config and "max_batch_size: 8" in config
    assert "dims: [ 3, 64, 64 ]" in config and "dims: [ 252, 8 ]" in config
    assert config.count("TYPE_FP32") == 2


def test_triton_config_of_a_fixed_batch_engine_keeps_the_batch_axis(tmp_path):
    """compile's default export has a static batch of 1: no batching, full dims."""
    fixed = [dict(t, shape=[1, *t["shape"][1:]]) for t in TENSORS]
    meta = engine_metadata(fixed, BuildSettings(), "11.4")
    config = triton_config("yolo", meta)
    assert "max_batch_size: 0" in config
    assert "dims: [ 1, 3, 64, 64 ]" in config and "dims: [ 1, 252, 8 ]" in config
    broken = {**meta, "tensors": [{"io": "input", "shape": [-1, 3, 64, 64]}], "build": {}}
    (tmp_path / "m.json").write_text(json.dumps(broken))
    with pytest.raises(KeyError):
        write_triton_repository(tmp_path / "m.engine", tmp_path / "m.json", tmp_path / "r", "y")
    assert not (tmp_path / "r").exists()  # nothing written before the config is known


needs_tensorrt = pytest.mark.skipif(
    not trt_backend.available()[0], reason=f"TensorRT unavailable: {trt_backend.available()[1]}"
)


@pytest.mark.gpu
@needs_tensorrt
def test_engine_matches_onnxruntime(tmp_path, tiny_model):
    from yoloprune.compiler.export import export_onnx
    from yoloprune.kernels.ort import OrtRunner
    from yoloprune.kernels.tensorrt import EngineRunner, build_engine

    onnx_path = export_onnx(tiny_model, tmp_path / "m.onnx", 64, dynamic=True)
    settings = BuildSettings(max_batch=4, opt_batch=2, timing_cache=tmp_path / "timing.cache")
    built = build_engine(onnx_path, tmp_path / "m.engine", settings, {"names": ["a", "b", "c"]})
    assert (tmp_path / "timing.cache").stat().st_size > 0
    meta = json.loads(built.metadata.read_text())
    assert meta["precision"] == "fp32" and meta["names"] == ["a", "b", "c"]
    images = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    import torch

    with EngineRunner(built.engine, batch=2) as runner:
        assert runner.describe()["tensorrt"] == trt_backend.available()[1]
        output = runner.infer(torch.from_numpy(images).cuda())
        runner.sync()  # the engine runs on its own stream
        got = output.float().cpu().numpy()
    with OrtRunner(onnx_path) as ort_runner:
        want = ort_runner.infer(images)[0]
    scale = np.array([64, 64, 64, 64] + [1] * (want.shape[-1] - 4), dtype=np.float32)
    np.testing.assert_allclose(got / scale, want / scale, atol=1e-3)


# Stand-ins for the tensorrt module: each exposes only the Python names of one TensorRT major
# version (11.x: no BuilderFlag.FP16/INT8, no INT8 calibrator, no calibration profile) and
# records what the builder was asked for. This checks yoloprune's calls against both APIs; it
# is not a TensorRT run.


class _Recorder:
    def __init__(self):
        self.network_flags, self.builder_flags, self.profiles = None, [], []
        self.foreign_cache = False  # set_timing_cache refuses the cache (another GPU)


def _stand_in(version: str, strongly_typed_enum: bool = True):
    import types

    import onnx

    major = int(version.split(".")[0])
    record = _Recorder()
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.record = record

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    class Tensor:
        def __init__(self, value_info, is_input):
            dims = value_info.type.tensor_type.shape.dim
            self.name = value_info.name
            self.shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
            self.is_input = is_input

    class Network:
        def __init__(self, flags):
            self.flags, self.tensors = flags, []

        def get_input(self, index):
            return [t for t in self.tensors if t.is_input][index]

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            graph = onnx.load(path).graph
            record.parsed = graph
            self.network.tensors = [Tensor(v, True) for v in graph.input]
            self.network.tensors += [Tensor(v, False) for v in graph.output]
            return True

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (low, opt, high)

    class TimingCache:
        def serialize(self):
            return b"timing-cache"

    class Config:
        __slots__ = ("cache",) + (("int8_calibrator",) if major < 11 else ())

        def set_memory_pool_limit(self, pool, size):
            assert pool == "workspace" and size > 0

        def add_optimization_profile(self, profile):
            record.profiles.append(profile.shapes)

        def create_timing_cache(self, data):
            return TimingCache()

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return not record.foreign_cache

        def get_timing_cache(self):
            return self.cache

        if major < 11:

            def set_flag(self, flag):
                record.builder_flags.append(flag)

            def set_calibration_profile(self, profile):
                record.builder_flags.append("calibration profile")

    class Engine:
        def __init__(self, network):
            self.tensors = network.tensors
            self.num_io_tensors = len(self.tensors)
            self.profile = record.profiles[0] if record.profiles else {}

        def _tensor(self, name):
            return next(t for t in self.tensors if t.name == name)

        def get_tensor_name(self, index):
            return self.tensors[index].name

        def get_tensor_mode(self, name):
            return "input" if self._tensor(name).is_input else "output"

        def get_tensor_shape(self, name):
            return self._tensor(name).shape

        def get_tensor_dtype(self, name):
            return "float"

        def get_tensor_format_desc(self, name):
            return "Row major linear FP32 format"

        def get_tensor_profile_shape(self, name, index):
            shape = self._tensor(name).shape
            return self.profile.get(name, (shape, shape, shape))

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            record.network_flags = flags
            self.network = Network(flags)
            return self.network

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            self.built = Engine(network)
            return b"serialized-engine"

    builder_holder = {}

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            assert data == b"serialized-engine"
            return builder_holder["builder"].built

    def make_builder(logger):
        builder_holder["builder"] = Builder(logger)
        return builder_holder["builder"]

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, make_builder, OnnxParser, Runtime
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.nptype = lambda dtype: np.float32
    if strongly_typed_enum:
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    if major < 11:
        trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8", TF32="TF32")
        trt.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (), {})
    else:
        trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", DEBUG="DEBUG")
    return trt


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model, tmp_path_factory):
    from yoloprune.compiler.export import export_onnx

    folder = tmp_path_factory.mktemp("onnx")
    static = export_onnx(tiny_model, folder / "static.onnx", 64)
    dynamic = export_onnx(tiny_model, folder / "dynamic.onnx", 64, dynamic=True)
    return {"static": static, "dynamic": dynamic}


@pytest.mark.parametrize(
    ("version", "enum", "flags"),
    [("10.13.3", True, 1 << 5), ("11.4.0", True, 1 << 5), ("11.4.0", False, 0)],
)
@pytest.mark.parametrize("batch", ["static", "dynamic"])
def test_builder_runs_on_the_tensorrt_10_and_11_python_apis(
    monkeypatch, tmp_path, tiny_onnx, version, enum, flags, batch
):
    """Strongly typed network, no precision builder flag, no calibrator, a batch profile only
    where the batch axis is dynamic; the metadata's layout and precision are the ONNX's."""
    from yoloprune.kernels.tensorrt import build_engine

    trt = _stand_in(version, enum)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    built = build_engine(tiny_onnx[batch], tmp_path / "m.engine", BuildSettings())
    assert trt.record.network_flags == flags
    assert trt.record.builder_flags == []  # precision comes from the ONNX, never a flag
    if batch == "dynamic":
        assert trt.record.profiles == [
            {"images": ((1, 3, 64, 64), (1, 3, 64, 64), (32, 3, 64, 64))}
        ]
    else:
        assert trt.record.profiles == []
    assert built.engine.read_bytes() == b"serialized-engine"
    meta = json.loads(built.metadata.read_text())
    assert meta["tensorrt"] == version and meta["precision"] == "fp32"
    assert meta["output"]["layout"] == "yolov5" and meta["output"]["export_mode"] == "raw"
    image = meta["tensors"][0]
    assert image["name"] == "images" and image["shape"][1:] == [3, 64, 64]


def test_a_foreign_timing_cache_and_clobbering_paths_are_refused_with_nothing_written(
    monkeypatch, tmp_path, tiny_onnx
):
    from yoloprune.kernels.tensorrt import build_engine

    trt = _stand_in("11.4.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    trt.record.foreign_cache = True
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from another GPU")
    settings = BuildSettings(timing_cache=cache)
    with pytest.raises(YoloPruneError, match="made for another GPU or TensorRT version"):
        build_engine(tiny_onnx["static"], tmp_path / "m.engine", settings)
    assert cache.read_bytes() == b"from another GPU" and not (tmp_path / "m.engine").exists()
    trt.record.foreign_cache = False
    source = tmp_path / "copy.onnx"
    source.write_bytes(tiny_onnx["static"].read_bytes())
    for out in (source, tmp_path / "m.json"):  # the ONNX itself; metadata onto the engine
        with pytest.raises(YoloPruneError, match=r"give a path ending in \.engine"):
            build_engine(source, out)
    assert source.read_bytes() == tiny_onnx["static"].read_bytes()
    built = build_engine(source, tmp_path / "copy.engine")
    assert built.metadata == tmp_path / "copy.json"


def test_a_static_batch_refuses_batch_bounds_it_cannot_honour(monkeypatch, tmp_path, tiny_onnx):
    from yoloprune.kernels.tensorrt import build_engine

    monkeypatch.setitem(sys.modules, "tensorrt", _stand_in("11.4.0"))
    with pytest.raises(YoloPruneError, match=r"fixed at 1.*--dynamic"):
        build_engine(tiny_onnx["static"], tmp_path / "m.engine", BuildSettings(max_batch=8))
    assert not (tmp_path / "m.engine").exists()


def test_tensorrt_without_strongly_typed_networks_is_refused(monkeypatch, tmp_path, tiny_onnx):
    from yoloprune.kernels.tensorrt import build_engine

    monkeypatch.setitem(sys.modules, "tensorrt", _stand_in("8.6.1", strongly_typed_enum=False))
    with pytest.raises(TensorRTUnavailable, match=r"10\.x or 11\.x"):
        build_engine(tiny_onnx["static"], tmp_path / "m.engine")


def test_build_picks_the_onnx_file_of_the_asked_precision(tmp_path, tiny_onnx):
    import onnx

    from yoloprune.compiler.cli import onnx_at_precision

    fp32 = tmp_path / "m-pruned.onnx"
    fp32.write_bytes(tiny_onnx["static"].read_bytes())
    assert onnx_at_precision(fp32, None) == fp32 == onnx_at_precision(fp32, "fp32")
    with pytest.raises(
        YoloPruneError, match=r"no fp16 file m-pruned\.fp16\.onnx.*--precision fp16"
    ):
        onnx_at_precision(fp32, "fp16")
    proto = onnx.load(str(fp32))
    for prop in proto.metadata_props:
        if prop.key == "precision":
            prop.value = "fp16"
    if not any(p.key == "precision" for p in proto.metadata_props):
        proto.metadata_props.add(key="precision", value="fp16")
    onnx.save(proto, str(tmp_path / "m-pruned.fp16.onnx"))
    assert onnx_at_precision(fp32, "fp16") == tmp_path / "m-pruned.fp16.onnx"
    assert onnx_at_precision(tmp_path / "m-pruned.fp16.onnx", "fp32") == fp32


class _FakeEngineRunner:
    """Stands in for EngineRunner (no GPU): records the engine it was given and its runs."""

    runs: ClassVar[list] = []

    def __init__(self, engine_path, batch):
        import torch

        self.engine = Path(engine_path).read_bytes()
        self.inputs, self.buffers = ["x"], {"x": torch.zeros(batch, 4)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def infer(self, images=None):
        assert images is None and self.buffers["x"].abs().sum() > 0  # random input, not zeros
        _FakeEngineRunner.runs.append(self.engine)

    def sync(self):
        pass

    def clock(self):
        return None


@pytest.mark.parametrize("version", ["10.13.3", "11.4.0"])
def test_alignment_profile_on_tensorrt_builds_int8_chains(monkeypatch, tmp_path, version):
    """--latency-runtime tensorrt with --precision int8: each profiled chain is built as a
    strongly typed engine from an explicit Q/DQ ONNX (no precision flag, no calibrator) and
    timed; the table is keyed by GPU, TensorRT version and precision. API check, not a run."""
    import torch

    from yoloprune.kernels.alignment import ChainShape, ChainTable
    from yoloprune.kernels.latency_table import open_table

    trt = _stand_in(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_backend, "available", lambda: (True, version))
    monkeypatch.setattr(trt_backend, "EngineRunner", _FakeEngineRunner)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Stand-in GPU")
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: synced.append(True))
    _FakeEngineRunner.runs = []
    path = tmp_path / "profile.json"
    table = open_table("tensorrt", precision="int8", path=path, kind=ChainTable)
    assert table.key.__dict__ == {
        "runtime": "tensorrt",
        "device": f"Stand-in GPU TensorRT {version}",
        "precision": "int8",
        "batch": 1,
        "threads": 1,
        "spinning": None,
    }
    shape = ChainShape(32, 8)
    table.ensure([shape], progress=False)
    assert table[shape] > 0 and table.measured == 1
    assert trt.record.network_flags == 1 << 5 and trt.record.builder_flags == []
    ops = [n.op_type for n in trt.record.parsed.node]
    assert ops.count("Conv") == 4 and ops.count("QuantizeLinear") == 4
    assert ops.count("DequantizeLinear") == 8  # each conv's input and its weight
    assert set(_FakeEngineRunner.runs) == {b"serialized-engine"} and synced
    # 5 warm-up and 30 timed samples, each of RUNS_PER_SAMPLE back-to-back executions
    assert len(_FakeEngineRunner.runs) == 35 * trt_backend.RUNS_PER_SAMPLE
