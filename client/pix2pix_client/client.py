"""The synchronous client: one edit at a time over Triton's gRPC API."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from pix2pix_client import contract
from pix2pix_client.errors import InvalidArgument, ModelNotFound, from_triton
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


class EditClient:
    """Edits images with the "instruct_pix2pix" and "img2img" models served by Triton.

    `url` is Triton's gRPC endpoint, "host:port". With `ssl=True` the channel uses TLS;
    `root_certificates`, `private_key` and `certificate_chain` are PEM file paths passed
    to tritonclient. `headers` (for example {"authorization": "Bearer ..."}) go with every
    call; `admin_key` opens the server's restricted APIs (`models()` needs it). Calls
    that fail because the server is unavailable, busy or replacing a model are retried
    `retries` times with exponential backoff starting at `backoff_s`; no other error is
    retried. `timeout_s` is the default overall deadline of a call, retries included.

    Use it as a context manager, or call close() when done.
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
        self._triton = triton_grpc.InferenceServerClient(
            url, **tls_arguments(ssl, root_certificates, private_key, certificate_chain)
        )

    def edit(
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
        """Edits `image` following `prompt` and returns the result.

        `image` is a path, encoded image bytes, a PIL image or a uint8 numpy array
        (HxW, HxWx3 or HxWx4). Inputs left as None are not sent and take the server's
        defaults (see contract.PARAMETERS); the server picks the seed when none is given
        and returns it. `image_guidance_scale` exists for "instruct_pix2pix" only.
        `timeout_s` overrides the client's default deadline for this call.

        Raises InvalidArgument before sending anything when an input is outside the
        contract, and the other EditError types for what the server answers.
        """
        encoded, parameters = prepare_request(
            model,
            image,
            prompt,
            {
                "negative_prompt": negative_prompt,
                "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale,
                "image_guidance_scale": image_guidance_scale,
                "temperature": temperature,
                "seed": seed,
                "scheduler": scheduler,
            },
        )
        inputs, outputs = build_inputs(encoded, parameters)
        attempts = 0
        latency_s = 0.0

        def infer(client_timeout: float | None) -> Any:
            nonlocal attempts, latency_s
            attempts += 1
            started = time.perf_counter()
            response = self._triton.infer(
                model,
                inputs,
                outputs=outputs,
                headers=self.headers,
                client_timeout=client_timeout,
            )
            latency_s = time.perf_counter() - started
            return response

        response = self._call(infer, timeout_s, model=model)
        return read_result(
            response, model=model, parameters=parameters, latency_s=latency_s, attempts=attempts
        )

    def health(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """The server's liveness and readiness, and whether each edit model is ready.

        Returns {"live": bool, "ready": bool, "models": {pipeline: bool}}. Raises
        ServerUnavailable when the server cannot be reached.
        """
        live = self._call(
            lambda t: self._triton.is_server_live(headers=self.headers, client_timeout=t),
            timeout_s,
        )
        ready = self._call(
            lambda t: self._triton.is_server_ready(headers=self.headers, client_timeout=t),
            timeout_s,
        )
        return {
            "live": bool(live),
            "ready": bool(ready),
            "models": {name: self._model_ready(name, timeout_s) for name in contract.PIPELINES},
        }

    def models(self, *, timeout_s: float | None = None) -> list[dict[str, str]]:
        """The server's model repository index: one {"name", "version", "state",
        "reason"} entry per model version known to the server."""
        index = self._call(
            lambda t: self._triton.get_model_repository_index(
                headers=self.headers, as_json=True, client_timeout=t
            ),
            timeout_s,
        )
        return repository_entries(index)

    def close(self) -> None:
        """Closes the gRPC channel; the client cannot be used afterwards."""
        self._triton.close()

    def __enter__(self) -> EditClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _model_ready(self, name: str, timeout_s: float | None) -> bool:
        try:
            return bool(
                self._call(
                    lambda t: self._triton.is_model_ready(
                        name, headers=self.headers, client_timeout=t
                    ),
                    timeout_s,
                    model=name,
                )
            )
        except ModelNotFound:
            return False

    def _call(
        self,
        attempt: Callable[[float | None], T],
        timeout_s: float | None,
        *,
        model: str | None = None,
    ) -> T:
        """Runs `attempt(client_timeout)` with the retry policy, mapping Triton's errors."""
        deadline = Deadline(self.timeout_s if timeout_s is None else timeout_s)
        delays = self.retry_policy.delays()
        while True:
            try:
                return attempt(deadline.remaining())
            except InferenceServerException as raw:
                error = from_triton(raw, model=model)
            wait_s = next(delays, None) if error.retryable else None
            if wait_s is None or not deadline.allows(wait_s):
                raise error from None
            time.sleep(wait_s)


def tls_arguments(
    ssl: bool,
    root_certificates: str | Path | None,
    private_key: str | Path | None,
    certificate_chain: str | Path | None,
) -> dict[str, Any]:
    """tritonclient's TLS keyword arguments, with the PEM files checked to be readable."""
    files = {
        "root_certificates": root_certificates,
        "private_key": private_key,
        "certificate_chain": certificate_chain,
    }
    given = {name: path for name, path in files.items() if path is not None}
    if given and not ssl:
        raise InvalidArgument(
            next(iter(given)), f"{', '.join(given)} given without ssl=True: allowed with TLS only"
        )
    for name, path in given.items():
        if not Path(path).is_file():
            raise InvalidArgument(name, f"{name}={str(path)!r} is not a readable file")
    return {"ssl": ssl, **{name: str(path) for name, path in given.items()}}


def repository_entries(index: dict[str, Any] | None) -> list[dict[str, str]]:
    """Normalises Triton's JSON repository index (which omits empty fields)."""
    return [
        {key: str(entry.get(key, "")) for key in ("name", "version", "state", "reason")}
        for entry in (index or {}).get("models", [])
    ]
