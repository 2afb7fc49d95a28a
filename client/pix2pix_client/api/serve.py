"""`pix2pix api`: the gateway under uvicorn until Ctrl-C or SIGTERM, which drain it."""

from __future__ import annotations

import copy
import signal
import socket
import sys
from typing import Any

# Starlette reads forms with it: imported here so that a missing extra stops the command
# at start, not at the first request.
import python_multipart  # noqa: F401
import uvicorn
from uvicorn.config import LOGGING_CONFIG

from pix2pix_client.aio import AsyncEditClient
from pix2pix_client.api import DEFAULT_MAX_IMAGE_SIDE, DEFAULT_MAX_N
from pix2pix_client.api.app import build_app


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _log_config() -> dict[str, Any]:
    """uvicorn's logging, and the gateway's own lines (incidents, cancelled edits)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["pix2pix_client.api"] = {
        "handlers": ["default"],
        "level": "INFO",
        "propagate": False,
    }
    return config


def serve(
    url: str,
    *,
    host: str,
    port: int,
    api_key: str | None,
    max_n: int = DEFAULT_MAX_N,
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
    connection: dict[str, Any] | None = None,
) -> int:
    """Serves the API until Ctrl-C or SIGTERM; returns the exit code. Requests in flight
    finish first (a second Ctrl-C does not wait)."""
    client = AsyncEditClient(url, **(connection or {}))
    app = build_app(client, api_key=api_key, max_n=max_n, max_image_side=max_image_side)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server((host, port), family=family)
    except OSError as error:
        print(f"pix2pix: error: cannot serve the API on {host}:{port}: {error}", file=sys.stderr)
        return 1
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=_log_config(), server_header=False, ws="none")
    )
    # Both explicitly: a command started in the background of a script inherits an
    # ignored SIGINT; uvicorn raises the signal that stopped it again once it has drained.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    where = f"[{host}]" if family == socket.AF_INET6 else host
    key = "clients send the API key" if api_key else "no API key"
    print(
        f"pix2pix api: http://{where}:{port}/v1 (Triton at {client.url}; {key}); Ctrl-C stops it",
        flush=True,
    )
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
        print("pix2pix api: stopped", flush=True)
    return 0 if server.started else 1
