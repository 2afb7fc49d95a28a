"""Client library and CLI for instruction-based image editing served by NVIDIA Triton.

    from pix2pix_client import EditClient

    with EditClient("localhost:8001") as client:
        result = client.edit("photo.jpg", "make it snowy", seed=42)
        result.save("snowy.png")

`AsyncEditClient` is the asyncio twin; `contract` holds the inputs and their allowed
values.
"""

from pix2pix_client import contract
from pix2pix_client.aio import AsyncEditClient
from pix2pix_client.client import EditClient
from pix2pix_client.errors import (
    AccessDenied,
    DeadlineExceeded,
    EditError,
    InvalidArgument,
    ModelNotFound,
    ServerError,
    ServerUnavailable,
)
from pix2pix_client.request import EditResult, Progress

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
