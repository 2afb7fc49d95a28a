"""Helpers for tests that talk to a real tritonserver over gRPC with plain tritonclient."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image

from pix2pix_client.contract import PARAMETERS_BY_NAME

NUMPY_DTYPES = {
    "TYPE_STRING": (np.object_, "BYTES"),
    "TYPE_INT32": (np.int32, "INT32"),
    "TYPE_INT64": (np.int64, "INT64"),
    "TYPE_FP32": (np.float32, "FP32"),
}


def photo(width: int = 64, height: int = 64) -> Image.Image:
    """A real photograph (scikit-image's astronaut), resized."""
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.LANCZOS)


def png_bytes(image: Image.Image, format: str = "PNG", **save_args: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_args)
    return buffer.getvalue()


def contract_input(name: str, value: Any) -> grpcclient.InferInput:
    """One [1]-shaped input with the contract's dtype; raw bytes pass through unchanged."""
    dtype, triton = NUMPY_DTYPES[PARAMETERS_BY_NAME[name].triton_dtype]
    if dtype is np.object_ and isinstance(value, str):
        value = value.encode()
    array = np.array([value], dtype=dtype)
    tensor = grpcclient.InferInput(name, [1], triton)
    tensor.set_data_from_numpy(array)
    return tensor


@dataclass
class Served:
    png: bytes
    seed: int

    @property
    def pixels(self) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(self.png)).convert("RGB"))


def edit(client: grpcclient.InferenceServerClient, model: str, **inputs: Any) -> Served:
    """Sends one request to an ensemble; inputs left out (or None) are not sent."""
    tensors = [contract_input(name, value) for name, value in inputs.items() if value is not None]
    result = client.infer(model, tensors, client_timeout=300)
    return Served(png=result.as_numpy("edited_image")[0], seed=int(result.as_numpy("seed_used")[0]))


def repository_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""
