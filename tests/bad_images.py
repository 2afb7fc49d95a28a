"""Broken and hostile image bytes for the tests: seeded mutations and named cases.

Mutations start from valid PNG, JPEG, progressive JPEG and WebP encodings of a real photo
and flip, insert, delete or truncate bytes; the named cases are files seen to break
decoders (a cut-off PNG header, a broken JPEG segment length, a PNG whose compressed text
chunk inflates to tens of megabytes).
"""

from __future__ import annotations

import random
import struct
import zlib

from tests.serving import photo, png_bytes


def valid_images(size: tuple[int, int] = (48, 40)) -> dict[str, bytes]:
    """One photo in every format and variant the server decodes."""
    image = photo(*size)
    return {
        "png": png_bytes(image),
        "jpeg": png_bytes(image, "JPEG", quality=85),
        "progressive-jpeg": png_bytes(image, "JPEG", quality=85, progressive=True),
        "webp": png_bytes(image, "WEBP", quality=80),
    }


def mutate(data: bytes, rng: random.Random) -> bytes:
    """1..16 random byte flips, insertions, deletions or a truncation."""
    mutated = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        kind = rng.random()
        if kind < 0.55 and mutated:
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        elif kind < 0.75:
            mutated.insert(rng.randrange(len(mutated) + 1), rng.randrange(256))
        elif kind < 0.9 and len(mutated) > 1:
            del mutated[rng.randrange(len(mutated))]
        else:
            del mutated[rng.randrange(1, len(mutated) + 1) :]
    return bytes(mutated)


def mutations(count: int, seed: int) -> list[tuple[str, bytes]]:
    """`count` seeded mutations, spread evenly over the valid formats."""
    rng = random.Random(seed)
    originals = list(valid_images().items())
    return [
        (originals[i % len(originals)][0], mutate(originals[i % len(originals)][1], rng))
        for i in range(count)
    ]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_with_text_bomb(inflated_bytes: int = 50 * 1024 * 1024) -> bytes:
    """A valid tiny PNG with a zTXt chunk of ~60 KB that inflates to `inflated_bytes`."""
    png = png_bytes(photo(16, 16))
    header, rest = png[:33], png[33:]  # signature + IHDR, then the image data
    bomb = _png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\x00" * inflated_bytes, 9))
    return header + bomb + rest


def png_with_icc_bomb(inflated_bytes: int = 50 * 1024 * 1024) -> bytes:
    """A valid tiny PNG whose iCCP (colour profile) chunk inflates to `inflated_bytes`."""
    png = png_bytes(photo(16, 16))
    header, rest = png[:33], png[33:]
    bomb = _png_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(b"\x00" * inflated_bytes, 9))
    return header + bomb + rest


def jpeg_with_broken_segment_length() -> bytes:
    """A JPEG whose first segment after SOI claims more bytes than the file has."""
    jpeg = bytearray(png_bytes(photo(32, 32), "JPEG"))
    # Bytes 2-3 are the first marker (APP0, FF E0); 4-5 its big-endian length.
    jpeg[4:6] = b"\xff\xf0"
    return bytes(jpeg)


def named_cases() -> dict[str, bytes]:
    """Files that broke the server before every Pillow error became the image error."""
    rng = random.Random(30)
    return {
        "garbage-webp-30-bytes": b"RIFF\x16\x00\x00\x00WEBPVP8 "
        + bytes(rng.randrange(256) for _ in range(14)),
        "png-cut-off-ihdr-18-bytes": png_bytes(photo(16, 16))[:18],
        "jpeg-broken-segment-length": jpeg_with_broken_segment_length(),
        "png-ztxt-bomb": png_with_text_bomb(),
        "png-iccp-bomb": png_with_icc_bomb(),
        "png-only-signature": b"\x89PNG\r\n\x1a\n",
        "jpeg-only-soi": b"\xff\xd8",
    }
