"""OpenAI's Images API (`pix2pix api`) against the real thing: the gateway on loopback over
the session's tritonserver (tiny preset), with OpenAI's own Python SDK as the client.

Each result is compared with the client library's edit of the same inputs and seed,
byte for byte. Cancellation is read off the UNet's inference statistics: after a client
leaves, the server's UNet executions stop growing.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from pix2pix_client import EditClient, contract
from serving.tritonserver import TritonServer, free_port
from tests.serving import execution_counts, photo, png_bytes

openai = pytest.importorskip("openai", reason="the tests' client: pip install openai")
pytest.importorskip("uvicorn", reason="the gateway: pip install './client[api]'")

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-" + secrets.token_hex(12)
PROMPT = "make it snowy"
STEPS = 4
# A long edit: what a client leaves mid-way.
LONG_STEPS = 1000


@contextlib.contextmanager
def running_gateway(grpc_url: str, **options: Any) -> Iterator[str]:
    """The gateway over `grpc_url`, served by uvicorn in a thread of this process;
    `options` go to AsyncEditClient. Yields its base URL."""
    import uvicorn

    from pix2pix_client.aio import AsyncEditClient
    from pix2pix_client.api.app import build_app

    port = free_port()
    app = build_app(AsyncEditClient(grpc_url, **options), api_key=API_KEY)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="none")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the gateway did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def grpc_url(tiny_server: TritonServer) -> str:
    return tiny_server.grpc_url


@pytest.fixture(scope="module")
def gateway(grpc_url: str) -> Iterator[str]:
    with running_gateway(grpc_url, timeout_s=120) as url:
        yield url


@pytest.fixture(scope="module")
def sdk(gateway: str) -> Any:
    # No retries: every answer is the gateway's first.
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def picture() -> bytes:
    return png_bytes(photo(64, 64))


def _upload(data: bytes) -> tuple[str, bytes, str]:
    return ("photo.png", data, "image/png")


def _decoded(b64: str) -> bytes:
    return base64.b64decode(b64)


def _library_edit(grpc_url: str, image: bytes, pipeline: str, **options: Any) -> bytes:
    with EditClient(grpc_url, timeout_s=120) as client:
        return client.edit(image, PROMPT, model=pipeline, **options).png


def _unet_executions(server: TritonServer) -> int:
    return execution_counts(server, "unet_pix2pix")[1]


# ------------------------------------------------------------------------ edits


@pytest.mark.parametrize(
    ("model", "options"),
    [
        (
            "instruct-pix2pix",
            {
                "num_inference_steps": STEPS,
                "guidance_scale": 6.0,
                "image_guidance_scale": 1.2,
                "negative_prompt": "blurry",
                "scheduler": "ddim",
                "seed": 7,
            },
        ),
        ("img2img", {"num_inference_steps": 5, "temperature": 0.6, "seed": 8}),
    ],
)
def test_an_sdk_edit_is_the_client_librarys_edit_byte_for_byte(
    sdk: Any, grpc_url: str, picture: bytes, model: str, options: dict[str, Any]
) -> None:
    response = sdk.images.edit(
        image=_upload(picture), prompt=PROMPT, model=model, user="someone", extra_body=options
    )
    (image,) = response.data
    pipeline = {"instruct-pix2pix": contract.INSTRUCT_PIX2PIX, "img2img": contract.IMG2IMG}[model]
    assert _decoded(image.b64_json) == _library_edit(grpc_url, picture, pipeline, **options)
    assert image.seed == options["seed"]  # an extra attribute the SDK keeps
    assert response.size == "64x64" and response.output_format == "png"
    assert response.usage.input_tokens_details.image_tokens == 8 * 8
    assert response.usage.output_tokens == 8 * 8
    assert response.created <= time.time()


def test_no_seed_gets_one_that_reproduces_the_image(sdk: Any, grpc_url: str, picture: bytes):
    response = sdk.images.edit(
        image=_upload(picture), prompt=PROMPT, extra_body={"num_inference_steps": STEPS}
    )
    (image,) = response.data
    again = _library_edit(
        grpc_url, picture, contract.INSTRUCT_PIX2PIX, num_inference_steps=STEPS, seed=image.seed
    )
    assert _decoded(image.b64_json) == again


# Enough steps that concurrent edits' UNet calls meet in the batcher even on a loaded
# 2-core machine (at 6, one CI run saw none of 18 merge).
STEPS_TOGETHER = 12


def test_n_images_run_together_and_their_seeds_reproduce_them(
    sdk: Any, grpc_url: str, picture: bytes, tiny_server: TritonServer
) -> None:
    def together() -> tuple[Any, int, int]:
        """The response, and the UNet's requests and executions while it ran."""
        before = execution_counts(tiny_server, "unet_pix2pix")
        response = sdk.images.edit(
            image=_upload(picture),
            prompt=PROMPT,
            n=3,
            extra_body={"num_inference_steps": STEPS_TOGETHER, "seed": 100},
        )
        after = execution_counts(tiny_server, "unet_pix2pix")
        return response, after[0] - before[0], after[1] - before[1]

    response, requests, executions = together()
    images = [_decoded(item.b64_json) for item in response.data]
    assert [item.seed for item in response.data] == [100, 101, 102]
    assert len(set(images)) == 3
    for item, image in zip(response.data, images, strict=True):
        assert image == _library_edit(
            grpc_url,
            picture,
            contract.INSTRUCT_PIX2PIX,
            num_inference_steps=STEPS_TOGETHER,
            seed=item.seed,
        )
    # Concurrent edits: the UNet's dynamic batcher merged some of their calls. Two edits
    # whose steps drift apart by more than its queue delay at every step merge none (seen
    # once in CI on 2 busy cores), so the same request is sent up to twice more; edits run
    # one after the other would never merge.
    assert requests == 3 * STEPS_TOGETHER, requests
    for _ in range(2):
        if executions < requests:
            break
        _, requests, executions = together()
    assert executions < requests, (requests, executions)
    assert response.usage.output_tokens == 3 * 8 * 8


