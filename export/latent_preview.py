"""Fits a checkpoint's latent preview map from its own VAE, at export.

Photos that scikit-image ships are encoded by the VAE (the latent distribution's mean)
and decoded again; the decoded pixels, averaged over each latent pixel's footprint, are
regressed on the latents by least squares. The result is the channels-by-3 matrix and
bias that edit_pipeline/preview.py applies to the sampler's latents.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Colourful, varied scenes: a portrait, food, an animal, an outdoor scene, a microscope slide.
FIT_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
FIT_SIDE = 128


def _photos(side: int) -> list[np.ndarray]:
    from PIL import Image
    from skimage import data

    photos = []
    for name in FIT_PHOTOS:
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        photos.append(np.asarray(image.resize((side, side), Image.Resampling.LANCZOS)))
    return photos


def fit_latent_preview(vae: Any, vae_scale_factor: int) -> dict[str, Any]:
    """The preview map of one VAE, with how far it is from the decoder (grey levels)."""
    import torch

    side = FIT_SIDE // vae_scale_factor * vae_scale_factor
    latents, colours = [], []
    with torch.inference_mode():
        for photo in _photos(side):
            pixels = torch.from_numpy(photo.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
            mean = vae.encode(pixels).latent_dist.mean
            decoded = vae.decode(mean, return_dict=False)[0].clamp(-1, 1) / 2 + 0.5
            pooled = torch.nn.functional.avg_pool2d(decoded, vae_scale_factor)
            latents.append(mean[0].flatten(1).T.numpy())
            colours.append(pooled[0].flatten(1).T.numpy())
    x = np.concatenate(latents).astype(np.float64)
    y = np.concatenate(colours).astype(np.float64)
    design = np.hstack([x, np.ones((len(x), 1))])
    solution, *_ = np.linalg.lstsq(design, y, rcond=None)
    error = np.abs(design @ solution - y).mean() * 255
    return {
        "weights": solution[:-1].tolist(),
        "bias": solution[-1].tolist(),
        "mean_abs_error_grey_levels": round(float(error), 2),
        "fitted_on": [f"skimage.data.{name}() at {side}x{side}" for name in FIT_PHOTOS],
    }
