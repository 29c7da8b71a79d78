"""The built wheel installs one import package, ``yoloprune``, beside packages that own the
generic names our folders have (``kernels`` is a popular one on the registry)."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "yoloprune", "compiler", "graphs", "kernels")


def build_wheel(out: Path) -> Path:
    """Our wheel, built from a copy of the sources (the working tree stays clean)."""
    tree = out / "src"
    tree.mkdir()
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, tree / name)
    script = (
        "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(out)], cwd=tree, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out / done.stdout.strip().splitlines()[-1]


def other_kernels_wheel(out: Path) -> Path:
    """A minimal wheel of another project that owns the top-level package ``kernels``."""
    files = {
        "kernels/__init__.py": b"OWNER = 'other'\n",
        "other_kernels-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: other-kernels\n"
        b"Version: 1.0\n",
        "other_kernels-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("other_kernels-1.0.dist-info/RECORD,,")
    path = out / "other_kernels-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("other_kernels-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


@pytest.mark.slow
def test_the_wheel_installs_yoloprune_beside_another_kernels_package(tmp_path):
    ours = build_wheel(tmp_path)
    with zipfile.ZipFile(ours) as wheel:
        tops = {name.split("/", 1)[0] for name in wheel.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"yoloprune"}
    with zipfile.ZipFile(ours) as wheel:
        names = set(wheel.namelist())
    assert {"yoloprune/graphs/cfg/yolov5s.yaml", "yoloprune/__main__.py"} <= names
    assert "yoloprune/graphs/weights/yolov5n-shapes.pt" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    done = subprocess.run(
        [*install, str(ours), str(other_kernels_wheel(tmp_path))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    check = (
        "import importlib.util, kernels, yoloprune;"
        "assert kernels.OWNER == 'other', kernels.__file__;"
        "assert all(importlib.util.find_spec(f'yoloprune.{p}') for p in "
        "('compiler', 'graphs', 'kernels', 'graphs.cfg'));"
        "assert importlib.util.find_spec('graphs') is None;"
        "assert importlib.util.find_spec('compiler') is None;"
        "print(yoloprune.__version__)"
    )
    done = subprocess.run(
        [str(python), "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (venv / "bin" / "yoloprune").exists()  # the console script


def test_layers_import_downwards_only():
    """graphs/ imports neither compiler/ nor kernels/; kernels/ never imports compiler/."""
    import re

    forbidden = {"graphs": ("compiler", "kernels"), "kernels": ("compiler",)}
    for folder, above in forbidden.items():
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for layer in above:
                pattern = rf"^\s*(from|import) yoloprune\.{layer}\b"
                assert not re.search(pattern, text, re.M), f"{path} imports yoloprune.{layer}"
