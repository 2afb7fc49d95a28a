"""The pictures that go in and out: the upload fitted to a requested size, results in
the requested format, base64, the usage figures, and server-sent events."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from PIL import Image, ImageOps

from pix2pix_client import contract
from pix2pix_client.api.form import SIDE_MULTIPLE

# The text encoder reads every prompt as CLIP's 77-token context, whatever its length.
TEXT_TOKENS = 77
PILLOW_FORMATS = {"jpeg": "JPEG", "webp": "WEBP"}


def fit_to_size(data: bytes, size: tuple[int, int]) -> bytes:
    """The upload scaled to cover `size` and cropped to it around the centre (the aspect
    kept, nothing stretched), as PNG; transparency is kept for the server to flatten.

    Any byte string either fits or raises InvalidArgumentError naming the image: Pillow
    raises many exception types for broken files. A header claiming more pixels than
    Pillow's bomb limit is refused before anything is decoded (checked here, not through
    the warnings filters, which threads share)."""
    try:
        image = Image.open(io.BytesIO(data))
        limit = Image.MAX_IMAGE_PIXELS  # None where a host application lifted it
        if limit is not None and (pixels := image.width * image.height) > limit:
            raise _not_fitted(size, f"its header claims {pixels} pixels")
        image = ImageOps.exif_transpose(image)
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            image = image.convert("RGBA" if image.has_transparency_data else "RGB")
        fitted = ImageOps.fit(image, size, Image.Resampling.LANCZOS)
    except contract.InvalidArgumentError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own refusal (over twice the limit), or its warning made an error.
        limit = Image.MAX_IMAGE_PIXELS
        raise _not_fitted(size, f"its header claims over {limit} pixels") from None
    except Exception as error:
        raise _not_fitted(size, type(error).__name__) from None
    buffer = io.BytesIO()
    fitted.save(buffer, format="PNG")
    return buffer.getvalue()


def _not_fitted(size: tuple[int, int], reason: str) -> contract.InvalidArgumentError:
    return contract.InvalidArgumentError(
        "image",
        f"image could not be decoded to fit size={size[0]}x{size[1]} ({reason}): "
        f"allowed {contract.PARAMETERS_BY_NAME['image'].allowed()}",
    )


def encoded(png: bytes, output_format: str, compression: int) -> str:
    """The image as base64 in `output_format`: the server's PNG as it is, or re-encoded
    as JPEG or WebP at quality `compression` (0..100)."""
    if output_format != "png":
        image = Image.open(io.BytesIO(png)).convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format=PILLOW_FORMATS[output_format], quality=compression)
        png = buffer.getvalue()
    return base64.b64encode(png).decode("ascii")


def picture_size(data: bytes) -> tuple[int, int]:
    """Width and height of an encoded image, read from its header."""
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def usage(size: tuple[int, int], images: int) -> dict[str, Any]:
    """OpenAI's usage object, counted in the units of the work: a token per 8x8-pixel
    latent cell of each image in and out, and CLIP's context for the prompt."""
    width, height = size
    cells = (width // SIDE_MULTIPLE) * (height // SIDE_MULTIPLE)
    input_tokens = cells + TEXT_TOKENS
    output_tokens = cells * images
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"image_tokens": cells, "text_tokens": TEXT_TOKENS},
        "output_tokens": output_tokens,
        "output_tokens_details": {"image_tokens": output_tokens, "text_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def server_sent_event(name: str, data: dict[str, Any]) -> bytes:
    """One event of a text/event-stream, its data one line of JSON."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def server_sent_comment(text: str) -> bytes:
    """A comment line: clients skip it; it keeps proxies from closing a quiet stream."""
    return f": {text}\n\n".encode()
