"""Request preprocessing as the preprocess models run it, without a server."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from edit_pipeline.postprocess import encode_png, tensor_to_image
from edit_pipeline.preprocess import (
    ImageLimits,
    decode_image,
    image_to_tensor,
    resolve_request,
)
from pix2pix_client.contract import InvalidArgumentError
from tests.bad_images import mutations, named_cases
from tests.serving import photo, png_bytes


def test_exif_orientation_is_applied() -> None:
    wide = photo(80, 48)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    wide.save(buffer, format="JPEG", exif=exif.tobytes())
    assert decode_image(buffer.getvalue()).size == (48, 80)


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((1000, 600), 512, (512, 304)),  # 512x307.2 -> floored to multiples of 8
        ((600, 1000), 512, (304, 512)),
        ((300, 200), 512, (296, 200)),  # never scaled up; only floored
        ((1024, 1024), 768, (768, 768)),
    ],
)
def test_resize_keeps_aspect_and_floors_to_8(size, max_side, expected) -> None:
    image = decode_image(png_bytes(Image.new("RGB", size, "white")), ImageLimits(max_side=max_side))
    assert image.size == expected


def test_pixel_limit_is_checked_before_decoding() -> None:
    limits = ImageLimits(max_pixels=100 * 100)
    with pytest.raises(
        InvalidArgumentError, match=r"image is 200x100 pixels: allowed at most 10000"
    ):
        decode_image(png_bytes(Image.new("L", (200, 100))), limits)


def test_transparency_lands_on_white_and_16_bit_scales() -> None:
    transparent = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    assert decode_image(png_bytes(transparent)).getpixel((0, 0)) == (255, 255, 255)
    levels = np.full((16, 16), 65535 // 2, dtype=np.uint16)
    grey = decode_image(png_bytes(Image.fromarray(levels)))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (127, 127, 127)


def test_image_tensor_matches_diffusers_preprocessing() -> None:
    from diffusers.image_processor import VaeImageProcessor

    image = decode_image(png_bytes(photo(64, 48)))
    expected = VaeImageProcessor(vae_scale_factor=8).preprocess(image).numpy()
    np.testing.assert_array_equal(image_to_tensor(image), expected)


def test_postprocess_rounds_like_diffusers() -> None:
    from diffusers.image_processor import VaeImageProcessor

    decoded = np.random.default_rng(0).uniform(-1.2, 1.2, size=(1, 3, 16, 24)).astype(np.float32)
    import torch

    expected = VaeImageProcessor().postprocess(torch.from_numpy(decoded), output_type="pil")[0]
    ours = tensor_to_image(decoded)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))
    assert encode_png(ours) == encode_png(ours)


def test_float32_parameters_keep_the_value_the_user_typed() -> None:
    # FP32 0.7 is 0.699999988...; int(20 * that) would be 13 steps instead of diffusers' 14.
    request = resolve_request(
        "img2img",
        {
            "image": b"x",
            "prompt": "p",
            "temperature": np.float32(0.7),
            "num_inference_steps": np.int32(20),
        },
    )
    assert request.temperature == 0.7 and int(20 * request.temperature) == 14
    assert isinstance(request.num_inference_steps, int)


def test_defaults_and_random_seed() -> None:
    first = resolve_request("instruct_pix2pix", {"image": b"x", "prompt": "p"})
    second = resolve_request("instruct_pix2pix", {"image": b"x", "prompt": "p"})
    assert (first.num_inference_steps, first.guidance_scale, first.image_guidance_scale) == (
        20,
        7.5,
        1.5,
    )
    assert first.temperature == 1.0 and first.scheduler is None and first.negative_prompt == ""
    assert first.seed != second.seed
    assert resolve_request("img2img", {"image": b"x", "prompt": "p"}).temperature == 0.8


# --------------------------------------------------------------------------- hostile bytes

MUTATIONS = 6000


def test_every_mutation_decodes_or_is_refused_as_the_image(summary) -> None:
    """Seeded byte flips, insertions, deletions and truncations of valid PNG, JPEG,
    progressive JPEG and WebP files: each decodes, or raises the contract's error naming
    the image in the project's words. No other exception, whatever Pillow raises."""
    outcomes: dict[str, int] = {"decoded": 0, "refused": 0}
    kinds: dict[str, int] = {}
    for _, data in mutations(MUTATIONS, seed=12):
        try:
            image = decode_image(data)
        except InvalidArgumentError as error:
            assert error.field == "image"
            message = str(error)
            assert message.startswith("image ") and ": allowed " in message, message
            assert "Traceback" not in message and "/" not in message.split(": allowed")[0]
            outcomes["refused"] += 1
            reason = message.split("(", 1)[-1].split(":")[0] if "(" in message else message
            kinds[reason] = kinds.get(reason, 0) + 1
        else:
            assert image.mode == "RGB" and min(image.size) >= 8
            outcomes["decoded"] += 1
    summary(
        "image mutations through decode_image",
        f"{MUTATIONS} mutations: {outcomes['decoded']} decoded, {outcomes['refused']} refused "
        "as image errors, 0 other exceptions",
    )
    assert outcomes["refused"] > MUTATIONS // 10 and outcomes["decoded"] > MUTATIONS // 10


@pytest.mark.parametrize("case", sorted(named_cases()))
def test_named_hostile_files_are_image_errors(case: str) -> None:
    with pytest.raises(InvalidArgumentError) as refused:
        decode_image(named_cases()[case])
    assert refused.value.field == "image"
    message = str(refused.value)
    assert message.startswith("image ") and "allowed encoded PNG, JPEG or WebP" in message
    # Pillow's own wording of its limits stays out of the message.
    assert "MAX_TEXT_CHUNK" not in message and "Decompressed Data Too Large" not in message


def test_a_decompression_bomb_gets_the_pixel_message() -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"image is too large to decode: allowed at most"
    ):
        decode_image(png_bytes(Image.new("1", (20000, 20000))))
