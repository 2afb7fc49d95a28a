"""A stand-in for tritonserver's gRPC endpoint, for the client's unit tests.

These are unit tests of the client: a real tritonserver serving the edit models needs the
exported models, which the integration tests build and run. This stand-in speaks Triton's
real gRPC protocol (tritonclient's own service definitions), so the client's request
encoding, tritonclient's error conversion and the channel are all exercised for real;
only the "model" is fake: it answers with the colour-inverted input image, or with the
failures a test scripts.
"""

from __future__ import annotations

import io
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image, ImageOps
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from pix2pix_client.contract import OUTPUTS

SERVED_MODELS = ("instruct_pix2pix", "img2img")
STANDIN_SEED = 1234
_NUMPY_DTYPES = {"INT32": np.int32, "INT64": np.int64, "FP32": np.float32}


@dataclass
class Failure:
    """A scripted answer to one ModelInfer call: a gRPC status, or a delay first."""

    code: grpc.StatusCode | None = None
    message: str = ""
    delay_s: float = 0.0


@dataclass
class ReceivedRequest:
    """What the stand-in saw of one ModelInfer call."""

    model: str
    inputs: dict[str, Any]
    datatypes: dict[str, str]
    shapes: dict[str, list[int]]
    metadata: dict[str, str]
    received_at: float


@dataclass
class StandInTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Triton's GRPCInferenceService, answering the way the edit models' contract says."""

    script: list[Failure] = field(default_factory=list)
    requests: list[ReceivedRequest] = field(default_factory=list)
    infer_delay_s: float = 0.0
    ready: bool = True
    in_flight: int = 0
    max_in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.ready)

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.name not in SERVED_MODELS:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.name}'")
        return service_pb2.ModelReadyResponse(ready=self.ready and request.name == SERVED_MODELS[0])

    def RepositoryIndex(self, request: Any, context: grpc.ServicerContext) -> Any:
        index = service_pb2.RepositoryIndexResponse()
        for name in SERVED_MODELS:
            index.models.add(name=name, version="1", state="READY")
        index.models.add(name="unet_pix2pix", state="UNAVAILABLE", reason="unloaded")
        return index

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            failure = self.script.pop(0) if self.script else None
        try:
            return self._infer(request, context, failure)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _infer(self, request: Any, context: grpc.ServicerContext, failure: Failure | None) -> Any:
        inputs, datatypes, shapes = {}, {}, {}
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            datatypes[tensor.name] = tensor.datatype
            shapes[tensor.name] = list(tensor.shape)
            if tensor.datatype == "BYTES":
                inputs[tensor.name] = deserialize_bytes_tensor(raw)[0]
            else:
                inputs[tensor.name] = np.frombuffer(raw, _NUMPY_DTYPES[tensor.datatype])[0]
        self.requests.append(
            ReceivedRequest(
                model=request.model_name,
                inputs=inputs,
                datatypes=datatypes,
                shapes=shapes,
                metadata=dict(context.invocation_metadata()),
                received_at=time.monotonic(),
            )
        )
        time.sleep(self.infer_delay_s + (failure.delay_s if failure else 0.0))
        if failure is not None and failure.code is not None:
            context.abort(failure.code, failure.message)
        if request.model_name not in SERVED_MODELS:
            # What Triton 2.x answers for a model it does not know.
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"Request for unknown model: '{request.model_name}' is not found",
            )

        edited = ImageOps.invert(Image.open(io.BytesIO(inputs["image"])).convert("RGB"))
        buffer = io.BytesIO()
        edited.save(buffer, format="PNG")
        seed = int(inputs.get("seed", STANDIN_SEED))

        response = service_pb2.ModelInferResponse(model_name=request.model_name)
        image_output, seed_output = (name for name, _, _ in OUTPUTS)
        response.outputs.add(name=image_output, datatype="BYTES", shape=[1])
        response.outputs.add(name=seed_output, datatype="INT64", shape=[1])
        image_tensor = np.array([buffer.getvalue()], dtype=np.object_)
        response.raw_output_contents.append(serialize_byte_tensor(image_tensor).item())
        response.raw_output_contents.append(np.array([seed], dtype=np.int64).tobytes())
        return response


@contextmanager
def serve(
    servicer: StandInTriton, credentials: grpc.ServerCredentials | None = None
) -> Iterator[str]:
    """Serves `servicer` on a free localhost port; yields its "host:port" url."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("localhost:0", credentials)
    server.start()
    try:
        yield f"{'localhost' if credentials else '127.0.0.1'}:{port}"
    finally:
        server.stop(grace=None)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for "localhost" and its key, made with the openssl command."""
    certificate, key = directory / "server.pem", directory / "server.key"
    command = [
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost",
    ]
    subprocess.run(
        [*command, "-keyout", str(key), "-out", str(certificate)], check=True, capture_output=True
    )
    return certificate, key


def png_bytes(
    color: tuple[int, int, int] = (200, 30, 40), size: tuple[int, int] = (40, 24)
) -> bytes:
    """A small solid-colour PNG."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()
