"""Client library and CLI for instruction-based image editing served by NVIDIA Triton.

    from pix2pix_client import EditClient

    with EditClient("localhost:8001") as client:
        result = client.edit("photo.jpg", "make it snowy", seed=42)
        result.save("snowy.png")

`AsyncEditClient` is the asyncio twin; `contract` holds the inputs and their allowed
values.
"""

from __future__ import annotations

import importlib
from typing import Any

# What `from pix2pix_client import X` finds, by module. Imported on first use, so that
# the server's model processes, which read only `contract`, do not load gRPC and the
# client's image code with it.
_EXPORTS = {
    "AsyncEditClient": "aio",
    "EditClient": "client",
    "AccessDenied": "errors",
    "DeadlineExceeded": "errors",
    "EditError": "errors",
    "InvalidArgument": "errors",
    "ModelNotFound": "errors",
    "ServerError": "errors",
    "ServerUnavailable": "errors",
    "EditResult": "request",
    "Progress": "request",
}

__all__ = [
    "AccessDenied",
    "AsyncEditClient",
    "DeadlineExceeded",
    "EditClient",
    "EditError",
    "EditResult",
    "InvalidArgument",
    "ModelNotFound",
    "Progress",
    "ServerError",
    "ServerUnavailable",
    "contract",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "contract":
        return importlib.import_module("pix2pix_client.contract")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"pix2pix_client.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pix2pix_client' has no attribute {name!r}")
