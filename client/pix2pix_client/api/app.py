"""The gateway's routes: OpenAI's image edits and model list over AsyncEditClient.

`POST /v1/images/edits` runs its `n` edits concurrently on the unary models (the
server's dynamic batcher merges their UNet calls), or, with `stream=true`, one edit on
the streaming model, sending the latent previews as partial images. A client that goes
away cancels the edits: the server's loop stops within one denoising step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from pix2pix_client import contract
from pix2pix_client.aio import AsyncEditClient
from pix2pix_client.api import DEFAULT_MAX_IMAGE_SIDE, DEFAULT_MAX_N
from pix2pix_client.api.errors import ApiError, from_edit_error, incident, invalid
from pix2pix_client.api.form import MODEL_IDS, EditForm, FormReader
from pix2pix_client.api.guard import Guard, error_response
from pix2pix_client.api.multipart import read_form
from pix2pix_client.api.output import (
    encoded,
    fit_to_size,
    picture_size,
    server_sent_comment,
    server_sent_event,
    size_text,
    usage,
)
from pix2pix_client.errors import EditError
from pix2pix_client.request import EditResult, Progress

logger = logging.getLogger("pix2pix_client.api")

T = TypeVar("T")
HEALTH_TIMEOUT_S = 5.0
# Answered to a client that left; it never reads it (nginx's "client closed request").
CLIENT_GONE = 499
OWNER = "pix2pix"


class ClientDisconnected(Exception):
    """The HTTP client went away before its answer was ready."""


def build_app(
    client: AsyncEditClient,
    *,
    api_key: str | None = None,
    max_n: int = DEFAULT_MAX_N,
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
) -> ASGIApp:
    """The gateway over `client`: OpenAI's routes under /v1 behind the API key (when one
    is given), and /health for probes."""
    gateway = Gateway(client, FormReader(max_n=max_n, max_image_side=max_image_side))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.close()

    app = Starlette(
        routes=[
            Route("/v1/images/edits", _answering(gateway.edits), methods=["POST"]),
            Route("/v1/models", _answering(gateway.models), methods=["GET"]),
            Route("/v1/models/{model}", _answering(gateway.model), methods=["GET"]),
            Route("/health", _answering(gateway.health), methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )
    return Guard(app, api_key=api_key)


class Gateway:
    """The handlers, around one AsyncEditClient (one gRPC channel for every request)."""

    def __init__(self, client: AsyncEditClient, reader: FormReader) -> None:
        self.client = client
        self.reader = reader
        self.created = int(time.time())

    async def edits(self, request: Request) -> Response:
        """POST /v1/images/edits: OpenAI's image edit, as JSON or server-sent events."""
        created = int(time.time())
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise ApiError(
                400,
                f"the body is {content_type or 'untyped'}: allowed multipart/form-data, the "
                "form OpenAI's SDK sends",
                code="invalid_content_type",
            )
        form = await read_form(request)
        try:
            edit = await self.reader.read(form)
        finally:
            await form.close()
        if edit.size is not None:
            try:
                image = await asyncio.to_thread(fit_to_size, edit.image, edit.size)
            except contract.InvalidArgumentError as error:
                raise invalid(error) from None
            edit = dataclasses.replace(edit, image=image)
        if edit.stream:
            return await self._stream(request, edit, created)
        results = await until_disconnected(self._edit_all(edit), request.receive)
        images = await asyncio.to_thread(
            lambda: [encoded(r.png, edit.output_format, edit.output_compression) for r in results]
        )
        size = results[0].image.size
        return JSONResponse(
            {
                "created": created,
                "data": [
                    {"b64_json": image, "seed": result.seed}
                    for image, result in zip(images, results, strict=True)
                ],
                "background": "opaque",
                "output_format": edit.output_format,
                "size": size_text(size),
                "usage": usage(size, len(results)),
            }
        )

    async def models(self, request: Request) -> Response:
        """GET /v1/models: the pipelines the server has ready, as OpenAI's model list."""
        return JSONResponse({"object": "list", "data": await self._ready_models()})

    async def model(self, request: Request) -> Response:
        """GET /v1/models/{model}: one of them, or 404."""
        wanted = request.path_params["model"]
        for entry in await self._ready_models():
            if entry["id"] == wanted:
                return JSONResponse(entry)
        raise ApiError(
            404,
            f"model {wanted!r} is not served right now: ready are the ones /v1/models lists",
            param="model",
            code="model_not_found",
        )

    async def health(self, request: Request) -> Response:
        """GET /health, for probes: 200 when the server is ready and serves an edit model."""
        health = await self.client.health(timeout_s=HEALTH_TIMEOUT_S)
        ready = health["live"] and health["ready"] and any(health["models"].values())
        models = {MODEL_IDS[name]: state for name, state in health["models"].items()}
        return JSONResponse({**health, "models": models}, status_code=200 if ready else 503)

    async def _ready_models(self) -> list[dict[str, Any]]:
        health = await self.client.health(timeout_s=HEALTH_TIMEOUT_S)
        return [
            {"id": MODEL_IDS[name], "object": "model", "created": self.created, "owned_by": OWNER}
            for name, ready in health["models"].items()
            if ready
        ]

    async def _edit_all(self, edit: EditForm) -> list[EditResult]:
        """The `n` edits at once; the first failure cancels the others."""
        tasks = [
            asyncio.ensure_future(
                self.client.edit(
                    edit.image, edit.prompt, model=edit.pipeline, **edit.options_for(index)
                )
            )
            for index in range(edit.n)
        ]
        try:
            return await asyncio.gather(*tasks)
        except EditError as error:
            raise from_edit_error(error, edit.model) from None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream(self, request: Request, edit: EditForm, created: int) -> Response:
        """The edit's events; the stream's first event is awaited before answering, so
        that a refusal still gets its own status (400, 503) instead of an error event."""
        options = dict(edit.options)
        if edit.partial_images:
            options["preview_every"] = preview_every(edit)
        events = self.client.edit_stream(edit.image, edit.prompt, model=edit.pipeline, **options)
        try:
            first = await until_disconnected(anext(events), request.receive)
        except EditError as error:
            raise from_edit_error(error, edit.model) from None
        except BaseException:
            await events.aclose()
            raise
        return EventStream(_edit_events(edit, created, first, events))


