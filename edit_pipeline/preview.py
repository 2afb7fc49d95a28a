"""Latent previews: what an edit looks like mid-way, without running the VAE decoder.

Stable Diffusion's latents map to colours almost linearly: each latent pixel's RGB is
close to `latents . weights + bias`, with a channels-by-3 matrix fitted once per
checkpoint from its own VAE decoder (export/latent_preview.py). A preview is that map
applied to the current latents, upsampled and encoded as a small PNG: a few milliseconds
on a CPU, against a VAE decode that costs more than a UNet step.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

# Previews are small: the longer side at most this, never larger than the edit itself.
PREVIEW_SIDE = 256


@dataclass(frozen=True)
class LatentPreview:
    """The linear latent -> RGB map of one checkpoint (RGB in 0..1)."""

    weights: np.ndarray  # [latent channels, 3]
    bias: np.ndarray  # [3]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatentPreview:
        return cls(
            np.asarray(data["weights"], dtype=np.float32),
            np.asarray(data["bias"], dtype=np.float32),
        )

    def to_json(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist(), "bias": self.bias.tolist()}

    def rgb(self, latents: torch.Tensor) -> np.ndarray:
        """[1, C, h, w] unscaled latents (the VAE decoder's input) -> [h, w, 3] uint8."""
        pixels = latents[0].detach().float().cpu().numpy()
        colours = np.tensordot(pixels, self.weights, axes=([0], [0])) + self.bias
        return (np.clip(colours, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)

    def png(self, latents: torch.Tensor, image_size: tuple[int, int]) -> bytes:
        """The preview PNG: the latents' colours upsampled towards the edit's size."""
        width, height = image_size
        scale = min(1.0, PREVIEW_SIDE / max(width, height))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = Image.fromarray(self.rgb(latents), mode="RGB").resize(
            size, Image.Resampling.BILINEAR
        )
        buffer = io.BytesIO()
        # Fast over small: a preview is looked at once.
        image.save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()
