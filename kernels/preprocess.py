"""Image preprocessing shared by every runtime and the datasets: the letterbox, as at inference."""

from __future__ import annotations

import sys

import numpy as np

from yoloprune.graphs.errors import RuntimeSetupError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def letterbox(image: np.ndarray, size: int, color: int = 114):
    """Resize keeping aspect ratio and pad to size x size; returns (image, ratio, (padw, padh))."""
    from PIL import Image

    h, w = image.shape[:2]
    ratio = min(size / h, size / w)
    new_w, new_h = round(w * ratio), round(h * ratio)
    if (new_w, new_h) != (w, h):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    pad_w, pad_h = (size - new_w) / 2, (size - new_h) / 2
    top, left = round(pad_h - 0.1), round(pad_w - 0.1)
    out = np.full((size, size, 3), color, dtype=np.uint8)
    out[top : top + new_h, left : left + new_w] = image
    return out, ratio, (left, top)


def open_image(path):
    """``PIL.Image.open``, PIL's own even where ultralytics has replaced it: ultralytics'
    replacement (``ultralytics.utils.patches.image_open``) answers the first unreadable image
    by pip-installing ``pi-heif``, so a corrupt file in a dataset would install code."""
    from PIL import Image

    opener = Image.open
    if getattr(opener, "__module__", None) != "PIL.Image":
        patches = sys.modules.get("ultralytics.utils.patches")
        opener = getattr(patches, "_image_open", None)
        if opener is None or getattr(opener, "__module__", None) != "PIL.Image":
            raise RuntimeSetupError(
                f"PIL.Image.open is replaced by {Image.open.__module__}.{Image.open.__name__}; "
                "yoloprune reads images with PIL's own, which it cannot find"
            )
    return opener(path)
