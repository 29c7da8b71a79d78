import os

import numpy as np
import pytest
import torch

from yoloprune.graphs.errors import RuntimeSetupError
from yoloprune.kernels.ort import OrtRunner, order_text, time_runners
from yoloprune.kernels.runner import RunnerStateError

SPIN_KEY = "session.intra_op.allow_spinning"


@pytest.fixture(scope="module")
def conv_onnx_file(tmp_path_factory):
    from yoloprune.kernels.latency_table import ConvShape, conv_onnx

    path = tmp_path_factory.mktemp("ort") / "conv.onnx"
    path.write_bytes(conv_onnx(ConvShape(8, 16, 3, 1, 1, 32, 32), 1).SerializeToString())
    return path


def test_spinning_is_off_unless_asked_for(conv_onnx_file):
    spinning, quiet = OrtRunner(conv_onnx_file, 1, spinning=True), OrtRunner(conv_onnx_file, 1)
    with spinning, quiet:
        assert spinning.session.get_session_options().get_session_config_entry(SPIN_KEY) == "1"
        assert quiet.session.get_session_options().get_session_config_entry(SPIN_KEY) == "0"
    assert spinning.session is None and not quiet.is_active  # released on exit
    assert spinning.timing_order() == {"block": 5, "rewarm": 2}
    assert quiet.timing_order() == {"block": 1, "rewarm": 0}
    assert "spinning on" in spinning.order_text() and "spinning off" in quiet.order_text()
    assert order_text(True) == spinning.order_text()


def test_time_runners_times_each_session_and_refuses_mixed_spinning(conv_onnx_file):
    torch.manual_seed(0)
    images = np.random.default_rng(0).random((1, 8, 32, 32), dtype=np.float32)
    runners = {"a": OrtRunner(conv_onnx_file, 1, True), "b": OrtRunner(conv_onnx_file, 1, True)}
    quiet = OrtRunner(conv_onnx_file, 1)
    with runners["a"], runners["b"], quiet:
        timings = time_runners(runners, images, runs=7, warmup=1)
        assert timings["a"].runs == timings["b"].runs == 7 and timings["a"].median_ms > 0
        with pytest.raises(ValueError, match="same spinning"):
            time_runners({"a": runners["a"], "b": quiet}, images, runs=2, warmup=0)


def test_a_file_onnx_runtime_cannot_load_fails_on_activate(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a model")
    runner = OrtRunner(path, 1)  # cheap: nothing is loaded yet
    with pytest.raises(RuntimeSetupError, match="ONNX Runtime cannot load it") as caught:
        runner.activate()
    assert "\n" not in str(caught.value) and not runner.is_active


def test_metadata_and_input_shape_need_an_active_session(conv_onnx_file):
    runner = OrtRunner(conv_onnx_file, 1)
    with pytest.raises(RunnerStateError, match="not active"):
        runner.metadata()
    with runner:
        assert runner.input_shape() == [1, 8, 32, 32]
        assert runner.metadata() == {}


def test_onnx_runtime_telemetry_is_off_unless_the_user_chose(monkeypatch):
    """ORT 1.32 starts 1DS telemetry at import (a $TMPDIR/.ses file, a database in ~/.cache):
    yoloprune sets ORT_DISABLE_TELEMETRY before importing it, and keeps a value the user set."""
    from yoloprune.kernels.ort import TELEMETRY_SWITCH, telemetry_off

    monkeypatch.delenv(TELEMETRY_SWITCH, raising=False)
    telemetry_off()
    assert os.environ[TELEMETRY_SWITCH] == "1"
    monkeypatch.setenv(TELEMETRY_SWITCH, "0")
    telemetry_off()
    assert os.environ[TELEMETRY_SWITCH] == "0"
