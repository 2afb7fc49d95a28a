"""What the Python backend models share (imported inside tritonserver only).

Errors: every failure a model answers with is one line with a Triton error code. Bad
input is INVALID_ARG naming the field; a component that is down or restarting, and a
server that is shutting down, are UNAVAILABLE (clients retry, elsewhere or later); a
cancelled edit is CANCELLED; anything else is INTERNAL with an incident id, and its
traceback goes to the server log only.
"""

from __future__ import annotations

import json
import secrets
import traceback
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from pix2pix_client.contract import InvalidArgumentError


def config_parameters(args: dict[str, str]) -> dict[str, str]:
    """The `parameters` block of the model's config.pbtxt as plain strings."""
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def as_numpy(tensor: Any) -> np.ndarray:
    """A tensor's data on the CPU, whether it arrived in CPU or GPU memory."""
    if tensor.is_cpu():
        return tensor.as_numpy()
    from torch.utils.dlpack import from_dlpack

    return from_dlpack(tensor.to_dlpack()).cpu().numpy()


class Refusal(Exception):
    """A request this model answers with an error code other than INTERNAL."""

    # The name of the TritonError code: pb_utils binds them only once the stub runs.
    code = "INTERNAL"


class Unavailable(Refusal):
    """The server cannot do the edit now (restarting component, shutdown): retry."""

    code = "UNAVAILABLE"


class Cancelled(Refusal):
    """The caller gave up on the request (cancelled, deadline passed, disconnected)."""

    code = "CANCELLED"


# What Triton says of a model whose process died, hung, is reloading or is stopping.
_DOWN_SIGNS = (
    "not healthy",
    "health mutex",
    "is not ready",
    "no available versions",
    "server not ready",
    "server is stopping",
)


def raise_for_component(model: str, error: Any) -> None:
    """Raises the right exception for an error a BLS call to a component returned."""
    message = error.message()
    first_line = message.strip().splitlines()[0] if message.strip() else "no message"
    if error.code() == pb_utils.TritonError.CANCELLED:
        raise Cancelled(f"{model}: the request was cancelled")
    if error.code() in (pb_utils.TritonError.UNAVAILABLE, pb_utils.TritonError.NOT_FOUND) or any(
        sign in message.lower() for sign in _DOWN_SIGNS
    ):
        raise Unavailable(f"{model} is restarting or unavailable, retry: {first_line}")
    raise RuntimeError(f"{model} failed: {first_line}")


def error_response(error: Exception, model: str) -> Any:
    """The response for a failed request: the right code and a one-line message."""
    if isinstance(error, InvalidArgumentError):
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)
        )
    if isinstance(error, Refusal):
        code = getattr(pb_utils.TritonError, error.code)
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), code))
    incident = secrets.token_hex(4)
    pb_utils.Logger.log_error(
        f"{model}: internal error {incident}:\n{''.join(traceback.format_exception(error))}"
    )
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(
            f"{model} failed: internal error {incident} ({type(error).__name__}); "
            "the server log has the details",
            pb_utils.TritonError.INTERNAL,
        )
    )
