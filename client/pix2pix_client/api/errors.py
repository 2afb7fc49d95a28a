"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and the
HTTP status each of the client library's errors becomes."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from pix2pix_client import contract
from pix2pix_client.errors import (
    DeadlineExceeded,
    EditError,
    InvalidArgument,
    ModelNotFound,
    ServerUnavailable,
)

logger = logging.getLogger("pix2pix_client.api")

# Seconds a client waits before it retries a busy or unavailable server (OpenAI's SDK
# honours the header).
RETRY_AFTER_S = 2


class ApiError(Exception):
    """An answer other than the edit: an HTTP status and OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(error: contract.InvalidArgumentError) -> ApiError:
    """A 400 naming the field, in the contract's words."""
    return ApiError(400, str(error), param=error.field, code="invalid_value")


def from_edit_error(error: EditError, model_id: str | None = None) -> ApiError:
    """What the HTTP client is told about an error of the client library."""
    if isinstance(error, InvalidArgument):
        return invalid(error)
    if isinstance(error, ServerUnavailable):
        logger.warning("the server is unavailable: %s", " ".join(str(error).split()))
        # The server's own words may name its addresses: the log has them.
        state = (
            "is busy: every edit slot is taken"
            if "busy" in str(error)
            else "is unavailable (starting, draining or down)"
        )
        return ApiError(
            503,
            f"the edit server {state}; retry in {RETRY_AFTER_S} s",
            code="server_unavailable",
            type="server_error",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(error, DeadlineExceeded):
        return ApiError(
            504,
            "the edit server did not answer within the gateway's deadline",
            code="timeout",
            type="server_error",
        )
    if isinstance(error, ModelNotFound):
        shown = f"model {model_id!r}" if model_id else "the model"
        return ApiError(
            404,
            f"{shown} is not served by the edit server right now",
            param="model",
            code="model_not_found",
        )
    # INTERNAL from the server, or an answer the client cannot read: a bug of this project.
    return incident(error)


def incident(error: BaseException) -> ApiError:
    """A 500 for a bug: an incident id for the client, the traceback for the log only."""
    incident_id = secrets.token_hex(6)
    logger.error("incident %s: %s", incident_id, error, exc_info=error)
    return ApiError(
        500,
        f"the gateway failed (incident {incident_id}); its log has the details",
        code="internal_error",
        type="server_error",
    )
