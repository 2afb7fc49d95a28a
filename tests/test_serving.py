"""The served edit models through a real tritonserver: determinism, concurrency, bad input."""

from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.serving import contract_input, edit, execution_counts, photo, png_bytes

GOOD = {"prompt": "make it snowy", "num_inference_steps": 3, "seed": 5}


@pytest.fixture(scope="module")
def good_image() -> bytes:
    return png_bytes(photo(64, 64))


def test_same_seed_gives_byte_identical_png(grpc_client, good_image: bytes) -> None:
    first = edit(grpc_client, "instruct_pix2pix", image=good_image, **GOOD)
    second = edit(grpc_client, "instruct_pix2pix", image=good_image, **GOOD)
    assert first.png == second.png
    assert first.png.startswith(b"\x89PNG")
    other = edit(grpc_client, "instruct_pix2pix", image=good_image, **{**GOOD, "seed": 6})
    assert other.png != first.png


@pytest.mark.parametrize("model", ["instruct_pix2pix", "img2img"])
def test_returned_seed_reproduces_an_unseeded_request(grpc_client, good_image, model) -> None:
    unseeded = edit(
        grpc_client, model, image=good_image, prompt="a snowy street", num_inference_steps=3
    )
    another = edit(
        grpc_client, model, image=good_image, prompt="a snowy street", num_inference_steps=3
    )
    assert 0 <= unseeded.seed < 2**63 and unseeded.seed != another.seed
    replay = edit(
        grpc_client,
        model,
        image=good_image,
        prompt="a snowy street",
        num_inference_steps=3,
        seed=unseeded.seed,
    )
    assert replay.png == unseeded.png


def test_output_has_the_processed_size(grpc_client) -> None:
    # 1000x600 scales to 512x307.2 -> 512x307 -> sides floored to multiples of 8: 512x304
    served = edit(
        grpc_client,
        "instruct_pix2pix",
        image=png_bytes(photo(1000, 600)),
        prompt="make it snowy",
        num_inference_steps=2,
        seed=1,
    )
    assert Image.open(io.BytesIO(served.png)).size == (512, 304)


def test_temperature_changes_how_far_the_edit_moves(grpc_client, good_image: bytes) -> None:
    results = {
        temperature: edit(
            grpc_client,
            "instruct_pix2pix",
            image=good_image,
            **{**GOOD, "num_inference_steps": 10},
            temperature=temperature,
        ).pixels.astype(np.float64)
        for temperature in (0.2, 1.0)
    }
    original = np.asarray(Image.open(io.BytesIO(good_image)).convert("RGB"), dtype=np.float64)
    assert np.abs(results[0.2] - original).mean() < np.abs(results[1.0] - original).mean()


CONCURRENT_REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("instruct_pix2pix", {"scheduler": "euler_a", "num_inference_steps": 6, "seed": 11}),
    (
        "instruct_pix2pix",
        {"scheduler": "ddim", "guidance_scale": 1.0, "num_inference_steps": 5, "seed": 12},
    ),
    (
        "img2img",
        {"temperature": 0.5, "num_inference_steps": 8, "seed": 13, "scheduler": "dpmpp_2m"},
    ),
    (
        "instruct_pix2pix",
        {"scheduler": "lms", "temperature": 0.6, "num_inference_steps": 7, "seed": 14},
    ),
]


def test_concurrent_requests_equal_their_sequential_results(
    tiny_server, good_image, summary
) -> None:
    def run(request: tuple[str, dict[str, Any]]) -> np.ndarray:
        model, arguments = request
        client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
        try:
            return edit(client, model, image=good_image, prompt="make it snowy", **arguments).pixels
        finally:
            client.close()

    sequential = [run(request) for request in CONCURRENT_REQUESTS]
    before = execution_counts(tiny_server, "unet_pix2pix")
    with ThreadPoolExecutor(max_workers=len(CONCURRENT_REQUESTS)) as pool:
        concurrent = list(pool.map(run, CONCURRENT_REQUESTS))
    after = execution_counts(tiny_server, "unet_pix2pix")
    for alone, together in zip(sequential, concurrent, strict=True):
        # A merged UNet batch may round differently in the last float bit.
        assert np.abs(alone.astype(np.int16) - together.astype(np.int16)).max() <= 1
    inferences = after[0] - before[0]
    executions = after[1] - before[1]
    summary(
        "dynamic batching",
        f"unet_pix2pix: {inferences} UNet requests ran in {executions} executions "
        f"while {len(CONCURRENT_REQUESTS)} edits were in flight",
    )
    assert executions <= inferences


# --------------------------------------------------------------------------- bad input


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _image(format: str, size: tuple[int, int] = (64, 64), mode: str = "RGB") -> bytes:
    return png_bytes(Image.new(mode, size, 128), format=format)


