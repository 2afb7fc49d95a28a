"""Helpers for tests that talk to a real tritonserver over gRPC with plain tritonclient."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image

from pix2pix_client.request import contract_input


def photo(width: int = 64, height: int = 64) -> Image.Image:
    """A real photograph (scikit-image's astronaut), resized."""
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.LANCZOS)


def png_bytes(image: Image.Image, format: str = "PNG", **save_args: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_args)
    return buffer.getvalue()


@dataclass
class Served:
    png: bytes
    seed: int

    @property
    def pixels(self) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(self.png)).convert("RGB"))


def edit(client: grpcclient.InferenceServerClient, model: str, **inputs: Any) -> Served:
    """Sends one request to an edit model; inputs left out (or None) are not sent."""
    tensors = [contract_input(name, value) for name, value in inputs.items() if value is not None]
    result = client.infer(model, tensors, client_timeout=300)
    return Served(png=result.as_numpy("edited_image")[0], seed=int(result.as_numpy("seed_used")[0]))


def repository_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def execution_counts(server: Any, model: str) -> tuple[int, int]:
    """A model's (requests, executions) from the statistics API, which is restricted: the
    server's admin key opens it. Executions below requests: the batcher merged some."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        stats = client.get_inference_statistics(
            model, headers=server.grpc_admin_headers, as_json=True
        )["model_stats"][0]
    finally:
        client.close()
    requests = stats.get("inference_stats", {}).get("success", {}).get("count", 0)
    return int(requests), int(stats.get("execution_count", 0))
