"""The client library and the `pix2pix` CLI against a real tritonserver (the tiny preset).

Every edit here crosses the network to the `tiny_server` fixture of conftest.py: the
edit models built from the tiny preset's ONNX export, served by the tritonserver of the
`nvidia-pytriton` wheel. Images are 64x64 with a few steps, so most edits take a fraction
of a second. Errors come from real failing calls: a server that refuses the input, a
server that does not serve the model, a port nobody listens on, a deadline shorter than
the request.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pix2pix_client import (
    AccessDenied,
    AsyncEditClient,
    DeadlineExceeded,
    EditClient,
    EditResult,
    InvalidArgument,
    ModelNotFound,
    ServerUnavailable,
    contract,
)
from serving.tritonserver import TritonServer, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "make it look like a watercolor painting"
FAST = {"num_inference_steps": 2}


def photo_array(width: int = 64, height: int = 64, shift: int = 0) -> np.ndarray:
    """A deterministic RGB test pattern: gradients and a bright square."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([(x * 4 + shift) % 256, (y * 4) % 256, ((x + y) * 2) % 256], axis=-1)
    array[height // 4 : height // 2, width // 4 : width // 2] = (250, 240, 30)
    return array.astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def unused_url() -> str:
    """A localhost port nobody listens on: connections to it are refused."""
    return f"127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def url(tiny_server: TritonServer) -> str:
    return tiny_server.grpc_url


@pytest.fixture
def client(url: str) -> Iterator[EditClient]:
    with EditClient(url, timeout_s=120) as edit_client:
        yield edit_client


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes(photo_array()))
    return path


# --------------------------------------------------------------------------- sync edits


def test_every_image_input_type_gives_the_same_edit(client: EditClient, photo: Path) -> None:
    array = photo_array()
    inputs = {
        "path": photo,
        "str path": str(photo),
        "bytes": photo.read_bytes(),
        "PIL": Image.fromarray(array),
        "numpy": array,
    }
    results = {kind: client.edit(image, PROMPT, seed=7, **FAST) for kind, image in inputs.items()}
    for kind, result in results.items():
        assert result.image.size == (64, 64), kind
        assert result.image.mode == "RGB", kind
        assert result.seed == 7, kind
        assert result.model == contract.INSTRUCT_PIX2PIX
        assert result.attempts == 1
        assert result.latency_s > 0
        assert result.parameters == {"prompt": PROMPT, "seed": 7, **FAST}
        assert result.png.startswith(b"\x89PNG")
        # The same pixels and seed: byte-identical PNGs, whatever form the image took.
        assert result.png == results["path"].png, kind
    # Random weights turn the image to noise, but an edit it is: not the input echoed back.
    assert not np.array_equal(np.asarray(results["path"].image), array)


def test_output_has_the_processed_size(client: EditClient) -> None:
    # Aspect ratio kept, sides floored to a multiple of 8: 70x50 -> 64x48.
    result = client.edit(photo_array(width=70, height=50), PROMPT, seed=1, **FAST)
    assert result.image.size == (64, 48)


def test_same_seed_gives_identical_png_and_the_returned_seed_reproduces(
    client: EditClient, tmp_path: Path
) -> None:
    image = photo_array()
    first = client.edit(image, PROMPT, seed=123, num_inference_steps=3)
    again = client.edit(image, PROMPT, seed=123, num_inference_steps=3)
    assert again.png == first.png
    other = client.edit(image, PROMPT, seed=124, num_inference_steps=3)
    assert other.png != first.png

    unseeded = client.edit(image, PROMPT, num_inference_steps=3)
    assert 0 <= unseeded.seed <= contract.MAX_SEED
    reproduced = client.edit(image, PROMPT, seed=unseeded.seed, num_inference_steps=3)
    assert reproduced.png == unseeded.png

    saved = first.save(tmp_path / "edited.png")
    assert saved.read_bytes() == first.png


