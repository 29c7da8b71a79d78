"""Image preprocessing shared by every runtime and the datasets: the letterbox, as at inference."""

from __future__ import annotations

import numpy as np

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