def test_size_and_output_format(sdk: Any, picture: bytes) -> None:
    wide = png_bytes(photo(96, 64))
    for output_format, pillow_format in (("webp", "WEBP"), ("jpeg", "JPEG")):
        response = sdk.images.edit(
            image=_upload(wide),
            prompt=PROMPT,
            size="48x32",
            output_format=output_format,
            output_compression=80,
            extra_body={"num_inference_steps": 2, "seed": 1},
        )
        result = Image.open(io.BytesIO(_decoded(response.data[0].b64_json)))
        assert (result.format, result.size) == (pillow_format, (48, 32))
        assert response.size == "48x32" and response.output_format == output_format


# --------------------------------------------------------------------- streaming


def test_a_stream_sends_two_partial_images_then_the_completed_one(
    sdk: Any, grpc_url: str, picture: bytes
) -> None:
    options = {"num_inference_steps": 9, "seed": 3}
    stream = sdk.images.edit(
        image=_upload(picture), prompt=PROMPT, stream=True, partial_images=2, extra_body=options
    )
    events = list(stream)
    assert [event.type for event in events] == [
        "image_edit.partial_image",
        "image_edit.partial_image",
        "image_edit.completed",
    ]
    *partials, completed = events
    assert [event.partial_image_index for event in partials] == [0, 1]
    for event in partials:
        assert Image.open(io.BytesIO(_decoded(event.b64_json))).format == "PNG"
    whole = _library_edit(grpc_url, picture, contract.INSTRUCT_PIX2PIX, **options)
    assert _decoded(completed.b64_json) == whole
    assert completed.seed == 3 and completed.size == "64x64"
    assert completed.usage.total_tokens > 0


