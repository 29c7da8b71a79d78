"""Image reading: PIL's own opener even where ultralytics has replaced it."""

import sys
import types

import pytest
from PIL import Image, UnidentifiedImageError

from yoloprune.graphs.errors import RuntimeSetupError
from yoloprune.kernels.preprocess import open_image


def test_an_unreadable_image_never_reaches_a_patched_opener(monkeypatch, tmp_path):
    """ultralytics replaces PIL.Image.open with one that pip-installs pi-heif on the first
    unreadable image; ours must raise PIL's own error without calling it."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    calls = []

    def patched(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the patched opener ran")

    patched.__module__ = "ultralytics.utils.patches"
    patches = types.ModuleType("ultralytics.utils.patches")
    real = sys.modules.get("ultralytics.utils.patches")  # imported by other tests, maybe
    patches._image_open = getattr(real, "_image_open", Image.open)
    assert patches._image_open.__module__ == "PIL.Image"
    monkeypatch.setitem(sys.modules, "ultralytics.utils.patches", patches)
    monkeypatch.setattr(Image, "open", patched)
    with pytest.raises(UnidentifiedImageError):
        open_image(broken)
    assert calls == []
    monkeypatch.setattr(patches, "_image_open", patched)  # the original cannot be found
    with pytest.raises(RuntimeSetupError, match=r"PIL\.Image\.open is replaced"):
        open_image(broken)
