"""Images out: [-1, 1] floats to uint8 like the official evaluation, grids, PNG/JPEG bytes."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image
from torch import Tensor

from engine.model.vae import to_uint8

__all__ = ["encode_image", "make_grid", "to_uint8"]


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 (B, H, W, C) -> one uint8 (H', W', C) grid, `nrow` images per row."""
    b, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def to_pil(image: np.ndarray) -> Image.Image:
    """uint8 (H, W, C) with C = 1 (grey) or 3 (RGB) -> a PIL image."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def encode_image(image: np.ndarray, fmt: str = "png", scale: int = 1) -> bytes:
    """uint8 (H, W, C) -> encoded bytes; `scale` > 1 enlarges with nearest neighbour."""
    pil = to_pil(image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(fmt.lower(), fmt.upper()))
    return buf.getvalue()


def images_to_uint8(images: Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [-1, 1] -> uint8 numpy (B, H, W, C)."""
    return to_uint8(images.detach().cpu()).numpy()
