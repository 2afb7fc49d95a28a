"""Turning the image a caller has into the encoded bytes the edit models accept, and back."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from pix2pix_client.errors import InvalidArgument, ServerError

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]  # noqa: UP007

# What the server's preprocess decodes; anything else Pillow reads is re-encoded as PNG.
SERVED_FORMATS = ("PNG", "JPEG", "WEBP")
_ALLOWED = "a path, encoded image bytes, a PIL image or a uint8 HxW / HxWx3 / HxWx4 array"


def encode_image(image: ImageInput) -> bytes:
    """Returns `image` as encoded PNG, JPEG or WebP bytes, ready to send.

    Paths and bytes already in a served format pass through unchanged (no re-encoding
    loss for JPEG); other formats Pillow can read, PIL images and numpy arrays are
    encoded as PNG. Raises InvalidArgument (field "image") naming what is wrong.
    """
    if isinstance(image, (str, os.PathLike)):
        return _encoded_bytes(_read_file(Path(image)), source=f"image file {str(image)!r}")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _encoded_bytes(bytes(image), source="image bytes")
    if isinstance(image, Image.Image):
        return _png_from_pil(image)
    if isinstance(image, np.ndarray):
        return _png_from_pil(_pil_from_array(image))
    raise InvalidArgument(
        "image", f"image of type {type(image).__name__} is not supported: allowed {_ALLOWED}"
    )


def decode_image(data: bytes) -> Image.Image:
    """Decodes the server's encoded result into a loaded PIL image."""
    try:
        decoded = Image.open(io.BytesIO(data))
        decoded.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise ServerError(f"the server returned an undecodable image: {error}") from None
    return decoded


def _read_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidArgument("image", f"image file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise InvalidArgument("image", f"image path {str(path)!r} is a directory") from None
    except OSError as error:
        raise InvalidArgument(
            "image", f"image file {str(path)!r} cannot be read: {error.strerror}"
        ) from None
    return data


def _encoded_bytes(data: bytes, *, source: str) -> bytes:
    if not data:
        raise InvalidArgument("image", f"{source} is empty: allowed encoded {_served()} bytes")
    try:
        # Opening reads only the header; it tells the format without decoding pixels.
        with Image.open(io.BytesIO(data)) as opened:
            if opened.format in SERVED_FORMATS:
                return data
            opened.load()
            return _png_from_pil(opened)
    except Image.DecompressionBombError:
        # Pillow refuses such headers before decoding anything (a few bytes can claim
        # billions of pixels); the server's own pixel limit is far lower.
        limit = 2 * Image.MAX_IMAGE_PIXELS
        raise InvalidArgument(
            "image", f"{source} refused: its header claims over {limit} pixels; allowed {_served()}"
        ) from None
    except InvalidArgument:
        raise
    except Exception as error:
        # Pillow raises many exception types for broken files (IndexError, TypeError,
        # SyntaxError among them), and the warning of a large header where a caller has
        # made warnings errors.
        detail = (
            "not an image Pillow can read"
            if isinstance(error, UnidentifiedImageError)
            else str(error) or type(error).__name__
        )
        raise InvalidArgument(
            "image", f"{source} is not a readable image ({detail}): allowed {_served()}"
        ) from None


def _pil_from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise InvalidArgument(
            "image", f"image array has dtype {array.dtype}: allowed uint8 (0..255)"
        )
    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))
    if not shape_ok or min(array.shape[:2]) == 0:
        raise InvalidArgument(
            "image", f"image array has shape {array.shape}: allowed HxW, HxWx1, HxWx3 or HxWx4"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(array))


def _png_from_pil(image: Image.Image) -> bytes:
    if image.width == 0 or image.height == 0:
        raise InvalidArgument("image", f"image has size {image.size}: allowed a non-empty image")
    # PNG stores these modes as they are; others (CMYK, YCbCr, 16-bit, float) become RGB.
    if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "1"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _served() -> str:
    return "PNG, JPEG or WebP"
