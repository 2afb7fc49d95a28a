"""The instructions the toy model learns, each with the procedural edit that defines it.

Every edit is a pure function of the pixels: RGB in [0, 1], shape [..., 3, H, W], so
training pairs are made on the fly from any photo and tests can compute what an
instruction should do to an image the model never saw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# ITU-R BT.601 luma weights, as Pillow's convert("L") uses.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# The classic sepia-tone matrix (rows: output R, G, B).
SEPIA_MATRIX = (
    (0.393, 0.769, 0.189),
    (0.349, 0.686, 0.168),
    (0.272, 0.534, 0.131),
)
BRIGHTER_GAMMA = 0.55
DARKER_GAMMA = 1.8
# How much of the tint colour replaces the original colour; luminance is kept.
TINT_STRENGTH = 0.6
TINT_COLOURS = {
    "red": (1.0, 0.2, 0.15),
    "green": (0.2, 1.0, 0.2),
    "blue": (0.15, 0.3, 1.0),
}
BLUR_SIGMA = 2.0


def luminance(images: torch.Tensor) -> torch.Tensor:
    """Luma of RGB images, [..., 1, H, W]."""
    weights = images.new_tensor(LUMA_WEIGHTS).view(3, 1, 1)
    return (images * weights).sum(dim=-3, keepdim=True)


def black_and_white(images: torch.Tensor) -> torch.Tensor:
    """Every pixel replaced by its luma, in all three channels."""
    return luminance(images).expand_as(images).clone()


def sepia(images: torch.Tensor) -> torch.Tensor:
    """The sepia-tone colour matrix, clipped to [0, 1]."""
    matrix = images.new_tensor(SEPIA_MATRIX)
    return torch.einsum("oc,...chw->...ohw", matrix, images).clamp(0.0, 1.0)


def invert(images: torch.Tensor) -> torch.Tensor:
    """The photographic negative."""
    return 1.0 - images


def brighter(images: torch.Tensor) -> torch.Tensor:
    """A gamma below 1: shadows and mid-tones lifted, white and black stay."""
    return images.clamp(0.0, 1.0) ** BRIGHTER_GAMMA


def darker(images: torch.Tensor) -> torch.Tensor:
    """A gamma above 1: mid-tones pushed down, white and black stay."""
    return images.clamp(0.0, 1.0) ** DARKER_GAMMA


def tint(images: torch.Tensor, colour: tuple[float, float, float]) -> torch.Tensor:
    """Blends each pixel towards `colour` at the pixel's own luma (a colour filter)."""
    target = images.new_tensor(colour).view(3, 1, 1)
    # Scaled so the tint colour has the luma of the pixel it replaces.
    tinted = luminance(images) * target / luminance(target.view(3, 1, 1))
    return ((1.0 - TINT_STRENGTH) * images + TINT_STRENGTH * tinted).clamp(0.0, 1.0)


def gaussian_blur(images: torch.Tensor, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """A separable Gaussian blur with reflected borders."""
    radius = max(1, round(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    shape = images.shape
    flat = images.reshape(-1, 1, *shape[-2:])
    flat = torch.nn.functional.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = torch.nn.functional.conv2d(flat, kernel.view(1, 1, 1, -1))
    flat = torch.nn.functional.conv2d(flat, kernel.view(1, 1, -1, 1))
    return flat.reshape(shape)


@dataclass(frozen=True)
class Instruction:
    """An instruction the model is trained on and the edit that defines its target."""

    prompt: str
    edit: Callable[[torch.Tensor], torch.Tensor]


INSTRUCTIONS: tuple[Instruction, ...] = (
    Instruction("make it black and white", black_and_white),
    Instruction("make it sepia", sepia),
    Instruction("invert the colors", invert),
    Instruction("make it brighter", brighter),
    Instruction("make it darker", darker),
    Instruction("make it red", lambda images: tint(images, TINT_COLOURS["red"])),
    Instruction("make it green", lambda images: tint(images, TINT_COLOURS["green"])),
    Instruction("make it blue", lambda images: tint(images, TINT_COLOURS["blue"])),
    Instruction("blur it", gaussian_blur),
)
INSTRUCTIONS_BY_PROMPT = {instruction.prompt: instruction for instruction in INSTRUCTIONS}
