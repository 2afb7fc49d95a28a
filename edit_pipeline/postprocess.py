"""Decoded VAE output to PNG bytes, rounding exactly as diffusers' image processor does."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def tensor_to_image(decoded: np.ndarray) -> Image.Image:
    """[1, 3, H, W] float in [-1, 1] -> RGB image (diffusers: (x / 2 + 0.5).clamp(0, 1))."""
    pixels = np.clip(decoded[0].astype(np.float32) / 2 + 0.5, 0.0, 1.0).transpose(1, 2, 0)
    return Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="RGB")


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes; the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