def test_every_parameter_and_img2img(client: EditClient) -> None:
    image = photo_array()
    pix2pix = client.edit(
        image,
        PROMPT,
        negative_prompt="blurry",
        num_inference_steps=3,
        guidance_scale=5.0,
        image_guidance_scale=1.2,
        temperature=0.6,
        seed=5,
        scheduler="ddim",
    )
    assert pix2pix.image.size == (64, 64)
    img2img = client.edit(
        image, "a watercolor", model=contract.IMG2IMG, temperature=0.5, seed=5, **FAST
    )
    assert img2img.model == contract.IMG2IMG
    assert img2img.image.size == (64, 64)
    assert img2img.png != pix2pix.png


def test_health_and_models(client: EditClient, url: str, tiny_server: TritonServer) -> None:
    health = client.health()
    assert health == {
        "live": True,
        "ready": True,
        "models": {contract.INSTRUCT_PIX2PIX: True, contract.IMG2IMG: True},
    }
    # The repository index is an operator's API: refused without the admin key.
    with pytest.raises(AccessDenied, match="admin key"):
        client.models()
    with EditClient(url, admin_key=tiny_server.admin_key) as admin:
        models = {entry["name"]: entry for entry in admin.models()}
    assert set(contract.PIPELINES) <= set(models)
    assert {"unet_pix2pix", "unet_img2img", "text_encoder", "vae_decoder"} <= set(models)
    assert all(entry["state"] == "READY" for entry in models.values()), models


# --------------------------------------------------------------------------- asyncio


def test_eight_concurrent_async_edits_equal_their_sequential_results(
    client: EditClient, url: str
) -> None:
    # Different seeds, prompts, steps and guidance, so concurrent UNet calls of different
    # batch sizes (3 with guidance, 1 without) meet in the dynamic batcher.
    requests = [
        (
            photo_array(shift=index * 16),
            f"{PROMPT}, variant {index}",
            {
                "seed": 100 + index,
                "num_inference_steps": 2 + index % 3,
                "guidance_scale": 1.0 if index % 4 == 3 else 7.5,
            },
        )
        for index in range(8)
    ]

    async def edit_all() -> list[EditResult]:
        async with AsyncEditClient(url, timeout_s=120) as async_client:
            return await asyncio.gather(
                *(
                    async_client.edit(image, prompt, **options)
                    for image, prompt, options in requests
                )
            )

    concurrent = asyncio.run(edit_all())
    for (image, prompt, options), result in zip(requests, concurrent, strict=True):
        assert result.seed == options["seed"]
        assert result.png == client.edit(image, prompt, **options).png, options


def test_async_health_and_models(url: str, tiny_server: TritonServer) -> None:
    async def check() -> tuple[dict, list]:
        async with AsyncEditClient(url, admin_key=tiny_server.admin_key) as async_client:
            return await async_client.health(), await async_client.models()

    health, models = asyncio.run(check())
    assert health["live"] and health["ready"]
    assert all(health["models"].values())
    assert contract.INSTRUCT_PIX2PIX in {entry["name"] for entry in models}


# --------------------------------------------------------------------------- errors


