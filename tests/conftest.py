import os
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import V50_TINY, randomized, tiny_cfg
from yoloprune.graphs.yolov5 import DetectionModel


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core this process may run on (its CPU affinity, as ONNX
    Runtime's default threads count them). pytest-xdist's own count prefers psutil's physical
    cores of the host, which in a container limited to two CPUs can be dozens. Where
    PYTEST_XDIST_AUTO_NUM_WORKERS is set, pytest-xdist reads it."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    from yoloprune.kernels.ort import default_threads

    return default_threads()


def pytest_configure(config):
    """A pytest-xdist worker (make test runs one per core) computes on its share of the cores,
    so the workers do not oversubscribe them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        from yoloprune.kernels.ort import default_threads

        torch.set_num_threads(max(1, default_threads() // workers))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)


REAL_CPU_BF16 = []  # the real finetune.cpu_computes_bf16, for the test of it


@pytest.fixture(scope="session", autouse=True)
def _fp32_training():
    """Fine-tunes run in fp32 on every machine, module-scoped fixtures' too: the default
    autocasts to bf16 only on CPUs with bf16 instructions (tests of that rule patch it)."""
    from yoloprune.compiler.train import finetune

    patch = pytest.MonkeyPatch()
    REAL_CPU_BF16.append(finetune.cpu_computes_bf16)
    patch.setattr(finetune, "cpu_computes_bf16", lambda: False)
    yield
    patch.undo()


REAL_TIMING = []  # the real pipeline.alignment_measure, for the tests of it


def tied_timing(plans: dict) -> dict:
    """Every candidate model takes the same time."""
    return dict.fromkeys(plans, 1.0)


@pytest.fixture(scope="session", autouse=True)
def _measurement_cache(tmp_path_factory):
    """Latency tables go to a fresh cache (never the user's), and ``--round-to auto`` reads a
    stand-in alignment profile there (chain times exactly proportional to MACs) and times every
    candidate model alike, so every candidate ties and the finest (8) is chosen, as every test
    written before auto expects. Tests of the choice itself give their own tables and timings
    (tests/compiler/test_alignment.py)."""
    from yoloprune.compiler import pipeline
    from yoloprune.kernels import latency_table
    from yoloprune.kernels.alignment import BANDS, ChainTable
    from yoloprune.kernels.ort import default_threads

    cache = tmp_path_factory.mktemp("yoloprune-cache")
    before = latency_table.DEFAULT_CACHE, os.environ.get("YOLOPRUNE_CACHE")
    latency_table.DEFAULT_CACHE = cache
    os.environ["YOLOPRUNE_CACHE"] = str(cache)  # CLI tests in subprocesses
    for threads in {1, default_threads()}:
        table = latency_table.open_table("ort", threads=threads, kind=ChainTable)
        table.entries = {s.key(): s.macs() * 1e-9 for band in BANDS for s in band.shapes()}
        table.save()
    patch = pytest.MonkeyPatch()
    REAL_TIMING.append(pipeline.alignment_measure)
    patch.setattr(pipeline, "alignment_measure", lambda prepared, settings: tied_timing)
    yield cache
    patch.undo()
    latency_table.DEFAULT_CACHE = before[0]
    if before[1] is None:
        os.environ.pop("YOLOPRUNE_CACHE", None)
    else:
        os.environ["YOLOPRUNE_CACHE"] = before[1]


@pytest.fixture(scope="session")
def tiny_model() -> DetectionModel:
    """The tiny YOLOv5 (v6/v7 blocks), BN randomised and calibrated on noise."""
    return randomized(seeded_model(tiny_cfg(), seed=0), seed=0)


@pytest.fixture(scope="session")
def tiny_v50_model() -> DetectionModel:
    """A tiny v5.0-style YOLOv5: Focus, BottleneckCSP, SPP and LeakyReLU."""
    return randomized(seeded_model(V50_TINY, seed=1), seed=1)


def seeded_model(cfg: dict, seed: int) -> DetectionModel:
    """A model built from ``cfg`` with its conv weights drawn from ``seed``: a session fixture
    is built before the per-test seed (_deterministic_threads), when torch's generator still
    holds the process's random start, so its weights would differ from run to run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DetectionModel(cfg).eval()


@pytest.fixture
def tiny_yaml(tmp_path) -> Path:
    """The tiny YOLOv5's YAML, as a MODEL file for the CLI."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg()))
    return path
