"""The benchmark's input: a real photograph, encoded as a client would upload it."""

from __future__ import annotations

import io

from PIL import Image


def photo(size: int) -> Image.Image:
    """scikit-image's astronaut (512x512 RGB), resized to size x size."""
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.LANCZOS)


def photo_png(size: int) -> bytes:
    buffer = io.BytesIO()
    photo(size).save(buffer, format="PNG")
    return buffer.getvalue()
