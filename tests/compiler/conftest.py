"""Fixtures the compile-level tests share: a tiny six-class YOLOv5 and a small shapes set."""

from pathlib import Path

import pytest
import yaml

from tests.helpers import tiny_cfg


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    """16 training and 8 val images of the synthetic shapes at 64 px (one set per module)."""
    from yoloprune.compiler.train.synthetic import SyntheticSpec, generate

    root = tmp_path_factory.mktemp("cli-shapes") / "shapes"
    return generate(root, SyntheticSpec(train=16, val=8, imgsz=64), progress=False)


@pytest.fixture
def tiny6_yaml(tmp_path) -> Path:
    """The tiny YOLOv5 with the shapes set's six classes, as a MODEL file."""
    cfg = tiny_cfg()
    cfg["nc"] = 6
    path = tmp_path / "tiny6.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