# fmt: off
BAD_INPUTS: list[tuple[str, str, dict[str, Any], str, str]] = [
    # (case, model, inputs replacing the good ones, field named, text expected in message)
    ("steps-too-few", "instruct_pix2pix", {"num_inference_steps": 1}, "num_inference_steps", "allowed 2..1000"),
    ("steps-too-many", "img2img", {"num_inference_steps": 1001}, "num_inference_steps", "allowed 2..1000"),
    ("cfg-below-1", "instruct_pix2pix", {"guidance_scale": 0.5}, "guidance_scale", "allowed 1..14"),
    ("cfg-above-14", "img2img", {"guidance_scale": 14.5}, "guidance_scale", "allowed 1..14"),
    ("cfg-nan", "instruct_pix2pix", {"guidance_scale": math.nan}, "guidance_scale", "not a finite number"),
    ("image-cfg-inf", "instruct_pix2pix", {"image_guidance_scale": math.inf}, "image_guidance_scale", "allowed 0..10"),
    ("image-cfg-negative", "instruct_pix2pix", {"image_guidance_scale": -1.0}, "image_guidance_scale", "allowed 0..10"),
    ("temperature-too-low", "instruct_pix2pix", {"temperature": 0.05}, "temperature", "allowed 0.1..1"),
    ("temperature-too-high", "img2img", {"temperature": 1.5}, "temperature", "allowed 0.1..1"),
    ("temperature-nan", "img2img", {"temperature": math.nan}, "temperature", "not a finite number"),
    ("seed-negative", "instruct_pix2pix", {"seed": -1}, "seed", "allowed 0..2^63-1"),
    ("unknown-scheduler", "instruct_pix2pix", {"scheduler": "karras"}, "scheduler", "allowed one of euler_a, euler, ddim"),
    ("prompt-not-utf8", "instruct_pix2pix", {"prompt": b"\xff\xfe snow"}, "prompt", "not valid UTF-8"),
    ("negative-not-utf8", "img2img", {"negative_prompt": b"\xc3\x28"}, "negative_prompt", "not valid UTF-8"),
    ("image-zero-bytes", "instruct_pix2pix", {"image": b""}, "image", "allowed encoded PNG, JPEG or WebP"),
    ("image-not-an-image", "instruct_pix2pix", {"image": b"definitely not a photo"}, "image", "allowed encoded PNG, JPEG or WebP"),
    ("image-truncated-png", "instruct_pix2pix", {"image": _truncated(png_bytes(photo(64, 64)))}, "image", "could not be decoded"),
    ("image-truncated-jpeg", "img2img", {"image": _truncated(png_bytes(photo(64, 64), "JPEG"))}, "image", "could not be decoded"),
    ("image-gif", "instruct_pix2pix", {"image": _image("GIF")}, "image", "allowed encoded PNG, JPEG or WebP"),
    ("image-over-pixel-limit", "instruct_pix2pix", {"image": _image("PNG", (5000, 4000), "L")}, "image", "5000x4000 pixels: allowed at most"),
    ("image-under-8px", "instruct_pix2pix", {"image": _image("PNG", (6, 6))}, "image", "allowed sides of at least 8"),
    ("image-too-thin-after-resize", "img2img", {"image": _image("PNG", (2000, 12))}, "image", "512x0 after resizing"),
    ("prompt-missing", "instruct_pix2pix", {"prompt": None}, "prompt", "is required: allowed UTF-8 text"),
    ("image-missing", "img2img", {"image": None}, "image", "is required: allowed encoded PNG"),
]
# fmt: on


def _send(client: grpcclient.InferenceServerClient, model: str, inputs: dict[str, Any]) -> None:
    tensors = []
    for name, value in inputs.items():
        if value is None:
            continue
        tensors.append(contract_input(name, value))
    client.infer(model, tensors, client_timeout=120)


@pytest.mark.parametrize(
    ("case", "model", "bad", "field", "expected"), BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_is_invalid_argument_and_server_keeps_serving(
    grpc_client, good_image: bytes, case: str, model: str, bad: dict, field: str, expected: str
) -> None:
    inputs = {"image": good_image, **GOOD, **bad}
    with pytest.raises(InferenceServerException) as caught:
        _send(grpc_client, model, inputs)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value.message()
    message = caught.value.message()
    assert field in message and expected in message, message
    # The next good request succeeds.
    served = edit(grpc_client, model, image=good_image, **GOOD)
    assert served.png.startswith(b"\x89PNG")


def test_input_of_the_other_pipeline_is_rejected(grpc_client, good_image: bytes) -> None:
    with pytest.raises(InferenceServerException) as caught:
        _send(grpc_client, "img2img", {"image": good_image, **GOOD, "image_guidance_scale": 1.5})
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "image_guidance_scale" in caught.value.message()


def test_image_formats_and_modes_are_accepted(grpc_client) -> None:
    base = photo(64, 48)
    variants = {
        "jpeg": png_bytes(base, "JPEG", quality=90),
        "webp": png_bytes(base, "WEBP"),
        "rgba": png_bytes(base.convert("RGBA")),
        "greyscale": png_bytes(base.convert("L")),
        "palette": png_bytes(base.convert("P")),
        "cmyk-jpeg": png_bytes(base.convert("CMYK"), "JPEG"),
        "16-bit": png_bytes(Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)),
    }
    for name, data in variants.items():
        served = edit(grpc_client, "instruct_pix2pix", image=data, **GOOD)
        assert Image.open(io.BytesIO(served.png)).size == (64, 48), name