def test_partial_images_are_spread_evenly_over_the_steps(gateway: str, picture: bytes) -> None:
    seen: list[str] = []
    formats: list[str] = []
    with httpx.stream(
        "POST",
        f"{gateway}/v1/images/edits",
        headers={"Authorization": f"Bearer {API_KEY}"},
        files={"image": _upload(picture)},
        data={
            "prompt": PROMPT,
            "stream": "true",
            "partial_images": "3",
            "output_format": "jpeg",
            "num_inference_steps": "12",
        },
        timeout=120,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(": step "):
                seen.append(line.split()[-1].split("/")[0])
            elif line.startswith("event: "):
                seen.append(line.removeprefix("event: "))
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                formats.append(Image.open(io.BytesIO(_decoded(data["b64_json"]))).format)
    partial_after = [seen[i - 1] for i, item in enumerate(seen) if item.endswith("partial_image")]
    assert partial_after == ["3", "6", "9"], seen
    assert seen[-2:] == ["12", "image_edit.completed"]
    assert formats == ["JPEG"] * 4


# ------------------------------------------------------------------------ errors


BAD_REQUESTS = [
    ({"model": "dall-e-2"}, "model", "allowed one of instruct-pix2pix, img2img"),
    ({"n": 0}, "n", "n=0 is out of range: allowed 1..8"),
    ({"n": 9}, "n", "n=9 is out of range: allowed 1..8"),
    ({"n": 2, "stream": True}, "n", "a stream carries one image"),
    ({"size": "1024x1024"}, "size", "from 8 to 512"),
    ({"size": "60x60"}, "size", "is not a multiple of 8"),
    ({"size": "big"}, "size", "is not WxH"),
    ({"response_format": "url"}, "response_format", "keeps no images to link to"),
    ({"output_format": "gif"}, "output_format", "allowed one of png, jpeg, webp"),
    ({"partial_images": 4, "stream": True}, "partial_images", "allowed 0..3"),
    ({"quality": "high"}, "quality", "allowed one of auto"),
    ({"background": "transparent"}, "background", "allowed one of auto, opaque"),
    ({"extra_body": {"seed": -1}}, "seed", "seed=-1 is out of range: allowed 0..2^63-1"),
    (
        {"n": 3, "extra_body": {"seed": 2**63 - 2}},
        "seed",
        f"seed={2**63 - 2} with n=3: image i is edited with seed + i, and the last would pass "
        f"{2**63 - 1}; allowed 0..{2**63 - 3} with n=3",
    ),
    ({"extra_body": {"num_inference_steps": 1}}, "num_inference_steps", "allowed 2..1000"),
    ({"extra_body": {"guidance_scale": "x"}}, "guidance_scale", "is not a number"),
    ({"extra_body": {"scheduler": "karras"}}, "scheduler", "allowed one of euler_a"),
    ({"extra_body": {"preview_every": 2}}, "preview_every", "is not supported by this server"),
    (
        {"model": "img2img", "extra_body": {"image_guidance_scale": 2}},
        "image_guidance_scale",
        "is not an input of img2img",
    ),
    ({"extra_body": {"strength": 0.5}}, "strength", "is not supported by this server"),
]


@pytest.mark.parametrize(("arguments", "param", "words"), BAD_REQUESTS)
def test_a_bad_field_is_a_400_naming_it(
    sdk: Any, picture: bytes, arguments: dict[str, Any], param: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.images.edit(image=_upload(picture), prompt=PROMPT, **arguments)
    error = refused.value.body
    assert (error["param"], error["type"]) == (param, "invalid_request_error"), error
    assert words in error["message"], error


def test_masks_several_images_and_undecodable_images_are_refused(sdk: Any, picture: bytes) -> None:
    cases = [
        ({"mask": _upload(picture)}, "mask", "masks are not supported"),
        ({"image": [_upload(picture), _upload(picture)]}, "image", "allowed one"),
        # The server's own words, from decoding it; a stream is refused with its status too.
        ({"image": _upload(picture[:100])}, "image", "image could not be decoded"),
        ({"image": _upload(picture[:100]), "stream": True}, "image", "image could not be decoded"),
        # 20000x20000 black pixels in 400 KB: refused from its header, before decoding.
        ({"image": _upload(png_bytes(Image.new("1", (20000, 20000))))}, "image", "header claims"),
    ]
    for arguments, param, words in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.images.edit(**{"image": _upload(picture), "prompt": PROMPT, **arguments})
        error = refused.value.body
        assert error["param"] == param and words in error["message"], error
    # A list of one is `image[]`, as the SDK sends it: accepted.
    response = sdk.images.edit(
        image=[_upload(picture)], prompt=PROMPT, extra_body={"num_inference_steps": 2}
    )
    assert len(response.data) == 1


def test_a_wrong_or_missing_key_is_a_401(gateway: str, picture: bytes) -> None:
    wrong = openai.OpenAI(base_url=f"{gateway}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.images.edit(image=_upload(picture), prompt=PROMPT)
    assert refused.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    missing = httpx.get(f"{gateway}/v1/models")
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.json()["error"]["code"] == "missing_api_key"
    # Probes need no key.
    assert httpx.get(f"{gateway}/health").status_code == 200


def test_an_image_over_the_limit_is_a_413(sdk: Any, gateway: str) -> None:
    from pix2pix_client.api.guard import MAX_BODY_BYTES

    # Within the body's limit, over the image's: refused after parsing, in the contract's words.
    oversized = b"\x89PNG" + bytes(contract.MAX_IMAGE_BYTES)
    with pytest.raises(openai.APIStatusError) as refused:
        sdk.images.edit(image=_upload(oversized), prompt=PROMPT)
    assert refused.value.status_code == 413
    assert refused.value.body["param"] == "image"
    assert f"image is {len(oversized)} bytes long" in refused.value.body["message"]

    # Over the body's limit: refused on its Content-Length, before any of it is read...
    headers = {"Authorization": f"Bearer {API_KEY}"}
    huge = bytes(MAX_BODY_BYTES + 1)
    started = time.monotonic()
    answer = httpx.post(f"{gateway}/v1/images/edits", headers=headers, files={"image": huge})
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"

    # ... or, sent without a Content-Length, once it passes the limit.
    def chunks() -> Iterator[bytes]:
        yield (
            b'--x\r\nContent-Disposition: form-data; name="image"; filename="photo.png"\r\n'
            b"Content-Type: image/png\r\n\r\n"
        )
        chunk = bytes(1024 * 1024)
        for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
            yield chunk

    counted = httpx.post(
        f"{gateway}/v1/images/edits",
        headers={**headers, "Content-Type": "multipart/form-data; boundary=x"},
        content=chunks(),
    )
    assert counted.status_code == 413 and "passed the limit" in counted.json()["error"]["message"]
    assert time.monotonic() - started < 30


def test_a_json_body_and_unknown_routes_are_answered_in_openais_shape(gateway: str) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    as_json = httpx.post(f"{gateway}/v1/images/edits", headers=headers, json={"prompt": "x"})
    assert (
        as_json.status_code == 400 and "multipart/form-data" in as_json.json()["error"]["message"]
    )
    unknown = httpx.get(f"{gateway}/v1/images/generations", headers=headers)
    assert unknown.status_code == 404 and unknown.json()["error"]["type"]
    wrong_method = httpx.get(f"{gateway}/v1/images/edits", headers=headers)
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["error"]["message"] == "GET is not allowed on /v1/images/edits"


def _multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "b0und") -> bytes:
    """A multipart body written by hand: (field, bytes, filename or None) per part."""
    body = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        body += value + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize(
    ("field", "value", "param", "words"),
    [
        ("prompt", b"caf\xe9 \xff\xfe", "prompt", "prompt is not UTF-8 text (byte 3 of 7)"),
        ("negative_prompt", b"x" * (2 * 1024 * 1024), "negative_prompt", "negative_prompt: Part"),
    ],
    ids=["latin-1-prompt", "2-mib-field"],
)
def test_a_text_field_the_contract_cannot_take_is_refused_naming_it(
    gateway: str, picture: bytes, field: str, value: bytes, param: str, words: str
) -> None:
    """Starlette reads text it cannot decode as Latin-1, and names no field when a part is
    too large; the gateway refuses the first and names the field of both."""
    parts = [("image", picture, "photo.png"), ("prompt", PROMPT.encode(), None)]
    body = _multipart([*(p for p in parts if p[0] != field), (field, value, None)])
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "Content-Type": "multipart/form-data; boundary=b0und",
    }
    refused = httpx.post(f"{gateway}/v1/images/edits", headers=headers, content=body)
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["param"] == param, error
    assert words in error["message"], error


def test_a_charset_the_request_declares_is_read(gateway: str, picture: bytes) -> None:
    """Text in the charset the request declares is that text (Latin-1 here), as Starlette
    reads it; only text the charset cannot decode is refused."""
    parts = [
        ("image", picture, "photo.png"),
        ("prompt", "make it café".encode("latin-1"), None),
        ("num_inference_steps", b"2", None),
    ]
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "Content-Type": "multipart/form-data; boundary=b0und; charset=iso-8859-1",
    }
    body = _multipart(parts)
    answered = httpx.post(f"{gateway}/v1/images/edits", headers=headers, content=body, timeout=60)
    assert answered.status_code == 200, answered.text
    assert len(answered.json()["data"]) == 1


