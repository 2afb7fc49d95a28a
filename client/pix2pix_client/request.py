"""What the sync and asyncio clients share: request building, result reading, retries.

Nothing here touches the network, so both clients stay thin wrappers around
tritonclient's gRPC calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from PIL import Image
from tritonclient import grpc as triton_grpc
from tritonclient.utils import triton_to_np_dtype

from pix2pix_client import contract
from pix2pix_client.errors import InvalidArgument, ServerError
from pix2pix_client.images import ImageInput, decode_image, encode_image

DEFAULT_MODEL = contract.INSTRUCT_PIX2PIX


class EditOptions(TypedDict, total=False):
    """The inputs of an edit besides the image and prompt (see contract.PARAMETERS); left
    out, they take the server's defaults."""

    negative_prompt: str
    num_inference_steps: int
    guidance_scale: float
    image_guidance_scale: float  # instruct_pix2pix only
    temperature: float
    seed: int
    scheduler: str
    cache_interval: int  # a full UNet pass every N steps, shallow passes between


class StreamOptions(EditOptions, total=False):
    """A streamed edit's inputs: also how often to send a preview (0: progress only)."""

    preview_every: int


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


def validate_parameters(
    model: str, prompt: Any, streaming: bool = False, **options: Any
) -> dict[str, Any]:
    """Checks every input but the image against the contract, before any image is read
    (`streaming`: the streaming model's inputs).

    Returns the inputs that were given (not None), normalised to their Python types.
    Raises InvalidArgument naming the first bad input and its allowed values.
    """
    given = _given({"prompt": prompt, **options})
    try:
        validated = contract.validate_request(model, {"image": _UNREAD_IMAGE, **given}, streaming)
    except contract.InvalidArgumentError as error:
        raise InvalidArgument.from_contract(error) from None
    return {name: validated[name] for name in given}


def prepare_request(
    model: str, image: ImageInput, prompt: Any, options: dict[str, Any], streaming: bool = False
) -> tuple[bytes, dict[str, Any]]:
    """Encodes the image and validates every input with the contract (`model` is the
    pipeline; `streaming` for its streaming model's inputs).

    Returns the encoded image and the other inputs to send: only those given, since the
    server applies the contract's defaults to the ones left out.
    """
    given = _given({"prompt": prompt, **options})
    try:
        # The model first, so a bad model name is reported before the image is read.
        contract.parameters_for(model)
        encoded = encode_image(image)
        validated = contract.validate_request(model, {"image": encoded, **given}, streaming)
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
    image: bytes, parameters: dict[str, Any], streaming: bool = False
) -> tuple[list[triton_grpc.InferInput], list[triton_grpc.InferRequestedOutput]]:
    """The Triton input tensors (each of shape [1]) and the requested outputs."""
    inputs = [contract_input(name, value) for name, value in {"image": image, **parameters}.items()]
    names = contract.STREAM_OUTPUTS if streaming else contract.OUTPUTS
    outputs = [triton_grpc.InferRequestedOutput(name) for name, _, _ in names]
    return inputs, outputs


@dataclass(frozen=True)
class Progress:
    """One denoising step of a streamed edit: `step` of `num_steps` done.

    `preview` is a small picture of the latents at this step (a linear map of them, no
    VAE decode), on the steps the request asked previews for; None on the others.
    """

    step: int
    num_steps: int
    seed: int
    preview_png: bytes | None = None

    @property
    def preview(self) -> Image.Image | None:
        return None if self.preview_png is None else decode_image(self.preview_png)


# Sent with a stream so that an error ends it with a real gRPC status code.
STREAM_ERROR_HEADER = {"triton_grpc_error": "true"}


def read_event(
    response: triton_grpc.InferResult,
    *,
    model: str,
    parameters: dict[str, Any],
    latency_s: float,
    attempts: int,
) -> Progress | EditResult:
    """A streaming model's response: a progress event, or the result (the last one)."""
    if response.as_numpy(contract.OUTPUT_IMAGE) is not None:
        return read_result(
            response, model=model, parameters=parameters, latency_s=latency_s, attempts=attempts
        )
    step = response.as_numpy(contract.OUTPUT_STEP)
    steps = response.as_numpy(contract.OUTPUT_NUM_STEPS)
    seed = response.as_numpy(contract.OUTPUT_SEED)
    if step is None or steps is None or seed is None:
        raise ServerError(f"a response of {model} is neither a progress event nor a result")
    preview = response.as_numpy(contract.OUTPUT_PREVIEW)
    return Progress(
        step=int(step.reshape(-1)[0]),
        num_steps=int(steps.reshape(-1)[0]),
        seed=int(seed.reshape(-1)[0]),
        preview_png=None if preview is None else bytes(preview.reshape(-1)[0]),
    )


def is_final(response: triton_grpc.InferResult) -> bool:
    """Whether this is a stream's last response for its request."""
    parameters = response.get_response().parameters
    return "triton_final_response" in parameters and bool(
        parameters["triton_final_response"].bool_param
    )


def answers(event: Progress | EditResult, response: triton_grpc.InferResult) -> bool:
    """Whether a stream's event is its answer: the result, or its last response."""
    return isinstance(event, EditResult) or is_final(response)


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


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def repository_entries(index: dict[str, Any] | None) -> list[dict[str, str]]:
    """Normalises Triton's JSON repository index (which omits empty fields)."""
    return [
        {key: str(entry.get(key, "")) for key in ("name", "version", "state", "reason")}
        for entry in (index or {}).get("models", [])
    ]