def test_corrupt_image_is_refused_by_the_server_then_it_keeps_serving(
    client: EditClient,
) -> None:
    complete = png_bytes(photo_array())
    # A truncated PNG: its header reads fine (the client sends it), its pixels do not.
    with pytest.raises(InvalidArgument) as refused:
        client.edit(complete[: len(complete) // 2], PROMPT, seed=1, **FAST)
    assert refused.value.status == "StatusCode.INVALID_ARGUMENT"
    assert refused.value.field == "image"
    assert client.edit(complete, PROMPT, seed=1, **FAST).image.size == (64, 64)


def test_image_smaller_than_8x8_is_refused_by_the_server(client: EditClient) -> None:
    with pytest.raises(InvalidArgument) as refused:
        client.edit(photo_array(width=6, height=6), PROMPT, seed=1, **FAST)
    assert refused.value.status == "StatusCode.INVALID_ARGUMENT"
    assert refused.value.field == "image"


def test_server_and_client_refuse_a_bad_value_with_the_same_message(
    client: EditClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InvalidArgument) as client_side:
        client.edit(photo_array(), PROMPT, num_inference_steps=1)
    assert client_side.value.status is None  # refused before any request

    # Without the client's own check, the same request reaches the server.
    def unchecked(pipeline: str, values: dict, streaming: bool = False) -> dict:
        return {name: value for name, value in values.items() if value is not None}

    monkeypatch.setattr(contract, "validate_request", unchecked)
    with pytest.raises(InvalidArgument) as server_side:
        client.edit(photo_array(), PROMPT, num_inference_steps=1)
    assert server_side.value.status == "StatusCode.INVALID_ARGUMENT"
    assert server_side.value.field == "num_inference_steps"
    assert str(server_side.value) == str(client_side.value)
    assert "num_inference_steps=1 is out of range: allowed 2..1000" in str(server_side.value)


@pytest.fixture(scope="module")
def server_without_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A real tritonserver with an empty model repository: it serves no edit model."""
    root = tmp_path_factory.mktemp("empty-repository")
    repository = root / "models"
    repository.mkdir()
    server = TritonServer(repository, log_file=root / "tritonserver.log")
    server.start()
    try:
        server.wait_ready(timeout_s=120)
        yield server
    finally:
        server.stop()


RETRY_WAIT_S = 300.0


def test_model_the_server_does_not_serve_is_model_not_found(
    server_without_models: TritonServer,
) -> None:
    # Retried, it would wait RETRY_WAIT_S first: far longer than the call takes.
    with EditClient(
        server_without_models.grpc_url,
        timeout_s=3 * RETRY_WAIT_S,
        retries=1,
        backoff_s=RETRY_WAIT_S,
    ) as client:
        started = time.monotonic()
        with pytest.raises(ModelNotFound) as missing:
            client.edit(photo_array(), PROMPT, seed=1, **FAST)
        assert time.monotonic() - started < RETRY_WAIT_S
        assert "instruct_pix2pix" in str(missing.value)
        health = client.health()
    assert health["live"] and health["ready"]
    assert health["models"] == {contract.INSTRUCT_PIX2PIX: False, contract.IMG2IMG: False}


def test_closed_port_is_server_unavailable_after_bounded_retries() -> None:
    with EditClient(unused_url(), retries=2, backoff_s=0.1) as client:
        started = time.monotonic()
        with pytest.raises(ServerUnavailable) as unavailable:
            client.edit(photo_array(), PROMPT, seed=1, **FAST)
        elapsed = time.monotonic() - started
    assert unavailable.value.status == "StatusCode.UNAVAILABLE"
    # Two retries after 0.1 s and 0.2 s of backoff, then it gives up.
    assert elapsed >= 0.3


def test_closed_port_is_server_unavailable_for_the_async_client() -> None:
    async def edit() -> None:
        async with AsyncEditClient(unused_url(), retries=0) as async_client:
            await async_client.edit(photo_array(), PROMPT, seed=1, **FAST)

    with pytest.raises(ServerUnavailable):
        asyncio.run(edit())


def test_tiny_timeout_on_a_slow_request_is_deadline_exceeded(client: EditClient) -> None:
    # 50 steps take far longer than 20 ms, even on a fast machine.
    with pytest.raises(DeadlineExceeded) as late:
        client.edit(photo_array(), PROMPT, seed=1, num_inference_steps=50, timeout_s=0.02)
    assert late.value.status == "StatusCode.DEADLINE_EXCEEDED"
    # The abandoned request does not break the server.
    assert client.edit(photo_array(), PROMPT, seed=1, **FAST).image.size == (64, 64)


def test_async_deadline_exceeded(url: str) -> None:
    async def edit() -> None:
        async with AsyncEditClient(url) as async_client:
            await async_client.edit(
                photo_array(), PROMPT, seed=1, num_inference_steps=50, timeout_s=0.02
            )

    with pytest.raises(DeadlineExceeded):
        asyncio.run(edit())


# --------------------------------------------------------------------------- the CLI


def pix2pix_command() -> list[str]:
    """The installed `pix2pix` entry point of this environment, else `python -m`."""
    entry_point = Path(sys.executable).parent / "pix2pix"
    return [str(entry_point)] if entry_point.is_file() else [sys.executable, "-m", "pix2pix_client"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*pix2pix_command(), *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("pix2pix: error: "), lines[0]
    return lines[0]


def test_cli_single_edit_writes_the_image(
    url: str, client: EditClient, photo: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out" / "edited.png"
    output.parent.mkdir()
    completed = run_cli(
        *f"edit {photo} --steps 2 --seed 11 -o {output} --url {url}".split(), "-p", PROMPT
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    assert f"{photo} -> {output}  seed=11" in completed.stdout
    # The CLI's edit is the library's edit, byte for byte.
    assert output.read_bytes() == client.edit(photo, PROMPT, seed=11, **FAST).png


def test_cli_edits_a_directory_concurrently_with_json_output(url: str, tmp_path: Path) -> None:
    inputs = tmp_path / "photos"
    inputs.mkdir()
    count = 6
    for index in range(count):
        Image.fromarray(photo_array(shift=index * 30)).save(inputs / f"photo{index}.png")
    (inputs / "notes.txt").write_text("not an image")
    outputs = tmp_path / "edited"

    started = time.perf_counter()
    completed = run_cli(
        *f"edit {inputs} --steps 10 --seed 3 -o {outputs} --concurrency {count} --json".split(),
        *("--url", url, "-p", PROMPT),
    )
    wall_s = time.perf_counter() - started
    assert completed.returncode == 0, completed.stderr

    records = [json.loads(line) for line in completed.stdout.splitlines()]
    assert len(records) == count
    assert {Path(r["input"]).name for r in records} == {f"photo{i}.png" for i in range(count)}
    for record in records:
        output = Path(record["output"])
        assert output == outputs / Path(record["input"]).with_suffix(".png").name
        with Image.open(output) as edited:
            assert edited.size == (64, 64)
        assert record["seed"] == 3
        assert record["model"] == contract.INSTRUCT_PIX2PIX
        assert record["parameters"]["num_inference_steps"] == 10
    # The edits overlapped: their latencies add up to more than the whole command took
    # (start-up included), which edits made one after another cannot do.
    assert sum(r["latency_s"] for r in records) > wall_s, (records, wall_s)


def test_cli_bad_flag_value_exits_2_before_any_request(tmp_path: Path, photo: Path) -> None:
    output = tmp_path / "never.png"
    # The closed port proves no request was tried: that would be exit code 1.
    completed = run_cli(
        "edit", str(photo), "-p", PROMPT, "--steps", "0", "-o", str(output), "--url", unused_url()
    )
    assert completed.returncode == 2
    line = one_error_line(completed.stderr)
    assert "--steps" in line and "allowed 2..1000" in line
    assert not output.exists()


def test_cli_corrupt_image_answered_by_the_server_exits_2(url: str, tmp_path: Path) -> None:
    corrupt = tmp_path / "truncated.png"
    complete = png_bytes(photo_array())
    corrupt.write_bytes(complete[: len(complete) // 2])
    output = tmp_path / "x.png"
    completed = run_cli(*f"edit {corrupt} --steps 2 -o {output} --url {url}".split(), "-p", PROMPT)
    assert completed.returncode == 2
    line = one_error_line(completed.stderr)
    assert str(corrupt) in line and "image" in line
    assert not output.exists()


def test_cli_closed_port_exits_1(photo: Path, tmp_path: Path) -> None:
    output = tmp_path / "x.png"
    completed = run_cli(
        *f"edit {photo} -o {output} --url {unused_url()} --retries 0".split(), "-p", PROMPT
    )
    assert completed.returncode == 1
    assert "unavailable" in one_error_line(completed.stderr)


def test_cli_health_and_models(url: str, tiny_server: TritonServer) -> None:
    health = run_cli("health", "--url", url)
    assert health.returncode == 0, health.stderr
    summary, *pipelines = health.stdout.splitlines()
    assert summary == f"server {url}: live=yes ready=yes"
    assert dict(line.split() for line in pipelines) == dict.fromkeys(contract.PIPELINES, "ready")

    health_json = run_cli("health", "--url", url, "--json")
    assert json.loads(health_json.stdout) == {
        "url": url,
        "live": True,
        "ready": True,
        "models": {contract.INSTRUCT_PIX2PIX: True, contract.IMG2IMG: True},
    }

    refused = run_cli("models", "--url", url)
    assert refused.returncode == 1
    assert "admin key" in one_error_line(refused.stderr)

    admin = ("--admin-key", tiny_server.admin_key)
    models = run_cli("models", "--url", url, *admin)
    assert models.returncode == 0, models.stderr
    header, *rows = models.stdout.splitlines()
    assert header.split() == ["NAME", "VERSION", "STATE", "REASON"]
    listed = {row.split()[0]: row.split()[2] for row in rows}
    assert listed[contract.INSTRUCT_PIX2PIX] == "READY"
    assert listed["unet_pix2pix"] == "READY"

    models_json = run_cli("models", "--url", url, "--json", *admin)
    assert {e["name"] for e in json.loads(models_json.stdout)} == set(listed)


def test_cli_health_of_a_closed_port_exits_1() -> None:
    completed = run_cli("health", "--url", unused_url(), "--retries", "0")
    assert completed.returncode == 1
    one_error_line(completed.stderr)


# --------------------------------------------------------------------------- installed alone

EDIT_SCRIPT = """
import sys
from pix2pix_client import EditClient

with EditClient({url!r}) as client:
    result = client.edit({photo!r}, "make it snowy", seed=4, num_inference_steps=2)
print(result.image.size, result.seed, "torch" in sys.modules)
"""


@pytest.mark.slow
def test_client_installed_alone_in_a_fresh_virtualenv_edits_without_torch(
    url: str, photo: Path, tmp_path: Path
) -> None:
    """`pip install ./client` into a new virtualenv: no torch there, and edits work."""
    source = tmp_path / "client-source"
    # A clean copy, so that pip builds from sources only, not from this tree's build output.
    shutil.copytree(
        REPO_ROOT / "client",
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    constraints = REPO_ROOT / "constraints.txt"
    install = subprocess.run(
        [python, *f"-m pip install -q -c {constraints} {source}".split()],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    installed = subprocess.run(
        [python, "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    names = {package["name"].lower() for package in json.loads(installed.stdout)}
    assert "pix2pix-client" in names
    assert not names & {"torch", "diffusers", "transformers", "onnx", "onnxruntime"}

    no_torch = subprocess.run(
        [python, "-c", "import torch"], capture_output=True, text=True, timeout=120
    )
    assert no_torch.returncode != 0
    assert "No module named 'torch'" in no_torch.stderr

    script = EDIT_SCRIPT.format(url=url, photo=str(photo))
    library = subprocess.run(
        [python, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert library.returncode == 0, library.stderr
    assert library.stdout.split() == ["(64,", "64)", "4", "False"]

    output = tmp_path / "cli.png"
    cli = subprocess.run(
        [
            venv / "bin" / "pix2pix",
            *f"edit {photo} --steps 2 --seed 4 -o {output}".split(),
            *("--url", url, "-p", "make it snowy"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert cli.returncode == 0, cli.stderr
    with Image.open(output) as edited:
        assert edited.size == (64, 64)


def test_cli_health_fails_when_no_edit_model_is_served(server_without_models: TritonServer) -> None:
    result = run_cli("health", "--url", server_without_models.grpc_url)
    assert result.returncode == 1
    assert "serves no ready edit model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
