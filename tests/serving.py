"""Helpers for tests that talk to a real tritonserver over gRPC with plain tritonclient."""

from __future__ import annotations

import io
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image

from pix2pix_client.request import contract_input
from serving.procfs import shared_memory_prefix
from serving.tritonserver import (
    DIE_WITH_PARENT,
    TritonServer,
    prepare_backend_directory,
    server_environment,
)


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


@contextmanager
def plain_tritonserver(
    repository: Path, scratch: Path
) -> Iterator[tuple[TritonServer, subprocess.Popen[bytes]]]:
    """tritonserver started by hand on a repository, as in the NGC container: no
    supervisor, so the models have no runtime directory. The TritonServer, never started,
    names its addresses and admin key. SIGTERM on leaving."""
    server = TritonServer(repository)
    command = server.command(shared_memory_prefix())
    backends = prepare_backend_directory(scratch / "backends")
    if backends is not None:
        command.append(f"--backend-directory={backends}")
    log = scratch / "tritonserver.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*DIE_WITH_PARENT, *command],
            env=server_environment(),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while not server.is_ready():
            assert process.poll() is None and time.monotonic() < deadline, repository_log(log)
            time.sleep(0.25)
        yield server, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
