"""Safe to run for others, against real tritonservers on the tiny preset.

Secure defaults (loopback, restricted APIs, TLS), hostile image bytes, abandoned edits
that stop within one UNet step, overload refused at once. Faults (kill -9, SIGSTOP) and
SIGTERM drains are in test_faults.py.
"""

from __future__ import annotations

import ipaddress
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from export.onnx_export import load_manifest
from pix2pix_client import EditClient, InvalidArgument, ServerUnavailable
from serving.procfs import shared_memory_prefix
from serving.tritonserver import TlsFiles, TritonServer
from tests.bad_images import mutations, named_cases
from tests.serving import contract_input, edit, execution_counts, photo, png_bytes

GOOD = {"prompt": "make it snowy", "num_inference_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def server(tiny_server: TritonServer) -> TritonServer:
    return tiny_server


@pytest.fixture(scope="module")
def image() -> bytes:
    return png_bytes(photo(48, 40))


@pytest.fixture(scope="module")
def reference(server: TritonServer, image: bytes) -> bytes:
    """The PNG of the GOOD edit of `image`, before anything else happened."""
    return edit_png(server.grpc_url, image)


def _send(url: str, model: str, inputs: dict[str, Any], timeout_s: float = 120) -> Any:
    client = grpcclient.InferenceServerClient(url)
    try:
        tensors = [contract_input(name, value) for name, value in inputs.items()]
        return client.infer(model, tensors, client_timeout=timeout_s)
    finally:
        client.close()


# --------------------------------------------------------------------------- secure defaults


def test_every_endpoint_listens_on_loopback_only(server: TritonServer) -> None:
    assert server.process is not None
    listening = {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(server.process.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }
    ports = {server.settings.grpc_port, server.settings.http_port, server.settings.metrics_port}
    assert {port for _, port in listening} == ports
    for address, port in listening:
        ip = ipaddress.ip_address(address)
        # gRPC's socket shows 127.0.0.1 as the IPv4-mapped ::ffff:127.0.0.1.
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        assert (mapped or ip) == ipaddress.ip_address("127.0.0.1"), (address, port)


RESTRICTED_GRPC: dict[str, Callable[[grpcclient.InferenceServerClient, dict], Any]] = {
    "repository index": lambda c, h: c.get_model_repository_index(headers=h),
    "model config": lambda c, h: c.get_model_config("instruct_pix2pix", headers=h),
    "statistics": lambda c, h: c.get_inference_statistics(headers=h),
    "log settings": lambda c, h: c.get_log_settings(headers=h),
    "log verbosity": lambda c, h: c.update_log_settings({"log_verbose_level": 0}, headers=h),
    "trace settings": lambda c, h: c.get_trace_settings(headers=h),
    "shared memory status": lambda c, h: c.get_system_shared_memory_status(headers=h),
    "model control": lambda c, h: c.unload_model("no_such_model", headers=h),
}


@pytest.mark.parametrize("api", sorted(RESTRICTED_GRPC))
def test_restricted_grpc_apis_need_the_admin_key(server: TritonServer, api: str) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="This protocol is restricted"):
            RESTRICTED_GRPC[api](client, None)
        try:
            RESTRICTED_GRPC[api](client, server.grpc_admin_headers)
        except InferenceServerException as error:
            # Let through, the call itself may fail (no such model to unload).
            assert "restricted" not in error.message()
    finally:
        client.close()


def test_shared_memory_cannot_be_registered_without_the_key(server: TritonServer) -> None:
    """The attack that read /dev/shm objects of other processes through seed_used."""
    region = next(Path("/dev/shm").glob(f"{shared_memory_prefix()}*")).name
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.register_system_shared_memory("peek", f"/{region}", 8)
    finally:
        client.close()


def test_restricted_http_apis_need_the_admin_key(server: TritonServer) -> None:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        with pytest.raises(InferenceServerException, match="This API is restricted"):
            client.get_model_repository_index()
        with pytest.raises(InferenceServerException, match="This API is restricted"):
            client.update_log_settings({"log_verbose_level": 1})
        assert client.get_model_repository_index(headers=server.http_admin_headers)
    finally:
        client.close()


def test_inference_health_metadata_and_metrics_stay_open(
    server: TritonServer, image: bytes
) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.get_server_metadata().name == "triton"
        assert client.get_model_metadata("instruct_pix2pix").name == "instruct_pix2pix"
    finally:
        client.close()
    assert edit_png(server.grpc_url, image).startswith(b"\x89PNG")
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        assert b"nv_inference_request_success" in response.read()


def edit_png(url: str, image: bytes, **inputs: Any) -> bytes:
    client = grpcclient.InferenceServerClient(url)
    try:
        return edit(client, "instruct_pix2pix", image=image, **{**GOOD, **inputs}).png
    finally:
        client.close()


def _certificate(folder: Path) -> TlsFiles:
    """A self-signed certificate for 127.0.0.1, made for this test."""
    key, certificate = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(certificate), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return TlsFiles(certificate, key)


def test_an_edit_over_tls(
    start_server: Callable[..., TritonServer],
    lean_repository: Path,
    tmp_path: Path,
    image: bytes,
    reference: bytes,
) -> None:
    tls = _certificate(tmp_path)
    server = start_server(lean_repository, tls=tls)
    with EditClient(server.grpc_url, ssl=True, root_certificates=tls.certificate) as client:
        result = client.edit(image, "make it snowy", seed=3, num_inference_steps=2)
    assert result.png == reference
    # Without TLS the channel never comes up.
    with (
        EditClient(server.grpc_url, retries=0, timeout_s=5) as plain,
        pytest.raises(ServerUnavailable),
    ):
        plain.edit(image, "make it snowy", seed=3, num_inference_steps=2)


# --------------------------------------------------------------------------- bad input


SERVED_MUTATIONS = 320


def test_mutated_images_through_the_server_are_ok_or_invalid_argument(
    server: TritonServer, image: bytes, reference: bytes, summary
) -> None:
    outcomes: dict[str, int] = {}

    def send(mutated: bytes) -> str:
        try:
            _send(server.grpc_url, "instruct_pix2pix", {"image": mutated, **GOOD})
        except InferenceServerException as error:
            assert error.status() == "StatusCode.INVALID_ARGUMENT", error.message()
            assert "image" in error.message() and "Traceback" not in error.message()
            return "INVALID_ARGUMENT"
        return "OK"

    with ThreadPoolExecutor(4) as pool:
        for outcome in pool.map(send, [data for _, data in mutations(SERVED_MUTATIONS, seed=7)]):
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    summary(
        "image mutations through a real server",
        f"{SERVED_MUTATIONS} mutated images: "
        + ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items())),
    )
    assert set(outcomes) == {"OK", "INVALID_ARGUMENT"}
    assert edit_png(server.grpc_url, image) == reference