@pytest.mark.parametrize("charset", ["x-unknown", "utf-16", "base64"])
def test_a_charset_the_form_cannot_be_read_in_is_refused(
    gateway: str, picture: bytes, charset: str
) -> None:
    """Starlette reads a form in a charset Python does not know as Latin-1, and one that
    is a codec but no text encoding (base64) failed as a bug (a 500); UTF-16 made the
    form's own names unreadable. Each is a 400 naming the charset and what is allowed."""
    parts = [("image", picture, "photo.png"), ("prompt", b"make it blue", None)]
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "Content-Type": f"multipart/form-data; boundary=b0und; charset={charset}",
    }
    refused = httpx.post(f"{gateway}/v1/images/edits", headers=headers, content=_multipart(parts))
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "invalid_request", error
    assert error["message"] == (
        f"the form's charset is '{charset}': allowed UTF-8 (the default), or another charset "
        "that writes ASCII as ASCII"
    )


def test_a_form_without_a_prompt_is_missing_a_required_parameter(
    gateway: str, picture: bytes
) -> None:
    """Media types are case-insensitive: a form sent as Multipart/Form-Data is read, and
    its missing prompt named as OpenAI names a missing parameter."""
    request = httpx.Request(
        "POST",
        f"{gateway}/v1/images/edits",
        headers={"Authorization": f"Bearer {API_KEY}"},
        files={"image": ("photo.png", picture, "image/png")},
    )
    content_type = request.headers["content-type"]
    request.headers["content-type"] = content_type.replace(
        "multipart/form-data", "Multipart/Form-Data"
    )
    with httpx.Client() as client:
        missing = client.send(request)
    error = missing.json()["error"]
    assert missing.status_code == 400, error
    assert (error["param"], error["code"]) == ("prompt", "missing_required_parameter")
    assert error["message"].startswith("prompt is required: allowed")


