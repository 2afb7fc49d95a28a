"""How strongly the toy model follows each instruction, measured on photos it never saw.

Metrics take uint8 RGB arrays (HxWx3), as a served edit returns them, so the tests
through tritonserver and the measurement after training use the same definitions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from training.toy.edits import INSTRUCTIONS, LUMA_WEIGHTS


def as_float(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(pixels, dtype=np.float64) / 255.0


def saturation(pixels: np.ndarray) -> float:
    """Mean HSV saturation in [0, 1]: 0 for a grey image."""
    rgb = as_float(pixels)
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    return float(np.where(high > 1e-6, (high - low) / np.maximum(high, 1e-6), 0.0).mean())


def grey(pixels: np.ndarray) -> np.ndarray:
    """Luma in [0, 1], HxW."""
    return as_float(pixels) @ np.asarray(LUMA_WEIGHTS)


def mean_luminance(pixels: np.ndarray) -> float:
    """Mean luma in [0, 1]."""
    return float(grey(pixels).mean())


def channel_dominance(pixels: np.ndarray, channel: int) -> float:
    """Mean of one channel minus the mean of the other two, in [-1, 1]."""
    rgb = as_float(pixels)
    others = [index for index in range(3) if index != channel]
    return float((rgb[..., channel] - rgb[..., others].mean(axis=-1)).mean())


def grey_ssim(first: np.ndarray, second: np.ndarray) -> float:
    """Structural similarity of the two images' luma: 1 for the same structure."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(grey(first), grey(second), data_range=1.0))


def sharpness(pixels: np.ndarray) -> float:
    """Mean absolute luma difference between neighbouring pixels (falls when blurred)."""
    luma = grey(pixels)
    return float((np.abs(np.diff(luma, axis=0)).mean() + np.abs(np.diff(luma, axis=1)).mean()) / 2)


def target_edit(pixels: np.ndarray, prompt: str) -> np.ndarray:
    """What the instruction's defining edit does to `pixels`, as uint8."""
    instruction = next(item for item in INSTRUCTIONS if item.prompt == prompt)
    image = torch.from_numpy(as_float(pixels)).permute(2, 0, 1).float()
    edited = instruction.edit(image).clamp(0, 1).permute(1, 2, 0).numpy()
    return (edited * 255).round().astype(np.uint8)


def mean_abs_error(first: np.ndarray, second: np.ndarray) -> float:
    """Mean absolute difference in grey levels (0..255)."""
    return float(np.abs(first.astype(np.float64) - second.astype(np.float64)).mean())


@dataclass(frozen=True)
class EditScore:
    """How far an edit moved towards the instruction's target, and the input's own distance."""

    prompt: str
    error_to_target: float  # output vs target, grey levels
    input_to_target: float  # input vs target, grey levels

    @property
    def closed_fraction(self) -> float:
        """1 when the output is the target, 0 when it is no closer than the input."""
        return 1.0 - self.error_to_target / max(self.input_to_target, 1e-6)


def score_edit(source: np.ndarray, edited: np.ndarray, prompt: str) -> EditScore:
    """Scores one edit against the instruction's defining edit of the source."""
    target = target_edit(source, prompt)
    return EditScore(prompt, mean_abs_error(edited, target), mean_abs_error(source, target))


def edit_with_pipeline(
    pipeline: Any,
    image: Any,
    prompt: str,
    steps: int,
    seed: int,
    guidance_scale: float,
    image_guidance_scale: float,
) -> np.ndarray:
    """One edit with the diffusers reference pipeline, as uint8 HxWx3."""
    result = pipeline(
        prompt,
        image=image,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        image_guidance_scale=image_guidance_scale,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    return np.asarray(result)
