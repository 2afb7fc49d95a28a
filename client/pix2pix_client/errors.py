"""Exception types of the client, and the mapping from Triton's gRPC errors to them.

Every error the client raises is an `EditError`. `InvalidArgument` is also the contract's
`InvalidArgumentError` (and so a `ValueError`), so code that validates with the contract
and code that calls the client catch the same thing.
"""

from __future__ import annotations

import re

from tritonclient.utils import InferenceServerException

from pix2pix_client import contract


class EditError(Exception):
    """Base class of every error raised by the client.

    `status` is the gRPC status the server or the channel answered with, such as
    "StatusCode.UNAVAILABLE", or None when the error was raised before any request.
    """

    # Whether trying the same request again later may succeed.
    retryable = False

    def __init__(self, message: str, *, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status


class InvalidArgument(EditError, contract.InvalidArgumentError):
    """A request input is missing or outside its allowed values (client- or server-side).

    `field` names the input, for example "num_inference_steps" or "image".
    """

    def __init__(self, field: str, message: str, *, status: str | None = None) -> None:
        contract.InvalidArgumentError.__init__(self, field, message)
        self.status = status

    @classmethod
    def from_contract(cls, error: contract.InvalidArgumentError) -> InvalidArgument:
        """The client's twin of an error raised by the contract's validation."""
        return cls(error.field, str(error))


class ServerUnavailable(EditError):
    """The server could not be reached or is not ready to serve; retrying may help."""

    retryable = True


class DeadlineExceeded(EditError):
    """The request did not complete within its timeout."""


class ModelNotFound(EditError):
    """The server does not serve the requested model (or has no ready version of it)."""


class AccessDenied(EditError):
    """The server restricts this API: it needs the admin key (`admin_key=`)."""


class ServerError(EditError):
    """The server failed the request, or answered something the client cannot read."""


_STATUS_TYPES: dict[str, type[EditError]] = {
    "StatusCode.UNAVAILABLE": ServerUnavailable,
    "StatusCode.DEADLINE_EXCEEDED": DeadlineExceeded,
    "StatusCode.NOT_FOUND": ModelNotFound,
}

# Triton names the offending tensor like this in its own input checks.
_TENSOR_NAME = re.compile(r"input '(?P<field>\w+)'")
# The contract's messages start with the field and end with the allowed values:
# "seed=-1 is out of range: allowed ...", "prompt is required: allowed ...",
# "model='x' is not served: allowed ...", and the server's image checks such as
# "image could not be decoded (PNG: image file is truncated): allowed ...".
_FIELDS = sorted([*contract.PARAMETERS_BY_NAME, "model"], key=len, reverse=True)
# The field opens the message or the clause after Triton's wrapping ("... message: ..."),
# so "for model 'img2img_0_0'" in that wrapping is not taken for one.
_CONTRACT_MESSAGE = re.compile(
    r"(?:^|(?<=, )|(?<=: ))(?P<field>" + "|".join(_FIELDS) + r")[= ].*: allowed ", re.DOTALL
)


def _field_of(message: str) -> str | None:
    match = _CONTRACT_MESSAGE.search(message) or _TENSOR_NAME.search(message)
    return match.group("field") if match else None


def _contract_message(message: str) -> str:
    """The contract's own sentence, without the prefixes Triton adds around it."""
    match = _CONTRACT_MESSAGE.search(message)
    return message[match.start() :] if match else message


def from_triton(error: InferenceServerException, *, model: str | None = None) -> EditError:
    """Maps an InferenceServerException from tritonclient to the client's exception types."""
    status = error.status()
    message = error.message() or str(error)
    lowered = message.lower()

    # Transient whatever the status says: a model that is loading or reloading (its
    # process died and the server replaces it), a model process that just died, a full
    # queue. Checked first, so none of them is taken for a missing model.
    if "no available versions" in lowered or "is not healthy" in lowered:
        return ServerUnavailable(
            f"the server is replacing a model, retry: {message}", status=status
        )
    if "exceeds maximum queue size" in lowered:
        return ServerUnavailable(f"the server is busy, retry: {message}", status=status)
    if "protocol is restricted" in lowered or "api is restricted" in lowered:
        return AccessDenied(
            f"the server restricts this API to its operator: pass the admin key ({message})",
            status=status,
        )
    if "unknown model" in lowered:
        shown = f"model {model!r} is not served: {message}" if model else message
        return ModelNotFound(shown, status=status)

    if status == "StatusCode.INVALID_ARGUMENT":
        return InvalidArgument(
            _field_of(message) or "request", _contract_message(message), status=status
        )

    # A Python backend that raises the contract's error without an error code reports it
    # as INTERNAL; the contract's message format still identifies it as a bad input.
    contract_match = _CONTRACT_MESSAGE.search(message)
    if contract_match:
        return InvalidArgument(
            contract_match.group("field"), _contract_message(message), status=status
        )

    error_type = _STATUS_TYPES.get(status or "", ServerError)
    return error_type(message, status=status)
