"""Mapping tritonclient's InferenceServerException to the client's exception types."""

from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from pix2pix_client import (
    DeadlineExceeded,
    EditError,
    InvalidArgument,
    ModelNotFound,
    ServerError,
    ServerUnavailable,
    contract,
)
from pix2pix_client.errors import from_triton


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        (
            "StatusCode.UNAVAILABLE",
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
            "Failed to connect to remote host: Connection refused",
            ServerUnavailable,
        ),
        ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size", ServerUnavailable),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", DeadlineExceeded),
        ("StatusCode.NOT_FOUND", "Request for unknown model: 'sdxl' is not found", ModelNotFound),
        (
            "StatusCode.UNAVAILABLE",
            "Request for unknown model: 'img2img' is not found",
            ModelNotFound,
        ),
        # A model reloading after its process died: transient, retried.
        (
            "StatusCode.NOT_FOUND",
            "Request for unknown model: 'img2img' has no available versions",
            ServerUnavailable,
        ),
        ("StatusCode.INTERNAL", "Stub process 'img2img_0_1' is not healthy.", ServerUnavailable),
        ("StatusCode.INTERNAL", "CUDA out of memory", ServerError),
        ("StatusCode.UNKNOWN", "Stream removed", ServerError),
        ("StatusCode.UNAUTHENTICATED", "missing bearer token", ServerError),
        ("StatusCode.CANCELLED", "Locally cancelled by application!", ServerError),
        (None, "something odd", ServerError),
    ],
)
def test_status_maps_to_type(status: str | None, message: str, expected: type) -> None:
    error = from_triton(InferenceServerException(message, status=status))
    assert type(error) is expected
    assert isinstance(error, EditError)
    assert error.status == status
    assert message in str(error)


def test_only_unavailable_is_retryable() -> None:
    assert ServerUnavailable.retryable
    for error_type in (InvalidArgument, DeadlineExceeded, ModelNotFound, ServerError):
        assert not error_type.retryable


def test_unknown_model_message_names_the_model() -> None:
    raw = InferenceServerException(
        "Request for unknown model: 'img2img' is not found", status="StatusCode.UNAVAILABLE"
    )
    error = from_triton(raw, model="img2img")
    assert isinstance(error, ModelNotFound)
    assert str(error).startswith("model 'img2img' is not served")


def test_server_side_contract_error_keeps_the_field_and_message() -> None:
    # An edit model's refusal with the contract's message (the same message the client
    # would have produced), wrapped as Triton wraps the error of a Python model's execute.
    contract_message = "temperature=1.5 is out of range: allowed 0.1..1"
    raw = InferenceServerException(
        f"Failed to process the request(s) for model 'img2img_0_0', message: {contract_message}",
        status="StatusCode.INVALID_ARGUMENT",
    )
    error = from_triton(raw)
    assert isinstance(error, InvalidArgument)
    assert isinstance(error, contract.InvalidArgumentError)
    assert error.field == "temperature"
    assert str(error) == contract_message
    assert error.status == "StatusCode.INVALID_ARGUMENT"


def test_contract_error_reported_as_internal_is_still_invalid_argument() -> None:
    raw = InferenceServerException(
        "Failed to process the request(s) for model 'instruct_pix2pix_0_0', message: "
        "InvalidArgumentError: scheduler='heun' is not supported: allowed one of "
        + ", ".join(contract.SCHEDULERS),
        status="StatusCode.INTERNAL",
    )
    error = from_triton(raw)
    assert isinstance(error, InvalidArgument)
    assert error.field == "scheduler"
    assert str(error).startswith("scheduler='heun' is not supported")


def test_tritons_own_input_check_names_the_tensor() -> None:
    raw = InferenceServerException(
        "[request id: <id_unknown>] unexpected shape for input 'seed' for model "
        "'instruct_pix2pix'. Expected [1], got [2]",
        status="StatusCode.INVALID_ARGUMENT",
    )
    error = from_triton(raw)
    assert isinstance(error, InvalidArgument)
    assert error.field == "seed"


def test_invalid_argument_without_a_known_field() -> None:
    raw = InferenceServerException("malformed request", status="StatusCode.INVALID_ARGUMENT")
    error = from_triton(raw)
    assert isinstance(error, InvalidArgument)
    assert error.field == "request"
    assert str(error) == "malformed request"


def test_image_decode_failure_on_the_server_is_invalid_argument() -> None:
    raw = InferenceServerException(
        "image=b'\\x89PNG\\r\\n' is not a decodable image: allowed encoded PNG, JPEG or WebP bytes",
        status="StatusCode.INVALID_ARGUMENT",
    )
    error = from_triton(raw)
    assert error.field == "image"