@pytest.mark.parametrize("case", sorted(named_cases()))
def test_named_hostile_files_are_invalid_argument(server: TritonServer, case: str) -> None:
    with pytest.raises(InferenceServerException) as refused:
        _send(server.grpc_url, "img2img", {"image": named_cases()[case], **GOOD})
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    message = refused.value.message()
    assert "image" in message and "allowed encoded PNG, JPEG or WebP" in message
    assert "Traceback" not in message and ".py" not in message


def test_a_16_mb_prompt_is_refused_before_tokenizing(
    server: TritonServer, image: bytes, summary
) -> None:
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as refused:
        _send(server.grpc_url, "instruct_pix2pix", {"image": image, **GOOD, "prompt": "a" * 2**24})
    # The length check's message: the prompt never reached the tokenizer.
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "prompt is 16777216 bytes long: allowed UTF-8 text of at most 4096 bytes" in (
        refused.value.message()
    )
    summary("overlong input", f"a 16 MB prompt refused in {time.monotonic() - started:.2f} s")
    # The client refuses it the same way before sending.
    with EditClient(server.grpc_url) as client, pytest.raises(InvalidArgument) as local:
        client.edit(image, "b" * 5000)
    assert local.value.field == "prompt" and local.value.status is None


def _component_call(
    url: str, model: str, shape: tuple[int, ...], deep_features: tuple[int, ...] | None = None
) -> Any:
    """Calls a component directly with zeros: its first input of `shape` (batch and
    spatial sides), the others of the same batch at their sizes from the model's metadata;
    a UNet's deep features (its shallow pass) of that shape where given."""
    client = grpcclient.InferenceServerClient(url)
    try:
        metadata = client.get_model_metadata(model, as_json=True)
        tensors = []
        for index, entry in enumerate(metadata["inputs"]):
            if entry["name"] == "deep_features":  # the shallow pass's input, optional
                if deep_features is None:
                    continue
                dims = list(deep_features)
            else:
                dims = list(shape) if index == 0 else [shape[0], *map(int, entry["shape"][1:])]
            tensor = grpcclient.InferInput(entry["name"], dims, entry["datatype"])
            dtype = np.int32 if entry["datatype"] == "INT32" else np.float32
            tensor.set_data_from_numpy(np.zeros(dims, dtype))
            tensors.append(tensor)
        return client.infer(model, tensors, client_timeout=60)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("model", "sent", "refused", "words"),
    [
        ("unet_pix2pix", (3, 8, 64, 64), (3, 8, 64, 65), "latent_width 65, allowed 1..64 ("),
        ("unet_pix2pix", (1, 8, 1, 1), (1, 8, 0, 16), "latent_height 0, allowed 1..64 ("),
        ("vae_encoder", (1, 3, 512, 512), (1, 3, 520, 512), "height 520, allowed 8..512 in"),
        ("vae_encoder", (1, 3, 8, 8), (1, 3, 1, 1), "height 1, allowed 8..512 in multiples of 8"),
        ("vae_encoder", (1, 3, 16, 24), (1, 3, 16, 20), "width 20, allowed 8..512 in multiples"),
        ("vae_decoder", (1, 4, 64, 64), (1, 4, 64, 72), "latent_width 72, allowed 1..64 ("),
    ],
)
def test_components_refuse_shapes_no_edit_sends(
    server: TritonServer, image: bytes, reference: bytes, model: str, sent, refused, words
) -> None:
    """The components are models any client can call. Sides past the largest an edit
    sends (512 pixels here, latents 8 times smaller) cost minutes and, at SD 1.5 size, more
    memory than the machine has (a UNet call on a 4096-pixel latent took the tiny UNet 3
    minutes); sides short of the smallest, or off the VAE's multiple, fail inside the
    runtime (OpenVINO then computed NaN for the next edit's calls). Each is refused at
    once, naming the input and the allowed sizes; what an edit sends runs, and the next
    edit is what it was."""
    _component_call(server.grpc_url, model, sent)
    with pytest.raises(InferenceServerException) as refused_call:
        _component_call(server.grpc_url, model, refused)
    assert refused_call.value.status() == "StatusCode.INVALID_ARGUMENT"
    message = refused_call.value.message()
    assert f"has shape {list(refused)}: {words}" in message, message
    assert edit_png(server.grpc_url, image) == reference


