"""The clients on the wire: request encoding, results, retries, deadlines, headers, TLS.

The gRPC endpoint is the stand-in of test_client_standin.py (these are unit tests; the
integration tests run a real tritonserver), except where a real refused connection on
an unused port is what is being tested.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from pix2pix_client import (
    AsyncEditClient,
    DeadlineExceeded,
    EditClient,
    InvalidArgument,
    ModelNotFound,
    ServerError,
    ServerUnavailable,
)
from pix2pix_client.connection import Connection
from tests.test_client_standin import (
    STANDIN_SEED,
    Failure,
    StandInTriton,
    png_bytes,
    self_signed_certificate,
    serve,
)

UNUSED_URL = "127.0.0.1:1"
RED = (200, 30, 40)


@pytest.fixture
def standin() -> StandInTriton:
    return StandInTriton()


@pytest.fixture
def url(standin: StandInTriton) -> Iterator[str]:
    with serve(standin) as address:
        yield address


def _unavailable(message: str = "Server is shutting down") -> Failure:
    return Failure(grpc.StatusCode.UNAVAILABLE, message)


def test_edit_sends_only_given_inputs_with_contract_dtypes(
    standin: StandInTriton, url: str
) -> None:
    with EditClient(url) as client:
        result = client.edit(
            png_bytes(RED),
            "make it snowy",
            num_inference_steps=12,
            guidance_scale=6,
            image_guidance_scale=1.2,
            temperature=0.9,
            seed=7,
            scheduler="ddim",
            negative_prompt="blurry",
        )
    (request,) = standin.requests
    assert request.model == "instruct_pix2pix"
    assert request.datatypes == {
        "image": "BYTES",
        "prompt": "BYTES",
        "negative_prompt": "BYTES",
        "num_inference_steps": "INT32",
        "guidance_scale": "FP32",
        "image_guidance_scale": "FP32",
        "temperature": "FP32",
        "seed": "INT64",
        "scheduler": "BYTES",
    }
    assert all(shape == [1] for shape in request.shapes.values())
    assert request.inputs["prompt"] == b"make it snowy"
    assert request.inputs["scheduler"] == b"ddim"
    assert request.inputs["num_inference_steps"] == 12
    assert request.inputs["guidance_scale"] == pytest.approx(6.0)
    assert request.inputs["image"] == png_bytes(RED)

    assert result.seed == 7
    assert result.model == "instruct_pix2pix"
    assert result.attempts == 1
    assert result.latency_s > 0
    assert result.parameters["seed"] == 7
    assert "image" not in result.parameters
    # The stand-in inverts the colours: the result is the decoded answer.
    assert result.image.getpixel((0, 0)) == tuple(255 - c for c in RED)
    assert Image.open(io.BytesIO(result.png)).format == "PNG"


def test_defaults_are_left_to_the_server(standin: StandInTriton, url: str) -> None:
    with EditClient(url) as client:
        result = client.edit(np.full((16, 24, 3), 10, dtype=np.uint8), "a castle", model="img2img")
    (request,) = standin.requests
    assert request.model == "img2img"
    assert set(request.inputs) == {"image", "prompt"}
    assert result.seed == STANDIN_SEED  # chosen by the server, returned to the caller
    assert result.parameters == {"prompt": "a castle"}
    assert result.image.size == (24, 16)


def test_headers_travel_as_lowercase_grpc_metadata(standin: StandInTriton, url: str) -> None:
    headers = {"Authorization": "Bearer secret-token", "x-request-source": "tests"}
    with EditClient(url, headers=headers) as client:
        client.edit(png_bytes(), "x")
    metadata = standin.requests[0].metadata
    assert metadata["authorization"] == "Bearer secret-token"
    assert metadata["x-request-source"] == "tests"


def test_transient_errors_are_retried_with_exponential_backoff(
    standin: StandInTriton, url: str
) -> None:
    standin.script = [_unavailable(), _unavailable()]
    with EditClient(url, retries=2, backoff_s=0.05) as client:
        result = client.edit(png_bytes(), "x")
    assert result.attempts == 3
    assert len(standin.requests) == 3
    times = [request.received_at for request in standin.requests]
    gaps = np.diff(times)
    assert gaps[0] >= 0.05
    assert gaps[1] >= 0.10


def test_retries_are_bounded(standin: StandInTriton, url: str) -> None:
    standin.script = [_unavailable() for _ in range(10)]
    client = EditClient(url, retries=3, backoff_s=0.01)
    with client, pytest.raises(ServerUnavailable, match="shutting down") as raised:
        client.edit(png_bytes(), "x")
    assert len(standin.requests) == 4
    assert raised.value.status == "StatusCode.UNAVAILABLE"


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (
            Failure(grpc.StatusCode.INVALID_ARGUMENT, "seed=-1 is out of range: allowed 0..2^63-1"),
            InvalidArgument,
        ),
        (Failure(grpc.StatusCode.INTERNAL, "sampler crashed"), ServerError),
        (Failure(grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'x'"), ModelNotFound),
        (
            Failure(grpc.StatusCode.UNAVAILABLE, "Request for unknown model: 'img2img'"),
            ModelNotFound,
        ),
    ],
)
def test_non_transient_errors_are_not_retried(
    standin: StandInTriton, url: str, failure: Failure, expected: type
) -> None:
    standin.script = [failure, failure, failure]
    with EditClient(url, retries=2, backoff_s=0.01) as client, pytest.raises(expected):
        client.edit(png_bytes(), "x")
    assert len(standin.requests) == 1


def test_server_side_invalid_argument_carries_field(standin: StandInTriton, url: str) -> None:
    standin.script = [
        Failure(
            grpc.StatusCode.INVALID_ARGUMENT,
            "image=b'...' is not a decodable image: allowed encoded PNG, JPEG or WEBP bytes",
        )
    ]
    with EditClient(url) as client, pytest.raises(InvalidArgument) as raised:
        client.edit(png_bytes(), "x")
    assert raised.value.field == "image"
    assert str(raised.value).startswith("image=")


def test_deadline_exceeded(standin: StandInTriton, url: str) -> None:
    # The answer would come after 1 s: DeadlineExceeded means the client gave up first.
    standin.infer_delay_s = 1.0
    with EditClient(url, timeout_s=5) as client, pytest.raises(DeadlineExceeded):
        client.edit(png_bytes(), "x", timeout_s=0.2)


def test_deadline_covers_retries(standin: StandInTriton, url: str) -> None:
    standin.script = [_unavailable() for _ in range(20)]
    with (
        EditClient(url, retries=10, backoff_s=0.1, timeout_s=0.5) as client,
        pytest.raises(ServerUnavailable),
    ):
        client.edit(png_bytes(), "x")
    # 0.1 + 0.2 fit in the deadline, the 0.4 after them does not.
    assert len(standin.requests) == 3


def test_refused_connection_is_retried_then_unavailable() -> None:
    with EditClient(UNUSED_URL, retries=2, backoff_s=0.05) as client:
        started = time.monotonic()
        with pytest.raises(ServerUnavailable) as raised:
            client.edit(png_bytes(), "x")
    assert time.monotonic() - started >= 0.15  # waited 0.05 + 0.10 between three attempts
    assert raised.value.status == "StatusCode.UNAVAILABLE"


def test_retries_double_their_wait() -> None:
    connection = Connection.from_options("a:1", {"retries": 4, "backoff_s": 0.5})
    assert list(connection.attempts()) == [(0, 0.0), (0, 0.5), (0, 1.0), (0, 2.0), (0, 4.0)]
    assert list(Connection.from_options("a:1", {"retries": 0}).attempts()) == [(0, 0.0)]


def test_retries_wait_at_most_the_cap() -> None:
    """However many retries are asked for, no wait passes MAX_BACKOFF_S (a billion retries
    computed 2**1e9 before)."""
    from pix2pix_client.connection import MAX_BACKOFF_S

    connection = Connection.from_options("a:1", {"retries": 10**9, "backoff_s": 0.5})
    waits = [wait for _, (_, wait) in zip(range(200), connection.attempts(), strict=False)]
    assert waits[:8] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, MAX_BACKOFF_S]
    assert max(waits) == MAX_BACKOFF_S


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("localhost:99999", "has port 99999: allowed 1..65535"),
        ("localhost:-1", "has port -1: allowed 1..65535"),
        ("http://localhost:8001", "is an HTTP URL: allowed host:port (gRPC, no scheme)"),
        ("a:8001,b:0", "'b:0' has port 0"),
    ],
)
def test_an_address_grpc_would_misread_is_refused(url: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        Connection.from_options(url, {})
    assert raised.value.field == "url" and words in str(raised.value)
    for fine in ("localhost:8001", "[::1]:8001", "dns:///localhost:8001", "unix:/tmp/triton"):
        assert Connection.from_options(fine, {}).urls == [fine]


def test_retries_go_to_every_other_address_first() -> None:
    connection = Connection.from_options("a:1,b:2,c:3", {"retries": 4, "backoff_s": 0.5})
    connection.preferred = 1
    assert list(connection.attempts()) == [(1, 0.0), (2, 0.0), (0, 0.0), (1, 0.5), (2, 1.0)]


def test_health_and_models(standin: StandInTriton, url: str) -> None:
    with EditClient(url) as client:
        assert client.health() == {
            "live": True,
            "ready": True,
            "models": {"instruct_pix2pix": True, "img2img": False},
        }
        assert client.models() == [
            {"name": "instruct_pix2pix", "version": "1", "state": "READY", "reason": ""},
            {"name": "img2img", "version": "1", "state": "READY", "reason": ""},
            {"name": "unet_pix2pix", "version": "", "state": "UNAVAILABLE", "reason": "unloaded"},
        ]


def test_health_of_unreachable_server_raises_unavailable() -> None:
    with EditClient(UNUSED_URL, retries=0) as client, pytest.raises(ServerUnavailable):
        client.health()


def test_async_edits_run_concurrently(standin: StandInTriton, url: str) -> None:
    standin.infer_delay_s = 0.2

    async def edit_many() -> list:
        async with AsyncEditClient(url) as client:
            return await asyncio.gather(
                *(client.edit(png_bytes(), "x", seed=seed) for seed in range(6))
            )

    results = asyncio.run(edit_many())
    assert [result.seed for result in results] == list(range(6))
    assert standin.max_in_flight == 6


def test_async_retries_and_errors(standin: StandInTriton, url: str) -> None:
    standin.script = [_unavailable(), Failure(grpc.StatusCode.INTERNAL, "boom")]

    async def edit() -> None:
        async with AsyncEditClient(url, retries=3, backoff_s=0.01) as client:
            await client.edit(png_bytes(), "x")

    with pytest.raises(ServerError, match="boom"):
        asyncio.run(edit())
    assert len(standin.requests) == 2


def test_async_client_survives_a_new_event_loop(standin: StandInTriton, url: str) -> None:
    client = AsyncEditClient(url)
    first = asyncio.run(client.edit(png_bytes(), "x", seed=1))
    second = asyncio.run(client.edit(png_bytes(), "x", seed=2))
    health = asyncio.run(client.health())
    models = asyncio.run(client.models())
    asyncio.run(client.close())
    assert (first.seed, second.seed) == (1, 2)
    assert health["ready"] and len(models) == 3


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_with_root_certificates(standin: StandInTriton, tmp_path: Path) -> None:
    certificate, key = self_signed_certificate(tmp_path)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), certificate.read_bytes())])
    with serve(standin, credentials) as url:
        with EditClient(url, ssl=True, root_certificates=certificate) as client:
            assert client.edit(png_bytes(), "x", seed=5).seed == 5

        async def edit_async(url: str = url) -> int:
            async with AsyncEditClient(url, ssl=True, root_certificates=certificate) as client:
                return (await client.edit(png_bytes(), "x", seed=6)).seed

        assert asyncio.run(edit_async()) == 6
        # Without the CA the handshake fails; gRPC reports it as unavailable.
        client = EditClient(url, ssl=True, retries=0)
        with client, pytest.raises(ServerUnavailable):
            client.edit(png_bytes(), "x")


def test_tls_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as raised:
        EditClient(UNUSED_URL, ssl=True, root_certificates=tmp_path / "missing.pem")
    assert raised.value.field == "root_certificates"
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(InvalidArgument, match="without ssl=True"):
        EditClient(UNUSED_URL, root_certificates=pem)
