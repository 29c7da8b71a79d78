from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import V50_TINY, randomized, tiny_cfg
from yoloprune.graphs.yolov5 import DetectionModel


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model() -> DetectionModel:
    """The tiny YOLOv5 (v6/v7 blocks), BN randomised and calibrated on noise."""
    return randomized(DetectionModel(tiny_cfg()).eval(), seed=0)


@pytest.fixture(scope="session")
def tiny_v50_model() -> DetectionModel:
    """A tiny v5.0-style YOLOv5: Focus, BottleneckCSP, SPP and LeakyReLU."""
    return randomized(DetectionModel(V50_TINY).eval(), seed=1)


@pytest.fixture
def tiny_yaml(tmp_path) -> Path:
    """The tiny YOLOv5's YAML, as a MODEL file for the CLI."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg()))
    return path
