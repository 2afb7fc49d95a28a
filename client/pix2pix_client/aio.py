"""The asyncio client: the same API as EditClient, for many concurrent edits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from pix2pix_client import contract
from pix2pix_client.client import repository_entries, tls_arguments
from pix2pix_client.errors import ModelNotFound, from_triton
from pix2pix_client.images import ImageInput
from pix2pix_client.request import (
    DEFAULT_MODEL,
    DEFAULT_URL,
    Deadline,
    EditResult,
    RetryPolicy,
    build_inputs,
    normalise_headers,
    prepare_request,
    read_result,
)

T = TypeVar("T")


class AsyncEditClient:
    """The asyncio twin of EditClient; the arguments mean the same.

    Edits run concurrently on one gRPC channel: gather as many `edit()` calls as the
    server should see at once. The channel opens on the first call, inside the running
    event loop, so the client may be created outside one. Use `async with`, or await
    close() when done.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        ssl: bool = False,
        root_certificates: str | Path | None = None,
        private_key: str | Path | None = None,
        certificate_chain: str | Path | None = None,
        headers: dict[str, str] | None = None,
        admin_key: str | None = None,
        retries: int = 2,
        backoff_s: float = 0.5,
        timeout_s: float | None = None,
    ) -> None:
        self.url = url
        self.headers = normalise_headers(headers, admin_key)
        self.retry_policy = RetryPolicy(retries=retries, backoff_s=backoff_s)
        Deadline(timeout_s)  # rejects a non-positive default early
        self.timeout_s = timeout_s
        self._tls = tls_arguments(ssl, root_certificates, private_key, certificate_chain)
        self._triton: triton_aio.InferenceServerClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def edit(
        self,
        image: ImageInput,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        scheduler: str | None = None,
        model: str = DEFAULT_MODEL,
        timeout_s: float | None = None,
    ) -> EditResult:
        """Edits `image` following `prompt`; see EditClient.edit for the arguments."""
        options = {
            "negative_prompt": negative_prompt,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "image_guidance_scale": image_guidance_scale,
            "temperature": temperature,
            "seed": seed,
            "scheduler": scheduler,
        }
        # Reading and encoding the image is blocking work: keep it off the event loop.
        encoded, parameters = await asyncio.to_thread(
            prepare_request, model, image, prompt, options
        )
        inputs, outputs = build_inputs(encoded, parameters)
        attempts = 0
        latency_s = 0.0

        async def infer(client_timeout: float | None) -> Any:
            nonlocal attempts, latency_s
            attempts += 1
            started = time.perf_counter()
            response = await self._client().infer(
                model,
                inputs,
                outputs=outputs,
                headers=self.headers,
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

    async def health(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """The server's liveness and readiness, and whether each edit model is ready."""
        live = await self._call(
            lambda t: self._client().is_server_live(headers=self.headers, client_timeout=t),
            timeout_s,
        )
        ready = await self._call(
            lambda t: self._client().is_server_ready(headers=self.headers, client_timeout=t),
            timeout_s,
        )
        models = {name: await self._model_ready(name, timeout_s) for name in contract.PIPELINES}
        return {"live": bool(live), "ready": bool(ready), "models": models}

    async def models(self, *, timeout_s: float | None = None) -> list[dict[str, str]]:
        """The server's model repository index, as EditClient.models."""
        index = await self._call(
            lambda t: self._client().get_model_repository_index(
                headers=self.headers, as_json=True, client_timeout=t
            ),
            timeout_s,
        )
        return repository_entries(index)

    async def close(self) -> None:
        """Closes the gRPC channel; a later call opens a new one."""
        if self._triton is not None:
            triton, self._triton = self._triton, None
            await triton.close()

    async def __aenter__(self) -> AsyncEditClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _client(self) -> triton_aio.InferenceServerClient:
        loop = asyncio.get_running_loop()
        # A gRPC aio channel belongs to the loop it was opened in; a new loop (a second
        # asyncio.run) needs a new channel.
        if self._triton is None or self._loop is not loop:
            self._triton = triton_aio.InferenceServerClient(self.url, **self._tls)
            self._loop = loop
        return self._triton

    async def _model_ready(self, name: str, timeout_s: float | None) -> bool:
        try:
            ready = await self._call(
                lambda t: self._client().is_model_ready(
                    name, headers=self.headers, client_timeout=t
                ),
                timeout_s,
                model=name,
            )
        except ModelNotFound:
            return False
        return bool(ready)

    async def _call(
        self,
        attempt: Callable[[float | None], Awaitable[T]],
        timeout_s: float | None,
        *,
        model: str | None = None,
    ) -> T:
        """Awaits `attempt(client_timeout)` with the retry policy, mapping Triton's errors."""
        deadline = Deadline(self.timeout_s if timeout_s is None else timeout_s)
        delays = self.retry_policy.delays()
        while True:
            try:
                return await attempt(deadline.remaining())
            except InferenceServerException as raw:
                error = from_triton(raw, model=model)
            wait_s = next(delays, None) if error.retryable else None
            if wait_s is None or not deadline.allows(wait_s):
                raise error from None
            await asyncio.sleep(wait_s)
