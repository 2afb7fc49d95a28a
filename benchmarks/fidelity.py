"""How close two systems' edits are: pixel differences and PSNR of their PNGs."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (inf: identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@dataclass(frozen=True)
class Agreement:
    """Two edits of the same request: uint8 differences and PSNR (NaN: other sizes)."""

    max_difference: float
    mean_difference: float
    psnr_db: float

    @classmethod
    def of(cls, a: bytes, b: bytes) -> Agreement:
        first, second = (np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in (a, b))
        if first.shape != second.shape:
            return cls(math.nan, math.nan, math.nan)
        difference = np.abs(first.astype(np.int16) - second.astype(np.int16))
        return cls(float(difference.max()), float(difference.mean()), psnr(first, second))
