"""The synchronous client: edits over Triton's gRPC API, whole or streamed."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, Unpack

import tritonclient.grpc as triton_grpc
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


def events_callback(events: queue.Queue[tuple[Any, Any]]) -> Callable[[Any, Any], None]:
    """A stream callback that hands every (result, error) to the iterating thread."""
    return lambda result, error: events.put((result, error))


class EditClient:
    """Edits images with the "instruct_pix2pix" and "img2img" models served by Triton.

    `url` is Triton's gRPC endpoint, "host:port" (a server or a load balancer), or several
    servers' ("a:8001,b:8001" or a list): a call that fails transiently on one goes to the
    next. The other arguments are in `ConnectionOptions`: TLS, headers, the admin key,
    retries and the default deadline. Use it as a context manager, or call close().
    """

    def __init__(
        self, url: str | Sequence[str] = DEFAULT_URL, **options: Unpack[ConnectionOptions]
    ) -> None:
        self.connection = Connection.from_options(url, options)
        self._tritons: dict[int, triton_grpc.InferenceServerClient] = {}

    @property
    def url(self) -> str:
        return ",".join(self.connection.urls)

    def edit(
        self,
        image: ImageInput,
        prompt: str,
        *,
        model: str = DEFAULT_MODEL,
        timeout_s: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        **options: Unpack[EditOptions],
    ) -> EditResult:
        """Edits `image` following `prompt` and returns the result.

        `image` is a path, encoded image bytes, a PIL image or a uint8 numpy array
        (HxW, HxWx3 or HxWx4). Inputs left out are not sent and take the server's
        defaults (see contract.PARAMETERS); the server picks the seed when none is given
        and returns it. `image_guidance_scale` exists for "instruct_pix2pix" only.
        `timeout_s` overrides the client's default deadline for this call. With
        `on_progress`, the edit is streamed and the callable gets every Progress event.

        Raises InvalidArgument before sending anything when an input is outside the
        contract, and the other EditError types for what the server answers.
        """
        if on_progress is not None:
            for event in self.edit_stream(
                image, prompt, model=model, timeout_s=timeout_s, **options
            ):
                if isinstance(event, EditResult):
                    return event
                on_progress(event)
        encoded, parameters = prepare_request(model, image, prompt, dict(options))
        inputs, outputs = build_inputs(encoded, parameters)
        attempts = 0
        latency_s = 0.0

        def infer(triton: triton_grpc.InferenceServerClient, client_timeout: float | None) -> Any:
            nonlocal attempts, latency_s
            attempts += 1
            started = time.perf_counter()
            response = triton.infer(
                model,
                inputs,
                outputs=outputs,
                headers=self.connection.headers,
                client_timeout=client_timeout,
            )
            latency_s = time.perf_counter() - started
            return response

        response = self._call(infer, timeout_s, model=model)
        return read_result(
            response, model=model, parameters=parameters, latency_s=latency_s, attempts=attempts
        )

    def edit_stream(
        self,
        image: ImageInput,
        prompt: str,
        *,
        model: str = DEFAULT_MODEL,
        timeout_s: float | None = None,
        **options: Unpack[StreamOptions],
    ) -> Iterator[Event]:
        """Edits `image` on the pipeline's streaming model: yields a Progress event per
        denoising step (with a preview every `preview_every` steps), then the EditResult.

        Leaving the iteration early (break, an exception, the iterator garbage collected)
        cancels the server's work. Retries happen only before the first event. The
        inputs are checked at once, before the first `next()`.
        """
        encoded, parameters = prepare_request(model, image, prompt, dict(options), streaming=True)
        inputs, outputs = build_inputs(encoded, parameters, streaming=True)
        return self._stream(model, inputs, outputs, parameters, self.connection.deadline(timeout_s))

    def health(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """The server's liveness and readiness, and whether each edit model is ready.

        Returns {"live": bool, "ready": bool, "models": {pipeline: bool}}. Raises
        ServerUnavailable when the server cannot be reached.
        """
        headers = self.connection.headers
        live = self._call(
            lambda c, t: c.is_server_live(headers=headers, client_timeout=t), timeout_s
        )
        ready = self._call(
            lambda c, t: c.is_server_ready(headers=headers, client_timeout=t), timeout_s
        )
        return {
            "live": bool(live),
            "ready": bool(ready),
            "models": {name: self._model_ready(name, timeout_s) for name in contract.PIPELINES},
        }

    def models(self, *, timeout_s: float | None = None) -> list[dict[str, str]]:
        """The server's model repository index: one {"name", "version", "state",
        "reason"} entry per model version known to the server (needs the admin key)."""
        index = self._call(
            lambda c, t: c.get_model_repository_index(
                headers=self.connection.headers, as_json=True, client_timeout=t
            ),
            timeout_s,
        )
        return repository_entries(index)

    def close(self) -> None:
        """Closes the gRPC channels; the client cannot be used afterwards."""
        for triton in self._tritons.values():
            triton.close()
        self._tritons.clear()

    def __enter__(self) -> EditClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _triton(self, index: int) -> triton_grpc.InferenceServerClient:
        if index not in self._tritons:
            self._tritons[index] = triton_grpc.InferenceServerClient(
                self.connection.urls[index], **self.connection.tls
            )
        return self._tritons[index]

    def _model_ready(self, name: str, timeout_s: float | None) -> bool:
        try:
            return bool(
                self._call(
                    lambda c, t: c.is_model_ready(
                        name, headers=self.connection.headers, client_timeout=t
                    ),
                    timeout_s,
                    model=name,
                )
            )
        except ModelNotFound:
            return False

    def _call(
        self,
        attempt: Callable[[triton_grpc.InferenceServerClient, float | None], T],
        timeout_s: float | None,
        *,
        model: str | None = None,
    ) -> T:
        """Runs `attempt(client, client_timeout)` on the addresses in turn, with the retry
        policy, mapping Triton's errors to the client's."""
        deadline = self.connection.deadline(timeout_s)
        error: EditError | None = None
        for index, wait_s in self.connection.attempts():
            if error is not None:
                if not deadline.allows(wait_s):
                    break
                time.sleep(wait_s)
            try:
                result = attempt(self._triton(index), deadline.remaining())
            except InferenceServerException as raw:
                error = from_triton(raw, model=model)
                if not error.retryable:
                    break
                continue
            self.connection.preferred = index
            return result
        assert error is not None
        raise error from None

    def _stream(
        self,
        model: str,
        inputs: list[triton_grpc.InferInput],
        outputs: list[triton_grpc.InferRequestedOutput],
        parameters: dict[str, Any],
        deadline: Deadline,
    ) -> Iterator[Event]:
        error: EditError | None = None
        for attempts, (index, wait_s) in enumerate(self.connection.attempts(), start=1):
            if error is not None:
                if not deadline.allows(wait_s):
                    break
                time.sleep(wait_s)
            started = time.perf_counter()
            events: queue.Queue[tuple[Any, Any]] = queue.Queue()
            # tritonclient holds one stream per client: every stream gets its own.
            triton = triton_grpc.InferenceServerClient(
                self.connection.urls[index], **self.connection.tls
            )
            received = 0
            answered = False
            try:
                triton.start_stream(
                    callback=events_callback(events),
                    stream_timeout=deadline.remaining(),
                    headers={**(self.connection.headers or {}), **STREAM_ERROR_HEADER},
                )
                triton.async_stream_infer(
                    contract.stream_model(model),
                    inputs,
                    outputs=outputs,
                    enable_empty_final_response=True,
                )
                while True:
                    result, raw = events.get()
                    if raw is not None:
                        raise from_triton(raw, model=contract.stream_model(model))
                    event = read_event(
                        result,
                        model=model,
                        parameters=parameters,
                        latency_s=time.perf_counter() - started,
                        attempts=attempts,
                    )
                    received += 1
                    self.connection.preferred = index
                    answered = answers(event, result)
                    yield event
                    if answered:
                        return
            except EditError as failure:
                if received or not failure.retryable:
                    raise
                error = failure
            finally:
                # Cancels the server's work when the caller left early. An answered
                # stream is closed, not cancelled: tritonserver 2.51 now and then keeps
                # a model live for good when a stream is cancelled as it ends.
                triton.stop_stream(cancel_requests=not answered)
                triton.close()
        assert error is not None
        raise error
