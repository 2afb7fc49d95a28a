"""Image input normalisation: every accepted type becomes bytes the server decodes."""

from __future__ import annotations

import io
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pix2pix_client import EditResult, InvalidArgument, ServerError
from pix2pix_client.api.output import fit_to_size
from pix2pix_client.contract import InvalidArgumentError
from pix2pix_client.images import decode_image, encode_image
from tests.bad_images import mutate


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _format(data: bytes) -> str | None:
    return Image.open(io.BytesIO(data)).format


def _gradient(height: int = 24, width: int = 40) -> np.ndarray:
    rows = np.arange(height, dtype=np.uint8)[:, None, None] * 5
    columns = np.arange(width, dtype=np.uint8)[None, :, None] * 3
    return (rows + columns + np.array([0, 60, 120], dtype=np.uint8)).astype(np.uint8)


def _encoded(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP"])
def test_served_formats_pass_through_unchanged(image_format: str, tmp_path: Path) -> None:
    data = _encoded(Image.fromarray(_gradient()), image_format)
    assert encode_image(data) == data
    assert encode_image(bytearray(data)) == data
    assert encode_image(memoryview(data)) == data
    path = tmp_path / f"photo.{image_format.lower()}"
    path.write_bytes(data)
    assert encode_image(path) == data
    assert encode_image(str(path)) == data


@pytest.mark.parametrize("image_format", ["BMP", "TIFF", "GIF"])
def test_other_formats_are_reencoded_as_png(image_format: str, tmp_path: Path) -> None:
    original = Image.fromarray(_gradient())
    data = _encoded(original, image_format)
    path = tmp_path / f"photo.{image_format.lower()}"
    path.write_bytes(data)
    for source in (data, path):
        encoded = encode_image(source)
        assert _format(encoded) == "PNG"
        if image_format != "GIF":  # GIF is palette-quantised, the others are lossless
            np.testing.assert_array_equal(_pixels(encoded), np.asarray(original))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16", "F"])
def test_pil_images_become_png(mode: str) -> None:
    image = Image.fromarray(_gradient()).convert(mode)
    encoded = encode_image(image)
    assert _format(encoded) == "PNG"
    decoded = Image.open(io.BytesIO(encoded))
    assert decoded.size == (40, 24)
    if mode in ("RGB", "RGBA", "L"):
        np.testing.assert_array_equal(np.asarray(decoded), np.asarray(image))


@pytest.mark.parametrize(
    ("shape", "mode"),
    [((24, 40, 3), "RGB"), ((24, 40), "L"), ((24, 40, 1), "L"), ((24, 40, 4), "RGBA")],
)
def test_uint8_arrays_become_png_with_the_same_pixels(shape: tuple[int, ...], mode: str) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    encoded = encode_image(array)
    decoded = Image.open(io.BytesIO(encoded))
    assert decoded.format == "PNG"
    assert decoded.mode == mode
    np.testing.assert_array_equal(
        np.asarray(decoded), array.reshape(decoded.height, decoded.width, -1).squeeze()
    )


def test_non_contiguous_array_is_encoded() -> None:
    array = _gradient()[:, ::-1, :]  # a view with a negative stride
    np.testing.assert_array_equal(_pixels(encode_image(array)), array)


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (b"", "image bytes is empty"),
        (b"GIF89a-but-not-really", "is not a readable image"),
        (b"hello world", "is not a readable image"),
        (np.zeros((8, 8, 3), dtype=np.float32), "dtype float32: allowed uint8"),
        (np.zeros((8, 8, 2), dtype=np.uint8), "shape (8, 8, 2)"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), "shape (2, 8, 8, 3)"),
        (np.zeros((0, 8, 3), dtype=np.uint8), "shape (0, 8, 3)"),
        (12345, "image of type int is not supported"),
        ([[0, 1], [2, 3]], "image of type list is not supported"),
    ],
)
def test_unusable_images_name_the_problem(image, expected: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        encode_image(image)
    assert raised.value.field == "image"
    assert expected in str(raised.value)
    assert "allowed" in str(raised.value)


def test_a_header_claiming_too_many_pixels_is_refused_before_decoding() -> None:
    """A PNG of 20000x20000 black pixels compresses to a few hundred kilobytes; Pillow
    refuses its header (a decompression bomb), and so does the client, naming the image."""
    with pytest.raises(InvalidArgument) as raised:
        encode_image(_encoded(Image.new("1", (20000, 20000)), "PNG"))
    assert raised.value.field == "image"
    assert "its header claims over" in str(raised.value) and "allowed PNG" in str(raised.value)


def test_missing_and_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        encode_image(tmp_path / "missing.png")
    with pytest.raises(InvalidArgument, match="is a directory"):
        encode_image(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InvalidArgument, match=r"empty\.png' is empty"):
        encode_image(tmp_path / "empty.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InvalidArgument, match="is not a readable image"):
        encode_image(tmp_path / "notes.png")


def test_decode_image_loads_pixels_and_rejects_garbage() -> None:
    data = _encoded(Image.fromarray(_gradient()), "PNG")
    decoded = decode_image(data)
    np.testing.assert_array_equal(np.asarray(decoded), _gradient())
    with pytest.raises(ServerError, match="undecodable image"):
        decode_image(b"\x89PNG\r\n\x1a\n truncated")


def test_result_save_keeps_png_bytes_and_converts_other_suffixes(tmp_path: Path) -> None:
    png = _encoded(Image.fromarray(_gradient()).convert("RGBA"), "PNG")
    result = EditResult(
        image=decode_image(png), png=png, seed=1, latency_s=0.1, model="instruct_pix2pix"
    )
    assert result.save(tmp_path / "out.png").read_bytes() == png
    assert _format(result.save(tmp_path / "out.jpg").read_bytes()) == "JPEG"
    assert _format(result.save(tmp_path / "out.webp").read_bytes()) == "WEBP"


# Every format Pillow writes; the client re-encodes those it does not send as they are.
PILLOW_WRITES = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "TGA", "PPM", "ICO", "QOI")


@pytest.mark.parametrize("image_format", PILLOW_WRITES)
def test_broken_files_of_every_format_are_refused_naming_the_image(image_format: str) -> None:
    """Seeded mutations of a photo in each format, through the client's encoding and the
    gateway's fit to a size: each is a picture or the image error, never another
    exception (Pillow's QOI reader raised IndexError, its TIFF reader TypeError)."""
    data = _encoded(Image.fromarray(_gradient()), image_format)
    rng = random.Random(image_format)
    for _ in range(200):
        broken = mutate(data, rng)
        for use in (encode_image, lambda image: fit_to_size(image, (32, 32))):
            try:
                # PNG, or a served format sent as it is (the server decodes it).
                assert _format(use(broken)) in ("PNG", image_format)
            except InvalidArgumentError as error:
                assert error.field == "image" and "allowed" in str(error)


@pytest.mark.parametrize("leaked_filter", ["default", "error"])
def test_a_header_over_pillows_warning_limit_is_refused_whatever_the_warnings_filter(
    leaked_filter: str,
) -> None:
    """Between Pillow's warning and its error (1 to 2 x MAX_IMAGE_PIXELS) the gateway's
    fit refuses from the header by its own check; the warnings filters, shared by threads,
    decide nothing, and a filter someone made an error is the image error too."""
    claimed = Image.new("1", (Image.MAX_IMAGE_PIXELS // 8000 + 1, 8000))
    data = _encoded(claimed, "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter(leaked_filter, Image.DecompressionBombWarning)
        with pytest.raises(InvalidArgumentError, match="its header claims"):
            fit_to_size(data, (64, 64))
        if leaked_filter == "error":
            with pytest.raises(InvalidArgument, match="is not a readable image"):
                encode_image(data)


# Files found to raise what Pillow's readers raise beside OSError and ValueError.
PILLOW_ODDITIES = {
    # IndexError while decoding.
    "qoi-34-bytes": bytes.fromhex(
        "716f696600000018000000100401ff64000000fdfdfdfdfdfdc0690000004b000001"
    ),
    # SyntaxError ("broken PNG file") once its pixels are decoded, after the header opened.
    "png-broken-chunk-83-bytes": bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000018000000100802000000834628c20000001a4944415478"
        "9c634c61a00e60a29239a3068d1a346a1f88350800158a00846d9a2a150000000049b64e44ae421382"
    ),
}


@pytest.mark.parametrize("case", sorted(PILLOW_ODDITIES))
def test_pillows_other_exceptions_are_the_image_error(case: str) -> None:
    data = PILLOW_ODDITIES[case]
    for use in (encode_image, lambda image: fit_to_size(image, (64, 64))):
        try:
            use(data)
        except InvalidArgumentError as error:
            assert error.field == "image" and "allowed" in str(error)
    with pytest.raises(InvalidArgumentError, match="could not be decoded to fit"):
        fit_to_size(data, (64, 64))


def test_a_lifted_bomb_limit_fits_as_before(monkeypatch) -> None:
    """A host application may set Pillow's limit to None (no limit): the fit then checks
    nothing, and fits."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    fitted = fit_to_size(_encoded(Image.fromarray(_gradient()), "PNG"), (16, 16))
    assert Image.open(io.BytesIO(fitted)).size == (16, 16)
