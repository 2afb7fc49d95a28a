"""Client-side validation: every bad input is refused before a request is sent, with a
message that names the field, the value and the allowed values from the contract."""

from __future__ import annotations

import asyncio
import math

import pytest

from pix2pix_client import AsyncEditClient, EditClient, EditError, InvalidArgument, contract
from pix2pix_client.request import prepare_request, validate_parameters
from tests.test_client_standin import png_bytes

# Nothing listens on port 1: if validation let a request through, the call would fail
# with ServerUnavailable instead of InvalidArgument.
UNUSED_URL = "127.0.0.1:1"

BAD_VALUES = [
    ("negative_prompt", 123, "is not text"),
    ("negative_prompt", b"\xff\xfe", "is not valid UTF-8"),
    ("num_inference_steps", 1, "is out of range"),
    ("num_inference_steps", 1001, "is out of range"),
    ("num_inference_steps", 2.5, "is not an integer"),
    ("num_inference_steps", True, "is not an integer"),
    ("guidance_scale", 0.5, "is out of range"),
    ("guidance_scale", 14.5, "is out of range"),
    ("guidance_scale", math.nan, "is not a finite number"),
    ("guidance_scale", "strong", "is not a number"),
    ("image_guidance_scale", -0.1, "is out of range"),
    ("image_guidance_scale", 10.5, "is out of range"),
    ("temperature", 0.05, "is out of range"),
    ("temperature", 1.5, "is out of range"),
    ("seed", -1, "is out of range"),
    ("seed", 2**63, "is out of range"),
    ("seed", 7.5, "is not an integer"),
    ("scheduler", "heun", "is not supported"),
    ("cache_interval", 0, "is out of range"),
    ("cache_interval", 11, "is out of range"),
    ("cache_interval", 2.5, "is not an integer"),
    ("preview_every", -1, "is out of range"),
    ("preview_every", 1001, "is out of range"),
]


def test_every_optional_parameter_has_a_bad_value_case() -> None:
    optional = {p.name for p in contract.PARAMETERS if not p.required}
    assert optional == {name for name, _, _ in BAD_VALUES}


@pytest.mark.parametrize(("field", "value", "reason"), BAD_VALUES)
def test_bad_value_names_field_value_and_allowed_values(field: str, value, reason: str) -> None:
    parameter = contract.PARAMETERS_BY_NAME[field]
    with EditClient(UNUSED_URL, retries=0) as client, pytest.raises(InvalidArgument) as raised:
        if parameter.streaming_only:
            client.edit_stream(png_bytes(), "make it snowy", **{field: value})
        else:
            client.edit(png_bytes(), "make it snowy", **{field: value})
    error = raised.value
    assert error.field == field
    message = str(error)
    assert message.startswith(field)
    assert reason in message
    assert f"allowed {parameter.allowed()}" in message
    assert error.status is None  # refused by the client, never sent


def test_scheduler_message_lists_every_scheduler() -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate_parameters("instruct_pix2pix", "x", scheduler="heun")
    for name in contract.SCHEDULERS:
        assert name in str(raised.value)


def test_range_message_shows_both_bounds() -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate_parameters("instruct_pix2pix", "x", num_inference_steps=0)
    assert str(raised.value) == "num_inference_steps=0 is out of range: allowed 2..1000"


@pytest.mark.parametrize("prompt", [None, b"\xff"])
def test_prompt_is_required_text(prompt) -> None:
    with pytest.raises(InvalidArgument) as raised:
        prepare_request("instruct_pix2pix", png_bytes(), prompt, {})
    assert raised.value.field == "prompt"
    assert "allowed UTF-8 text" in str(raised.value)


def test_image_guidance_scale_is_refused_for_img2img() -> None:
    with pytest.raises(InvalidArgument) as raised:
        prepare_request("img2img", png_bytes(), "a castle", {"image_guidance_scale": 1.5})
    assert raised.value.field == "image_guidance_scale"
    assert "not an input of img2img" in str(raised.value)


def test_unknown_model_is_refused_before_the_image_is_read(tmp_path) -> None:
    missing = tmp_path / "missing.png"
    with pytest.raises(InvalidArgument) as raised:
        prepare_request("sdxl", missing, "x", {})
    assert raised.value.field == "model"
    assert "allowed one of instruct_pix2pix, img2img" in str(raised.value)


def test_valid_values_are_normalised_and_absent_ones_not_sent() -> None:
    encoded, sent = prepare_request(
        "instruct_pix2pix",
        png_bytes(),
        b"make it snowy",
        {"num_inference_steps": 10, "seed": 3, "guidance_scale": 5, "temperature": None},
    )
    assert encoded.startswith(b"\x89PNG")
    assert sent == {
        "prompt": "make it snowy",
        "num_inference_steps": 10,
        "guidance_scale": 5.0,
        "seed": 3,
    }
    assert isinstance(sent["guidance_scale"], float)


def test_invalid_argument_is_catchable_as_contract_error_and_value_error() -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate_parameters("img2img", "x", temperature=2.0)
    assert isinstance(raised.value, contract.InvalidArgumentError)
    assert isinstance(raised.value, ValueError)
    assert isinstance(raised.value, EditError)


def test_async_client_validates_the_same_way() -> None:
    async def edit() -> None:
        async with AsyncEditClient(UNUSED_URL, retries=0) as client:
            await client.edit(png_bytes(), "x", seed=-5)

    with pytest.raises(InvalidArgument) as raised:
        asyncio.run(edit())
    assert raised.value.field == "seed"
    assert "allowed 0..2^63-1" in str(raised.value)


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("retries", -1), ("backoff_s", -0.5), ("timeout_s", 0), ("timeout_s", -2.0)],
)
def test_client_settings_are_checked(keyword: str, value: float) -> None:
    with pytest.raises(InvalidArgument) as raised:
        EditClient(UNUSED_URL, **{keyword: value})
    assert raised.value.field == keyword


def test_a_streaming_input_is_refused_by_the_whole_edit_model() -> None:
    with EditClient(UNUSED_URL, retries=0) as client, pytest.raises(InvalidArgument) as raised:
        client.edit(png_bytes(), "make it snowy", preview_every=2)  # type: ignore[call-arg]
    assert raised.value.field == "preview_every"
    assert "preview_every is not an input of instruct_pix2pix" in str(raised.value)
