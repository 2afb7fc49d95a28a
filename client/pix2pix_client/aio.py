"""The asyncio client: the same API as EditClient, for many concurrent edits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar, Unpack

import grpc
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc._utils import get_error_grpc
from tritonclient.utils import InferenceServerException

from pix2pix_client import contract
from pix2pix_client.connection import DEFAULT_URL, Connection, ConnectionOptions, Deadline
from pix2pix_client.errors import EditError, ModelNotFound, from_triton
from pix2pix_client.images import ImageInput
from pix2pix_client.request import (
    DEFAULT_MODEL,
    STREAM_ERROR_HEADER,
    EditOptions,
    EditResult,
    Progress,
    StreamOptions,
    answers,
    build_inputs,
    prepare_request,
    read_event,
    read_result,
    repository_entries,
)

T = TypeVar("T")
Event = Progress | EditResult


class AsyncEditClient:
    """The asyncio twin of EditClient; the arguments mean the same.

    Edits run concurrently on one gRPC channel per address: gather as many `edit()` calls
    as the server should see at once. Channels open on first use, inside the running
    event loop, so the client may be created outside one. Use `async with`, or await
    close() when done.
    """

    def __init__(
        self, url: str | Sequence[str] = DEFAULT_URL, **options: Unpack[ConnectionOptions]
    ) -> None:
        self.connection = Connection.from_options(url, options)
        self._tritons: dict[int, triton_aio.InferenceServerClient] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return ",".join(self.connection.urls)

    async def edit(
        self,
        image: ImageInput,
        prompt: str,
        *,
        model: str = DEFAULT_MODEL,
        timeout_s: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        **options: Unpack[EditOptions],
    ) -> EditResult:
        """Edits `image` following `prompt`; see EditClient.edit for the arguments."""
        if on_progress is not None:
            async for event in self.edit_stream(
                image, prompt, model=model, timeout_s=timeout_s, **options
            ):
                if isinstance(event, EditResult):
                    return event
                on_progress(event)
        # Reading and encoding the image is blocking work: keep it off the event loop.
        encoded, parameters = await asyncio.to_thread(
            prepare_request, model, image, prompt, dict(options)
        )
        inputs, outputs = build_inputs(encoded, parameters)
        attempts = 0
        latency_s = 0.0

        async def infer(
            triton: triton_aio.InferenceServerClient, client_timeout: float | None
        ) -> Any:
            nonlocal attempts, latency_s
            attempts += 1
            started = time.perf_counter()
            response = await triton.infer(
                model,
                inputs,
                outputs=outputs,
                headers=self.connection.headers,
                client_timeout=client_timeout,
            )
            latency_s = time.perf_counter() - started
            return response

        response = await self._call(infer, timeout_s, model=model)
        return await asyncio.to_thread(
            read_result,
            response,
            model=model,
            parameters=parameters,
            latency_s=latency_s,
            attempts=attempts,
        )

    async def edit_stream(
        self,
        image: ImageInput,
        prompt: str,
        *,
        model: str = DEFAULT_MODEL,
        timeout_s: float | None = None,
        **options: Unpack[StreamOptions],
    ) -> AsyncIterator[Event]:
        """The asyncio twin of EditClient.edit_stream: an async iterator of Progress
        events, then the EditResult. Cancelling the task that iterates (or leaving the
        iteration early) cancels the server's work."""
        encoded, parameters = await asyncio.to_thread(
            prepare_request, model, image, prompt, dict(options), True
        )
        inputs, outputs = build_inputs(encoded, parameters, streaming=True)
        deadline = self.connection.deadline(timeout_s)
        error: EditError | None = None
        for attempts, (index, wait_s) in enumerate(self.connection.attempts(), start=1):
            if error is not None:
                if not deadline.allows(wait_s):
                    break
                await asyncio.sleep(wait_s)
            received = 0
            try:
                async for event in self._stream_once(
                    index, model, inputs, outputs, parameters, deadline, attempts
                ):
                    received += 1
                    yield event
                return
            except EditError as failure:
                if received or not failure.retryable:
                    raise
                error = failure
        assert error is not None
        raise error

    async def health(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """The server's liveness and readiness, and whether each edit model is ready."""
        headers = self.connection.headers
        live = await self._call(
            lambda c, t: c.is_server_live(headers=headers, client_timeout=t), timeout_s
        )
        ready = await self._call(
            lambda c, t: c.is_server_ready(headers=headers, client_timeout=t), timeout_s
        )
        models = {name: await self._model_ready(name, timeout_s) for name in contract.PIPELINES}
        return {"live": bool(live), "ready": bool(ready), "models": models}

    async def models(self, *, timeout_s: float | None = None) -> list[dict[str, str]]:
        """The server's model repository index, as EditClient.models."""
        index = await self._call(
            lambda c, t: c.get_model_repository_index(
                headers=self.connection.headers, as_json=True, client_timeout=t
            ),
            timeout_s,
        )
        return repository_entries(index)

    async def close(self) -> None:
        """Closes the gRPC channels; a later call opens new ones."""
        tritons, self._tritons = self._tritons, {}
        for triton in tritons.values():
            await triton.close()

    async def __aenter__(self) -> AsyncEditClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _triton(self, index: int) -> triton_aio.InferenceServerClient:
        loop = asyncio.get_running_loop()
        # A gRPC aio channel belongs to the loop it was opened in; a new loop (a second
        # asyncio.run) needs new channels.
        if self._loop is not loop:
            self._tritons, self._loop = {}, loop
        if index not in self._tritons:
            self._tritons[index] = triton_aio.InferenceServerClient(
                self.connection.urls[index], **self.connection.tls
            )
        return self._tritons[index]

    async def _stream_once(
        self,
        index: int,
        model: str,
        inputs: list[Any],
        outputs: list[Any],
        parameters: dict[str, Any],
        deadline: Deadline,
        attempts: int,
    ) -> AsyncIterator[Event]:
        """One streamed edit on one address; closing it cancels the call."""
        done = asyncio.Event()
        request = {
            "model_name": contract.stream_model(model),
            "inputs": inputs,
            "outputs": outputs,
            "enable_empty_final_response": True,
        }

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield request
            # The request side stays open until the answer is in: a half-closed stream
            # may end before its last response.
            await done.wait()

        started = time.perf_counter()
        responses = self._triton(index).stream_infer(
            requests(),
            stream_timeout=deadline.remaining(),
            headers={**(self.connection.headers or {}), **STREAM_ERROR_HEADER},
        )
        answered = False
        try:
            while True:
                try:
                    result, raw = await responses.__anext__()
                except grpc.RpcError as rpc_error:
                    raw = get_error_grpc(rpc_error)
                except StopAsyncIteration:
                    raise from_triton(
                        InferenceServerException("the stream ended without a result"),
                        model=model,
                    ) from None
                if raw is not None:
                    raise from_triton(raw, model=contract.stream_model(model))
                event = read_event(
                    result,
                    model=model,
                    parameters=parameters,
                    latency_s=time.perf_counter() - started,
                    attempts=attempts,
                )
                self.connection.preferred = index
                answered = answers(event, result)
                yield event
                if answered:
                    return
        finally:
            done.set()
            if answered:
                await _ended(responses)
            else:
                responses.cancel()

    async def _model_ready(self, name: str, timeout_s: float | None) -> bool:
        try:
            ready = await self._call(
                lambda c, t: c.is_model_ready(
                    name, headers=self.connection.headers, client_timeout=t
                ),
                timeout_s,
                model=name,
            )
        except ModelNotFound:
            return False
        return bool(ready)

    async def _call(
        self,
        attempt: Callable[[triton_aio.InferenceServerClient, float | None], Awaitable[T]],
        timeout_s: float | None,
        *,
        model: str | None = None,
    ) -> T:
        """Awaits `attempt(client, client_timeout)` on the addresses in turn, with the
        retry policy, mapping Triton's errors to the client's."""
        deadline = self.connection.deadline(timeout_s)
        error: EditError | None = None
        for index, wait_s in self.connection.attempts():
            if error is not None:
                if not deadline.allows(wait_s):
                    break
                await asyncio.sleep(wait_s)
            try:
                result = await attempt(self._triton(index), deadline.remaining())
            except InferenceServerException as raw:
                error = from_triton(raw, model=model)
                if not error.retryable:
                    break
                continue
            self.connection.preferred = index
            return result
        assert error is not None
        raise error from None


async def _ended(responses: Any) -> None:
    """Waits for the end of an answered stream (its request side closed, the server ends
    it) rather than cancelling it: tritonserver 2.51 now and then keeps a model live for
    good when a stream is cancelled as it ends. Cancelled only if this wait is."""
    try:
        async for _ in responses:
            pass
    except grpc.RpcError:
        pass
    except asyncio.CancelledError:
        responses.cancel()
        raise