def preview_every(edit: EditForm) -> int:
    """Steps between previews, so that `partial_images` of them spread evenly over the
    steps the edit runs: N x temperature of them (the server's first_step rule)."""
    steps = edit.options.get(
        "num_inference_steps",
        contract.PARAMETERS_BY_NAME["num_inference_steps"].default_for(edit.pipeline),
    )
    temperature = edit.options.get(
        "temperature", contract.PARAMETERS_BY_NAME["temperature"].default_for(edit.pipeline)
    )
    denoised = max(min(int(steps * temperature), steps), 1)
    return max(1, math.ceil(denoised / (edit.partial_images + 1)))


async def _edit_events(
    edit: EditForm,
    created: int,
    first: Progress | EditResult,
    events: AsyncGenerator[Progress | EditResult, None],
) -> AsyncGenerator[bytes, None]:
    """OpenAI's stream: `image_edit.partial_image` for the first `partial_images` previews
    before the last step, then `image_edit.completed`; a comment per step in between."""
    common = {
        "created_at": created,
        "background": "opaque",
        "output_format": edit.output_format,
        "quality": "auto",
    }
    sent = 0
    event = first
    async with contextlib.aclosing(events):
        try:
            while isinstance(event, Progress):
                yield server_sent_comment(f"step {event.step}/{event.num_steps}")
                preview = event.preview_png
                if (
                    preview is not None
                    and sent < edit.partial_images
                    and event.step < event.num_steps
                ):
                    image = await asyncio.to_thread(
                        encoded, preview, edit.output_format, edit.output_compression
                    )
                    yield server_sent_event(
                        "image_edit.partial_image",
                        {
                            "type": "image_edit.partial_image",
                            "b64_json": image,
                            "partial_image_index": sent,
                            "size": size_text(picture_size(preview)),
                            "seed": event.seed,
                            **common,
                        },
                    )
                    sent += 1
                event = await anext(events)
            image = await asyncio.to_thread(
                encoded, event.png, edit.output_format, edit.output_compression
            )
            yield server_sent_event(
                "image_edit.completed",
                {
                    "type": "image_edit.completed",
                    "b64_json": image,
                    "size": size_text(event.image.size),
                    "seed": event.seed,
                    "usage": usage(event.image.size, 1),
                    **common,
                },
            )
        except EditError as error:
            yield _error_event(from_edit_error(error, edit.model))
        except Exception as error:
            yield _error_event(incident(error))


def _error_event(error: ApiError) -> bytes:
    # OpenAI's SDK raises APIError for an event whose data has an "error" key.
    return server_sent_event("error", {"type": "error", **error.body()})


class EventStream(Response):
    """A text/event-stream response that stops producing (and so cancels the edit) as
    soon as the client disconnects, whether or not an event is due."""

    def __init__(self, chunks: AsyncGenerator[bytes, None]) -> None:
        # No Content-Length: the stream's length is not known before it ends.
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            # nginx passes events on as they come instead of buffering them.
            (b"x-accel-buffering", b"no"),
        ]
        self.chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def produce() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async with contextlib.aclosing(self.chunks):
            with contextlib.suppress(ClientDisconnected):
                await until_disconnected(produce(), receive)


async def until_disconnected(work: Awaitable[T], receive: Receive) -> T:
    """Awaits `work`; if the client disconnects first, cancels it, waits until it has
    stopped, and raises ClientDisconnected."""
    task: asyncio.Future[T] = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()
        await asyncio.wait({task, watcher})
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _answering(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """The handler, its errors answered in OpenAI's shape (500 only for a bug)."""

    async def answer(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as error:
            return error_response(error)
        except HTTPException as error:
            # A malformed form, as Starlette's parser words it.
            return error_response(ApiError(error.status_code, error.detail, code="invalid_request"))
        except (ClientDisconnected, ClientDisconnect):
            logger.info(
                "%s %s: the client left; its edits were cancelled", request.method, request.url.path
            )
            return Response(status_code=CLIENT_GONE)
        except EditError as error:
            return error_response(from_edit_error(error))
        except Exception as error:
            return error_response(incident(error))

    return answer


async def _http_error(request: Request, error: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong method, a malformed form)."""
    assert isinstance(error, HTTPException)
    message = {
        404: f"no route {request.method} {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(error.status_code, error.detail)
    # Starlette's headers: the methods a route allows, with its 405.
    headers = dict(error.headers or {})
    return error_response(
        ApiError(error.status_code, message, code="invalid_request", headers=headers)
    )