def test_models_lists_the_ready_pipelines(sdk: Any) -> None:
    assert {model.id for model in sdk.models.list()} == {"instruct-pix2pix", "img2img"}
    assert sdk.models.retrieve("img2img").owned_by == "pix2pix"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("dall-e-2")


def test_a_server_that_is_down_is_a_503_with_retry_after(picture: bytes) -> None:
    with running_gateway(f"127.0.0.1:{free_port()}", retries=0) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
        with pytest.raises(openai.InternalServerError) as refused:
            client.images.edit(image=_upload(picture), prompt=PROMPT)
        assert refused.value.status_code == 503
        assert refused.value.response.headers["retry-after"] == "2"
        assert refused.value.body["code"] == "server_unavailable"
        # The server's address stays in the gateway's log.
        assert "127.0.0.1" not in refused.value.body["message"]
        with pytest.raises(openai.InternalServerError):
            client.models.list()
        assert httpx.get(f"{url}/health").status_code == 503


def test_a_bug_is_a_500_with_an_incident_id_and_the_traceback_only_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from pix2pix_client.api.errors import from_edit_error
    from pix2pix_client.errors import ServerError

    def read_the_answer() -> None:
        raise ServerError("the response of instruct_pix2pix lacks the output 'edited_image'")

    try:
        read_the_answer()
    except ServerError as error:
        with caplog.at_level("ERROR", logger="pix2pix_client.api"):
            answer = from_edit_error(error)
    incident_id = re.search(r"incident ([0-9a-f]+)", answer.message).group(1)  # type: ignore[union-attr]
    assert answer.status == 500 and answer.body()["error"]["type"] == "server_error"
    assert "Traceback" not in answer.message and "edited_image" not in answer.message
    (record,) = caplog.records
    assert incident_id in record.getMessage() and record.exc_info is not None


# ------------------------------------------------------------------ cancellation


def _assert_the_unet_stops(tiny_server: TritonServer) -> int:
    """Waits for the step in flight, then checks the UNet runs no more; returns its
    executions since."""
    time.sleep(0.5)
    stopped_at = _unet_executions(tiny_server)
    time.sleep(1.0)
    growth = _unet_executions(tiny_server) - stopped_at
    assert growth <= 1, growth
    return growth


def test_leaving_a_stream_mid_way_stops_the_servers_unet(
    sdk: Any, tiny_server: TritonServer, picture: bytes, summary
) -> None:
    stream = sdk.images.edit(
        image=_upload(picture),
        prompt=PROMPT,
        stream=True,
        partial_images=3,
        # 1000 steps at temperature 0.5: 500 run, a partial image every 125.
        extra_body={"num_inference_steps": LONG_STEPS, "temperature": 0.5, "seed": 5},
    )
    started = _unet_executions(tiny_server)
    first = next(iter(stream))
    assert first.type == "image_edit.partial_image"
    stream.close()
    ran = _unet_executions(tiny_server) - started
    growth = _assert_the_unet_stops(tiny_server)
    summary(
        "OpenAI API: cancellation",
        f"a stream left after its first partial image: {ran} UNet executions before, "
        f"{growth} after",
    )


