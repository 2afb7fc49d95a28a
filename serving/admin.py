"""The operator's side of a running tritonserver: readiness and model control.

Model control (load, unload) is one of Triton's restricted APIs: the admin key opens it.
Every call opens a short-lived HTTP connection on loopback, so a call never blocks on a
connection that a dead server left behind.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pix2pix_client.contract import ADMIN_GRPC_HEADER, ADMIN_HEADER


def new_admin_key() -> str:
    """A key for one server's run: hexadecimal, so that it never starts with "-" and is
    read as a value on any command line (`--admin-key KEY`)."""
    return secrets.token_hex(24)


class AdminClient:
    """Readiness and model control of one tritonserver, over its HTTP endpoint."""

    def __init__(self, http_url: str, admin_key: str) -> None:
        self.http_url = http_url
        self.admin_key = admin_key

    @property
    def http_headers(self) -> dict[str, str]:
        """Headers that open the restricted APIs to an HTTP call."""
        return {ADMIN_HEADER: self.admin_key}

    @property
    def grpc_headers(self) -> dict[str, str]:
        """Headers that open the restricted APIs to a tritonclient gRPC call."""
        return {ADMIN_GRPC_HEADER: self.admin_key}

    @contextmanager
    def _client(self) -> Iterator[Any]:
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.http_url, connection_timeout=5.0)
        try:
            yield client
        finally:
            client.close()

    def is_ready(self) -> bool:
        """Server readiness; False when the server does not answer."""
        with self._client() as client:
            try:
                return bool(client.is_server_ready())
            except Exception:
                return False

    def is_model_ready(self, model: str) -> bool | None:
        """Whether Triton has `model` loaded and ready; None when the server does not answer."""
        with self._client() as client:
            try:
                return bool(client.is_model_ready(model))
            except Exception:
                return None

    def unload(self, model: str) -> None:
        with self._client() as client:
            client.unload_model(model, headers=self.http_headers)

    def load(self, model: str) -> None:
        with self._client() as client:
            client.load_model(model, headers=self.http_headers)
