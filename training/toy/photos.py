"""Photographs that scikit-image ships, and the random crops the toy model trains on.

The photos are split once: the model trains on `TRAINING_PHOTOS` and never sees
`HELD_OUT_PHOTOS` (the demo's astronaut among them), on which the tests measure it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# scikit-image sample images: colour photographs and greyscale ones (used as RGB).
TRAINING_PHOTOS = (
    "chelsea",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "camera",
    "coins",
    "moon",
    "brick",
    "page",
)
HELD_OUT_PHOTOS = ("astronaut", "coffee")


def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as uint8 RGB, HxWx3; greyscale is repeated."""
    from skimage import data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _disparity = data.stereo_motorcycle()
        pixels = left if name == "motorcycle_left" else right
    else:
        pixels = getattr(data, name)()
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    return np.ascontiguousarray(pixels[..., :3])


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float [3, H, W] in [0, 1]."""
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0


@dataclass(frozen=True)
class CropSettings:
    """How training crops are cut: size, range of downscaling, augmentations."""

    size: int = 64
    # Each photo is also used downscaled, so that a crop may hold a whole scene.
    scales: int = 5
    horizontal_flip: bool = True
    # Swapping colour channels turns an orange cat into a blue one: more hues to learn on.
    channel_shuffle: float = 0.5


def photo_pyramid(names: tuple[str, ...], settings: CropSettings) -> list[torch.Tensor]:
    """Every photo at `settings.scales` sizes, from full size down to a short side of 1.5 crops."""
    levels = []
    for name in names:
        photo = to_tensor(load_photo(name))
        short = min(photo.shape[-2:])
        smallest = min(1.0, 1.5 * settings.size / short)
        for index in range(settings.scales):
            scale = smallest ** (index / max(1, settings.scales - 1))
            size = [max(settings.size, math.floor(side * scale)) for side in photo.shape[-2:]]
            levels.append(
                torch.nn.functional.interpolate(
                    photo[None], size=size, mode="bilinear", antialias=True, align_corners=False
                )[0].clamp(0.0, 1.0)
            )
    return levels


def random_crops(
    levels: list[torch.Tensor], count: int, settings: CropSettings, generator: torch.Generator
) -> torch.Tensor:
    """`count` random crops, [count, 3, size, size] in [0, 1], drawn from `generator`."""
    size = settings.size
    # Every photo and every scale equally often, however many crops a level holds.
    picks = torch.randint(0, len(levels), (count,), generator=generator)
    crops = torch.empty(count, 3, size, size)
    for index, pick in enumerate(picks.tolist()):
        level = levels[pick]
        top = int(torch.randint(0, level.shape[-2] - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, level.shape[-1] - size + 1, (1,), generator=generator))
        crop = level[:, top : top + size, left : left + size]
        if settings.horizontal_flip and torch.rand(1, generator=generator) < 0.5:
            crop = crop.flip(-1)
        if torch.rand(1, generator=generator) < settings.channel_shuffle:
            crop = crop[torch.randperm(3, generator=generator)]
        crops[index] = crop
    return crops
