"""What the sync and asyncio clients share: request building, result reading, retries.

Nothing here touches the network, so both clients stay thin wrappers around
tritonclient's gRPC calls.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tritonclient import grpc as triton_grpc
from tritonclient.utils import triton_to_np_dtype

from pix2pix_client import contract
from pix2pix_client.errors import InvalidArgument, ServerError
from pix2pix_client.images import ImageInput, decode_image, encode_image

DEFAULT_URL = "localhost:8001"
DEFAULT_MODEL = contract.INSTRUCT_PIX2PIX

# The contract never checks the image's content; it stands in when only the other inputs
# are checked, before any image is read.
_UNREAD_IMAGE = b"\x00"


@dataclass
class EditResult:
    """One edited image and how it was made.

    `parameters` are the inputs that were sent, image excepted; inputs left out took the
    server's defaults. `seed` is the seed the server used, so passing it back reproduces
    the result. `latency_s` is the wall-clock time of the request that succeeded;
    `attempts` counts the tries it took.
    """

    image: Image.Image
    png: bytes
    seed: int
    latency_s: float
    model: str
    parameters: dict[str, Any] = field(default_factory=dict)
    attempts: int = 1

    def save(self, path: str | Path) -> Path:
        """Writes the result to `path`: the PNG bytes as received, or re-encoded by Pillow
        when the suffix asks for another format. Returns the path."""
        path = Path(path)
        if path.suffix.lower() in ("", ".png"):
            path.write_bytes(self.png)
        else:
            image = self.image
            if path.suffix.lower() in (".jpg", ".jpeg") and image.mode not in ("RGB", "L"):
                image = image.convert("RGB")
            image.save(path)
        return path

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: model, seed, latency_s, attempts and parameters."""
        return {
            "model": self.model,
            "seed": self.seed,
            "latency_s": round(self.latency_s, 4),
            "attempts": self.attempts,
            "parameters": dict(self.parameters),
        }


def validate_parameters(model: str, prompt: Any, **options: Any) -> dict[str, Any]:
    """Checks every input but the image against the contract, before any image is read.

    Returns the inputs that were given (not None), normalised to their Python types.
    Raises InvalidArgument naming the first bad input and its allowed values.
    """
    given = _given({"prompt": prompt, **options})
    try:
        validated = contract.validate_request(model, {"image": _UNREAD_IMAGE, **given})
    except contract.InvalidArgumentError as error:
        raise InvalidArgument.from_contract(error) from None
    return {name: validated[name] for name in given}


def prepare_request(
    model: str, image: ImageInput, prompt: Any, options: dict[str, Any]
) -> tuple[bytes, dict[str, Any]]:
    """Encodes the image and validates every input with the contract.

    Returns the encoded image and the other inputs to send: only those given, since the
    server applies the contract's defaults to the ones left out.
    """
    given = _given({"prompt": prompt, **options})
    try:
        # The model first, so a bad model name is reported before the image is read.
        contract.parameters_for(model)
        encoded = encode_image(image)
        validated = contract.validate_request(model, {"image": encoded, **given})
    except InvalidArgument:
        raise
    except contract.InvalidArgumentError as error:
        raise InvalidArgument.from_contract(error) from None
    return validated["image"], {name: validated[name] for name in given}


def contract_input(name: str, value: Any) -> triton_grpc.InferInput:
    """One [1]-shaped input tensor of the contract, in its wire type; text goes as UTF-8."""
    wire_type = contract.PARAMETERS_BY_NAME[name].wire_type
    if wire_type == "BYTES" and isinstance(value, str):
        value = value.encode("utf-8")
    tensor = triton_grpc.InferInput(name, [1], wire_type)
    tensor.set_data_from_numpy(np.array([value], dtype=triton_to_np_dtype(wire_type)))
    return tensor


def build_inputs(
    image: bytes, parameters: dict[str, Any]
) -> tuple[list[triton_grpc.InferInput], list[triton_grpc.InferRequestedOutput]]:
    """The Triton input tensors (each of shape [1]) and the requested outputs."""
    inputs = [contract_input(name, value) for name, value in {"image": image, **parameters}.items()]
    outputs = [triton_grpc.InferRequestedOutput(name) for name, _, _ in contract.OUTPUTS]
    return inputs, outputs


def read_result(
    response: triton_grpc.InferResult,
    *,
    model: str,
    parameters: dict[str, Any],
    latency_s: float,
    attempts: int,
) -> EditResult:
    """Reads the edited image and the seed out of a Triton response."""
    image_tensor = response.as_numpy(contract.OUTPUT_IMAGE)
    seed_tensor = response.as_numpy(contract.OUTPUT_SEED)
    if image_tensor is None or image_tensor.size == 0:
        raise ServerError(f"the response of {model} lacks the output {contract.OUTPUT_IMAGE!r}")
    if seed_tensor is None or seed_tensor.size == 0:
        raise ServerError(f"the response of {model} lacks the output {contract.OUTPUT_SEED!r}")
    png = bytes(image_tensor.reshape(-1)[0])
    return EditResult(
        image=decode_image(png),
        png=png,
        seed=int(seed_tensor.reshape(-1)[0]),
        latency_s=latency_s,
        model=model,
        parameters=parameters,
        attempts=attempts,
    )


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff, for transient errors only.

    `retries` extra attempts follow the first, waiting `backoff_s`, 2*`backoff_s`,
    4*`backoff_s`, ... in between; a retry that would pass the deadline is not made.
    """

    retries: int = 2
    backoff_s: float = 0.5

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise InvalidArgument("retries", f"retries={self.retries} is negative: allowed >= 0")
        if self.backoff_s < 0:
            raise InvalidArgument(
                "backoff_s", f"backoff_s={self.backoff_s} is negative: allowed >= 0"
            )

    def delays(self) -> Iterator[float]:
        """The waits before each retry, in order."""
        for retry in range(self.retries):
            yield self.backoff_s * 2**retry


class Deadline:
    """The time left of an optional overall timeout, shared by all attempts of a call."""

    def __init__(self, timeout_s: float | None) -> None:
        if timeout_s is not None and not timeout_s > 0:
            raise InvalidArgument(
                "timeout_s", f"timeout_s={timeout_s!r} is not positive: allowed > 0 or None"
            )
        self._end = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining(self) -> float | None:
        """Seconds left (at least a millisecond, so gRPC still reports the deadline)."""
        return None if self._end is None else max(self._end - time.monotonic(), 1e-3)

    def allows(self, wait_s: float) -> bool:
        """Whether waiting `wait_s` still leaves time for another attempt."""
        return self._end is None or time.monotonic() + wait_s < self._end


def normalise_headers(
    headers: dict[str, str] | None, admin_key: str | None = None
) -> dict[str, str] | None:
    """The gRPC metadata of every call: keys lowercase (HTTP-style spellings accepted),
    plus the header that opens the server's restricted APIs when an admin key is given."""
    merged = {str(key).lower(): str(value) for key, value in (headers or {}).items()}
    if admin_key:
        merged[contract.ADMIN_GRPC_HEADER] = admin_key
    return merged or None


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}
