"""Request preprocessing: validated parameters, the decoded input image, prompt token ids.

Plain Python, called by the edit pipeline (edit_pipeline/pipeline.py) that the served
edit models and the bare onnxruntime baseline run. Every failure is an
`InvalidArgumentError` naming the input and its allowed values, which the Triton model
turns into INVALID_ARG.
"""

from __future__ import annotations

import io
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pix2pix_client.contract import (
    MAX_SEED,
    PARAMETERS_BY_NAME,
    InvalidArgumentError,
    validate_request,
)

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
DEFAULT_MAX_SIDE = 512
# Decoded-pixel guard against decompression bombs, checked before decoding.
DEFAULT_MAX_PIXELS = 4096 * 4096
# The VAE's downsampling factor of Stable Diffusion 1.x: sides are floored to a multiple.
DEFAULT_SIDE_MULTIPLE = 8
IMAGE_ALLOWED = PARAMETERS_BY_NAME["image"].allowed()


@dataclass(frozen=True)
class ImageLimits:
    max_side: int = DEFAULT_MAX_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_SIDE_MULTIPLE
    side_multiple: int = DEFAULT_SIDE_MULTIPLE

    def too_many_pixels(self, shown: str) -> InvalidArgumentError:
        side = int(self.max_pixels**0.5)
        return InvalidArgumentError(
            "image",
            f"image is {shown}: allowed at most {self.max_pixels} pixels ({side}x{side})",
        )


@dataclass(frozen=True)
class EditRequest:
    """A validated request with defaults filled in and the seed chosen."""

    prompt: str
    negative_prompt: str
    num_inference_steps: int
    guidance_scale: float
    image_guidance_scale: float
    temperature: float
    seed: int
    scheduler: str | None
    # A full UNet pass every this many steps, shallow passes between (1: every step full).
    cache_interval: int = 1
    # Streaming models: a latent preview every this many steps (0: progress only).
    preview_every: int = 0


def _image_error(message: str) -> InvalidArgumentError:
    return InvalidArgumentError("image", f"image {message}: allowed {IMAGE_ALLOWED}")


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decodes, orients by EXIF, converts to RGB and resizes an uploaded image.

    The longer side is scaled down to `limits.max_side` (never up), keeping the aspect
    ratio; both sides are then floored to a multiple of `limits.side_multiple`, as the
    VAE needs. Any byte string either decodes or raises InvalidArgumentError naming the
    image: Pillow raises many exception types for broken files, and none may escape.
    """
    if not data:
        raise _image_error("is empty (0 bytes)")
    with warnings.catch_warnings():
        # Pillow warns about large images; our own pixel limit below decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        except UnidentifiedImageError:
            raise _image_error(
                f"could not be decoded ({len(data)} bytes, unknown format)"
            ) from None
        except Image.DecompressionBombError:
            raise limits.too_many_pixels("too large to decode") from None
        except Exception as error:
            raise _undecodable(None, error) from None
        width, height = image.size
        if width * height > limits.max_pixels:
            raise limits.too_many_pixels(f"{width}x{height} pixels")
        try:
            image.load()
            image = to_rgb(ImageOps.exif_transpose(image))
        except Image.DecompressionBombError:
            raise limits.too_many_pixels(f"{width}x{height} pixels") from None
        except Exception as error:
            raise _undecodable(image.format, error) from None
    return resize_for_vae(image, limits)


def _undecodable(image_format: str | None, error: Exception) -> InvalidArgumentError:
    """The image error for whatever Pillow raised, in the project's words."""
    if isinstance(error, ValueError) and "too large" in str(error):
        # A PNG text or ICC chunk that inflates past Pillow's limits (a zip bomb).
        return _image_error("has a metadata chunk that inflates too far to decode")
    # Pillow's messages are short and name what is broken ("image file is truncated");
    # one line at most, and none that shows an object or a path.
    lines = str(error).strip().splitlines()
    reason = lines[0][:120] if lines and not any(c in lines[0] for c in "<>/\\") else ""
    detail = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
    shown = f"{image_format}: {detail}" if image_format else detail
    return _image_error(f"could not be decoded ({shown})")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any mode a PNG, JPEG or WebP decodes to; transparency lands on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping at 255.
        levels = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray((levels // 257).clip(0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def resize_for_vae(image: Image.Image, limits: ImageLimits) -> Image.Image:
    width, height = image.size
    scale = min(1.0, limits.max_side / max(width, height))
    multiple = limits.side_multiple
    target = (
        round(width * scale) // multiple * multiple,
        round(height * scale) // multiple * multiple,
    )
    if min(target) < limits.min_side:
        raise InvalidArgumentError(
            "image",
            f"image is {width}x{height} pixels, {target[0]}x{target[1]} after resizing: "
            f"allowed sides of at least {limits.min_side} pixels after resizing to at most "
            f"{limits.max_side}",
        )
    if target != image.size:
        image = image.resize(target, Image.Resampling.LANCZOS)
    return image


def image_to_tensor(image: Image.Image) -> np.ndarray:
    """[1, 3, H, W] float32 in [-1, 1], computed as diffusers' VaeImageProcessor does."""
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return np.ascontiguousarray((pixels * 2.0 - 1.0).transpose(2, 0, 1)[None])


def _python_float(value: Any) -> float:
    # An FP32 0.7 is 0.699999988; diffusers computes int(steps * 0.7) with the float the
    # user typed, so recover it from float32's shortest round-trip text.
    if isinstance(value, np.floating):
        return float(str(value))
    return float(value)


def resolve_request(pipeline: str, inputs: dict[str, Any], streaming: bool = False) -> EditRequest:
    """Validates the non-image inputs of one request and fills in defaults and the seed."""
    values = {k: (_python_float(v) if isinstance(v, np.floating) else v) for k, v in inputs.items()}
    values = {k: (int(v) if isinstance(v, np.integer) else v) for k, v in values.items()}
    validated = validate_request(pipeline, values, streaming)
    seed = validated["seed"]
    if seed is None:
        seed = secrets.randbelow(MAX_SEED + 1)
    return EditRequest(
        prompt=validated["prompt"],
        negative_prompt=validated["negative_prompt"],
        num_inference_steps=validated["num_inference_steps"],
        guidance_scale=validated["guidance_scale"],
        image_guidance_scale=validated.get("image_guidance_scale") or 0.0,
        temperature=validated["temperature"],
        seed=seed,
        scheduler=validated["scheduler"],
        cache_interval=validated["cache_interval"],
        preview_every=validated.get("preview_every") or 0,
    )


class PromptTokenizer:
    """CLIP tokenization exactly as diffusers' pipelines call it."""

    def __init__(self, tokenizer_dir: Path) -> None:
        from transformers import CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """[len(prompts), length] int32 token ids, padded and truncated to the tokenizer's
        context (77 for CLIP), the sequence length the text encoder was exported with."""
        encoded = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="np",
        )
        return encoded.input_ids.astype(np.int32)
