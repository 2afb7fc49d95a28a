"""What is checked before a request's body is read: the API key, and the body's size.

An ASGI middleware in front of the routes under /v1/: a wrong or missing key is a 401
and a body over the limit a 413 before any of it is parsed; a body sent without a
Content-Length is counted as it arrives and refused once it passes the limit.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse

from pix2pix_client import contract
from pix2pix_client.api.errors import ApiError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Room for the form besides the image: the prompts (4 KiB each), the other fields and the
# multipart boundaries and headers.
FORM_ALLOWANCE_BYTES = 1024 * 1024
MAX_BODY_BYTES = contract.MAX_IMAGE_BYTES + FORM_ALLOWANCE_BYTES
GUARDED_PREFIX = "/v1/"


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def body_too_large(size: int | None) -> ApiError:
    shown = f"is {size} bytes" if size is not None else "passed the limit"
    return ApiError(
        413,
        f"the request body {shown}: allowed at most {MAX_BODY_BYTES} bytes (an image of at "
        f"most {contract.MAX_IMAGE_BYTES // (1024 * 1024)} MiB and the form's other fields)",
        param="image",
        code="request_too_large",
    )


class Guard:
    """Refuses requests under /v1/ without the API key (when one is set) and bodies over
    MAX_BODY_BYTES, before the app reads them."""

    def __init__(self, app: ASGIApp, *, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(GUARDED_PREFIX):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        refusal = self._key_refusal(headers.get(b"authorization"))
        if refusal is None:
            refusal = _length_refusal(headers.get(b"content-length"))
        if refusal is not None:
            # Answered before the body is read; HTTP clients read the answer even while
            # they are still sending.
            await error_response(refusal)(scope, receive, send)
            return
        await self.app(scope, _counted(receive), send)

    def _key_refusal(self, authorization: bytes | None) -> ApiError | None:
        if self.api_key is None:
            return None
        headers = {"WWW-Authenticate": 'Bearer realm="pix2pix"'}
        scheme, _, token = (authorization or b"").strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return ApiError(
                401,
                "no API key: send it in the header 'Authorization: Bearer KEY' (OpenAI's SDK "
                "sends its api_key there)",
                code="missing_api_key",
                headers=headers,
            )
        if not hmac.compare_digest(token.strip(), self.api_key):
            return ApiError(
                401, "the API key is not this server's", code="invalid_api_key", headers=headers
            )
        return None


def _length_refusal(content_length: bytes | None) -> ApiError | None:
    if content_length is None:
        return None
    if not content_length.isdigit():
        return ApiError(400, "Content-Length is not a number", code="invalid_request")
    size = int(content_length)
    return body_too_large(size) if size > MAX_BODY_BYTES else None


def _counted(receive: Receive) -> Receive:
    """`receive` that raises a 413 ApiError once the body passes MAX_BODY_BYTES."""
    received = 0

    async def counted() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                raise body_too_large(None)
        return message

    return counted