def test_a_client_that_gives_up_stops_the_servers_unet(
    gateway: str, tiny_server: TritonServer, picture: bytes
) -> None:
    impatient = openai.OpenAI(base_url=f"{gateway}/v1", api_key=API_KEY, max_retries=0, timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.images.edit(
            image=_upload(picture), prompt=PROMPT, extra_body={"num_inference_steps": LONG_STEPS}
        )
    _assert_the_unet_stops(tiny_server)


# ------------------------------------------------------------------------- docs


def _section(path: Path) -> str:
    text = path.read_text()
    start = text.index("## OpenAI-compatible API")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def _fenced(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)


def test_the_readmes_sdk_snippets_run_against_the_gateway(
    gateway: str, grpc_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snippets = [
        block
        for block in _fenced(_section(ROOT / "client" / "README.md"), "python")
        if "images.edit(" in block
    ]
    assert len(snippets) == 2, snippets
    # The repository README's short section shows the same code as the first.
    assert snippets[0] in _fenced(_section(ROOT / "README.md"), "python")
    image = png_bytes(photo(64, 64))
    (tmp_path / "photo.png").write_bytes(image)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_BASE_URL", f"{gateway}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    namespace: dict[str, Any] = {}
    for snippet in snippets:
        exec(compile(snippet, "client/README.md", "exec"), namespace)
    seed = int(re.search(r'"seed": (\d+)', snippets[0]).group(1))  # type: ignore[union-attr]
    steps = int(re.search(r'"num_inference_steps": (\d+)', snippets[0]).group(1))  # type: ignore[union-attr]
    expected = _library_edit(
        grpc_url, image, contract.INSTRUCT_PIX2PIX, seed=seed, num_inference_steps=steps
    )
    assert (tmp_path / "snowy.png").read_bytes() == expected
    streamed = sorted(path.name for path in tmp_path.glob("*.png"))
    assert streamed == [
        "partial_0.png",
        "partial_1.png",
        "photo.png",
        "snowy.png",
        "snowy_streamed.png",
    ]


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl: apt-get install curl")
def test_the_readmes_curl_line_sends_the_form(gateway: str, grpc_url: str, tmp_path: Path) -> None:
    (block,) = [
        block
        for block in _fenced(_section(ROOT / "client" / "README.md"), "bash")
        if block.startswith("curl")
    ]
    command = block.replace("http://127.0.0.1:8080", gateway)
    image = png_bytes(photo(64, 64))
    (tmp_path / "photo.png").write_bytes(image)
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=tmp_path,
        env={**os.environ, "PIX2PIX_API_KEY": API_KEY},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    response = json.loads((tmp_path / "response.json").read_text())
    (item,) = response["data"]
    seed = int(re.search(r"seed=(\d+)", block).group(1))  # type: ignore[union-attr]
    assert item["seed"] == seed
    assert _decoded(item["b64_json"]) == _library_edit(
        grpc_url, image, contract.INSTRUCT_PIX2PIX, seed=seed
    )


# ---------------------------------------------------------------------- command


def test_the_command_serves_until_sigterm_with_the_key_from_a_file(
    grpc_url: str, tmp_path: Path
) -> None:
    from pix2pix_client.cli import main

    assert main(["api", "--max-n", "0"]) == 2
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY + "\n")
    port = free_port()
    environment = {**os.environ, "PIX2PIX_API_KEY_FILE": str(key_file)}
    environment.pop("PIX2PIX_API_KEY", None)
    command = [sys.executable, "-m", "pix2pix_client", "api", "--url", grpc_url]
    gateway = subprocess.Popen(
        [*command, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
    )
    try:
        assert gateway.stdout is not None
        line = gateway.stdout.readline()
        assert line.startswith(f"pix2pix api: http://127.0.0.1:{port}/v1 ("), line
        assert "clients send the API key" in line
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
        listed = httpx.get(
            f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
        )
        assert listed.status_code == 200 and len(listed.json()["data"]) == 2
        gateway.send_signal(signal.SIGTERM)
        output, _ = gateway.communicate(timeout=60)
    finally:
        gateway.kill()
    assert gateway.returncode == 0, output
    assert "pix2pix api: stopped" in output


def test_the_gateway_loads_no_ml_framework_and_keeps_the_servers_defaults() -> None:
    from model_repository.configs import RepositoryOptions
    from pix2pix_client.api import DEFAULT_MAX_IMAGE_SIDE, DEFAULT_MAX_N

    assert RepositoryOptions().max_edits == DEFAULT_MAX_N
    assert RepositoryOptions().max_image_side == DEFAULT_MAX_IMAGE_SIDE
    forbidden = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "model_repository")
    code = (
        "import sys, pix2pix_client.api.serve\n"
        f"print(','.join(sorted(m for m in {forbidden!r} if m in sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert loaded.stdout.strip() == ""


# ------------------------------------------------------------------------ figures


def test_what_the_gateway_costs(sdk: Any, grpc_url: str, picture: bytes, summary) -> None:
    """Latency the gateway adds to one edit (median of 20 against EditClient, alternating
    in the same run), and n=4 in one request against four requests one after another."""
    options = {"num_inference_steps": STEPS, "seed": 11}
    gateway_s: list[float] = []
    library_s: list[float] = []
    with EditClient(grpc_url, timeout_s=120) as client:
        client.edit(picture, PROMPT, **options)
        for _ in range(20):
            started = time.perf_counter()
            client.edit(picture, PROMPT, **options)
            library_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            sdk.images.edit(image=_upload(picture), prompt=PROMPT, extra_body=options)
            gateway_s.append(time.perf_counter() - started)
    added_ms = (statistics.median(gateway_s) - statistics.median(library_s)) * 1000

    steps = {"num_inference_steps": 8, "seed": 20}
    started = time.perf_counter()
    together = sdk.images.edit(image=_upload(picture), prompt=PROMPT, n=4, extra_body=steps)
    together_s = time.perf_counter() - started
    started = time.perf_counter()
    for index in range(4):
        sdk.images.edit(
            image=_upload(picture),
            prompt=PROMPT,
            extra_body={**steps, "seed": steps["seed"] + index},
        )
    one_by_one_s = time.perf_counter() - started
    summary(
        "OpenAI API: what the gateway costs (tiny preset, 64x64)",
        f"one {STEPS}-step edit, median of 20: EditClient {statistics.median(library_s) * 1000:.1f}"
        f" ms, through the gateway and the openai SDK {statistics.median(gateway_s) * 1000:.1f} ms"
        f" (+{added_ms:.1f} ms)\n"
        f"n=4 in one request {together_s:.2f} s against 4 requests in turn {one_by_one_s:.2f} s "
        f"({one_by_one_s / together_s:.2f}x the throughput)",
    )
    assert len(together.data) == 4


# -------------------------------------------------------------------- deployment


@pytest.fixture(scope="module")
def sidecar_objects() -> list[dict[str, Any]]:
    from deploy import check

    return check.render(check.kubectl(), ["overlays/gpu", "components/openai-api"])


def test_the_kubernetes_sidecar_is_checked_against_its_pod(
    sidecar_objects: list[dict[str, Any]],
) -> None:
    from deploy import check

    def problems(objects: list[dict[str, Any]]) -> list[str]:
        return check.check_rendering("sidecar", objects, check.KUBERNETES_VERSION).problems

    assert problems(sidecar_objects) == []
    (deployment,) = [item for item in sidecar_objects if item["kind"] == "Deployment"]
    names = [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]]
    assert sorted(names) == ["openai-api", "triton"]

    def gateway(objects: list[dict[str, Any]]) -> dict[str, Any]:
        (item,) = [item for item in objects if item["kind"] == "Deployment"]
        containers = item["spec"]["template"]["spec"]["containers"]
        return next(c for c in containers if c["name"] == "openai-api")

    breakages = [
        (lambda c: c["args"].__setitem__(3, "127.0.0.1:9001"), "is not Triton's gRPC port"),
        (lambda c: c["ports"][0].update(containerPort=9090), "container port named openai"),
        (lambda c: c["env"].pop(0), "the API key must come from a Secret"),
        (lambda c: c["volumeMounts"].pop(), "/tmp is not mounted"),
        (lambda c: c.pop("lifecycle"), "no preStop sleep"),
        (lambda c: c["args"].append("--no-such-flag"), "refuses these arguments"),
    ]
    for breaks, words in breakages:
        objects = copy.deepcopy(sidecar_objects)
        breaks(gateway(objects))
        assert any(words in problem for problem in problems(objects)), words