@pytest.mark.parametrize("past", ["vocabulary", "negative"])
def test_the_text_encoder_refuses_token_ids_past_its_vocabulary(
    server: TritonServer, tiny_export: Path, image: bytes, reference: bytes, past: str
) -> None:
    """A client calling the text encoder with a token id no tokenizer makes gets
    INVALID_ARGUMENT naming input_ids and the ids allowed (onnxruntime's own failure was
    INTERNAL, OpenVINO embedded it as nothing the checkpoint learned); the next edit is
    what it was."""
    last = load_manifest(tiny_export)["dimensions"]["text_vocab_size"] - 1
    ids = np.zeros((2, 77), np.int32)
    ids[0, 4] = last + 1 if past == "vocabulary" else -1
    tensor = grpcclient.InferInput("input_ids", list(ids.shape), "INT32")
    tensor.set_data_from_numpy(ids)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as refused:
            client.infer("text_encoder", [tensor], client_timeout=60)
    finally:
        client.close()
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"input_ids holds {ids[0, 4]}: allowed 0..{last}" in refused.value.message()
    assert edit_png(server.grpc_url, image) == reference


def test_a_shallow_pass_takes_deep_features_of_its_samples_side_and_returns_noise(
    server: TritonServer, image: bytes, reference: bytes
) -> None:
    """The UNet's shallow pass (a request carrying deep_features) reads the deep features
    of the same latent: another side is refused naming both inputs; the pass answers
    with the noise it computed only (it asked for every output: Python's KeyError and its
    traceback were the answer)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        metadata = client.get_model_metadata("unet_pix2pix", as_json=True)
    finally:
        client.close()
    (deep,) = [entry for entry in metadata["inputs"] if entry["name"] == "deep_features"]
    channels = int(deep["shape"][1])
    answer = _component_call(server.grpc_url, "unet_pix2pix", (1, 8, 8, 8), (1, channels, 8, 8))
    assert answer.as_numpy("noise_pred").shape == (1, 4, 8, 8)
    assert answer.as_numpy("deep_features") is None
    with pytest.raises(InferenceServerException) as refused:
        _component_call(server.grpc_url, "unet_pix2pix", (1, 8, 8, 8), (1, channels, 4, 4))
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert (
        f"deep_features has shape [1, {channels}, 4, 4]: latent_height 4 where sample has 8: "
        "allowed the same"
    ) in refused.value.message()
    assert edit_png(server.grpc_url, image) == reference


# --------------------------------------------------------------------------- abandoned work


def _unet_executions(server: TritonServer) -> int:
    return execution_counts(server, "unet_pix2pix")[1]


def test_abandoned_edits_stop_within_one_step(
    server: TritonServer, summary, image: bytes, reference: bytes
) -> None:
    """Two 300-step 256x256 edits whose callers give up after 2 s (gRPC deadline): their
    loops stop, and the UNet runs nothing after the deadline but the step each was in (and
    the next one, where the unary model's poll marks the edit after that step's check) and
    the 2-step edit sent right after."""
    big = png_bytes(photo(256, 256))
    deadline_s = 2.0

    def abandoned(seed: int) -> str:
        try:
            _send(
                server.grpc_url,
                "instruct_pix2pix",
                {"image": big, **GOOD, "num_inference_steps": 300, "seed": seed},
                timeout_s=deadline_s,
            )
        except InferenceServerException as error:
            return error.status()
        return "finished"

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        statuses = list(pool.map(abandoned, (1, 2)))
    assert statuses == ["StatusCode.DEADLINE_EXCEEDED"] * 2
    after_deadline = _unet_executions(server)
    quick_started = time.monotonic()
    assert edit_png(server.grpc_url, image) == reference
    quick_s = time.monotonic() - quick_started
    time.sleep(1.0)
    # The quick edit ran 2 steps (3 UNet calls each, merged or not) and nothing else.
    growth = _unet_executions(server) - after_deadline
    summary(
        "abandoned work",
        f"two 300-step edits abandoned at {deadline_s:.0f} s: the next 2-step edit took "
        f"{quick_s:.2f} s, finished {time.monotonic() - started - 1.0:.1f} s after the start; "
        f"UNet executions after the deadline: {growth} (the quick edit's 2 and at most two "
        "steps per abandoned edit)",
    )
    assert growth <= 2 + 2 * 2


def test_edits_abandoned_while_queued_never_start(server: TritonServer) -> None:
    """Four edits given up after 1 s: two were running, two waited in the queue. Once
    the callers are gone no loop goes on and no queued edit starts: the UNet is called at
    most twice more per running edit (the step in progress, and the next one where the
    forwarding model's poll marks the edit after that step's check; a queued edit that
    started would run a step every few tens of milliseconds)."""
    big = png_bytes(photo(256, 256))

    def abandoned(seed: int) -> str:
        try:
            _send(
                server.grpc_url,
                "instruct_pix2pix",
                {"image": big, **GOOD, "num_inference_steps": 300, "seed": seed},
                timeout_s=1.0,
            )
        except InferenceServerException as error:
            return error.status()
        return "finished"

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(abandoned, range(4))) == {"StatusCode.DEADLINE_EXCEEDED"}
    before = _unet_executions(server)
    time.sleep(1.5)
    assert _unet_executions(server) - before <= 2 * 2


# --------------------------------------------------------------------------- overload


def test_overload_is_refused_at_once(server: TritonServer, summary) -> None:
    """Three times the edits a model holds, at once: the excess is UNAVAILABLE at once,
    before any accepted edit has finished, and every accepted edit succeeds."""
    from model_repository.configs import RepositoryOptions

    limit = RepositoryOptions().max_edits
    image = png_bytes(photo(96, 96))
    barrier = threading.Barrier(3 * limit)

    def send(seed: int) -> tuple[str, float]:
        # Connected and encoded before the barrier, so that every edit arrives while the
        # first accepted ones still run, however slowly threads start on a loaded machine.
        # (A thread that fails before it breaks the barrier for all when the wait times out.)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            inputs = {"image": image, **GOOD, "num_inference_steps": 48, "seed": seed}
            tensors = [contract_input(name, value) for name, value in inputs.items()]
            assert client.is_server_live()
            barrier.wait(timeout=120)
            started = time.monotonic()
            try:
                client.infer("instruct_pix2pix", tensors, client_timeout=120)
            except InferenceServerException as error:
                return error.status() + " " + error.message(), time.monotonic() - started
            return "OK", time.monotonic() - started
        finally:
            client.close()

    with ThreadPoolExecutor(3 * limit) as pool:
        results = list(pool.map(send, range(3 * limit)))
    accepted = sorted(s for outcome, s in results if outcome == "OK")
    refused = [(o, s) for o, s in results if o != "OK"]
    summary(
        "overload",
        f"{3 * limit} edits at once, limit {limit}: {len(accepted)} accepted (slowest "
        f"{accepted[-1]:.2f} s), {len(refused)} refused in at most "
        f"{max(s for _, s in refused) * 1000:.0f} ms",
    )
    assert len(accepted) == limit and len(refused) == 2 * limit
    for outcome, _ in refused:
        assert outcome.startswith("StatusCode.UNAVAILABLE") and "queue size" in outcome
    # Refused, not queued: every refusal came back while the first accepted edit ran.
    assert max(s for _, s in refused) < accepted[0]
