"""Faults a production server meets, on real tritonservers of the tiny preset.

A model process killed with SIGKILL mid-edit (one of each kind: the edit model, which
preprocesses, runs the sampler loop and encodes the PNG; the text encoder; a VAE; the
UNet), one stopped with SIGSTOP (hung), one stuck in a call (while a long call that
computes is not taken for one): each is replaced without a person, readiness is false
meanwhile, edits succeed again, and its shared memory is gone (how long each took is
printed in the run's summary). tritonserver itself killed or stopped is started again.
SIGTERM drains: the edit in flight returns its image, a new one is refused with
UNAVAILABLE, the process exits 0.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest

from edit_pipeline.runtime_status import INSTANCES_DIR, read_reports
from pix2pix_client import EditClient, EditError, Progress, ServerUnavailable
from serving.procfs import ORPHANED_AFTER_S, ModelProcess, gone, model_processes
from serving.supervisor import SERVER, Watchdog
from serving.tritonserver import ServerSettings, TritonServer, free_port
from tests.conftest import LEAN
from tests.serving import photo, png_bytes

# How long the tests wait for a recovery before they call it failed: far past what a
# replacement takes, so that only a recovery that never comes fails (the times it took are
# printed in the summary).
GIVE_UP_S = 180.0
PROMPT = "make it snowy"
# A photo whose edit makes every call far longer than a 64x64 one's.
LARGE_SIDE = 512


@pytest.fixture(scope="module")
def server(start_server: Callable[..., TritonServer], lean_repository: Path) -> TritonServer:
    return start_server(lean_repository)


@pytest.fixture(scope="module")
def image() -> bytes:
    return png_bytes(photo(64, 64))


def processes_of(server: TritonServer, model: str) -> list[ModelProcess]:
    assert server.process is not None
    return [p for p in model_processes(server.process.pid) if p.model == model]


@dataclass
class ReadinessWatch:
    """Polls server readiness from a thread: was it ever false, and when true again."""

    server: TritonServer
    seen_not_ready: bool = False
    ready_again_s: float | None = None
    started: float = field(default_factory=time.monotonic)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            ready = self.server.is_ready()
            if not ready:
                self.seen_not_ready = True
            elif self.seen_not_ready:
                self.ready_again_s = time.monotonic() - self.started
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _edit(url: str, image: bytes, steps: int, seed: int = 1) -> bytes:
    with EditClient(url, retries=0, timeout_s=120) as client:
        return client.edit(image, PROMPT, seed=seed, num_inference_steps=steps).png


# The unary model that forwards an edit and the streaming model that runs it.
FORWARDING_PAIR = ("instruct_pix2pix", "instruct_pix2pix_stream")


def _in_loop(server: TritonServer, model: str) -> ModelProcess:
    """A process of `model`; of an edit model (forwarding or running the edit), the one
    busy with the edit in flight, once it has begun (a loaded machine may take longer than
    the 0.3 s _killed_mid_edit waits)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        reports = read_reports(server.runtime_dir)
        candidates = processes_of(server, model)
        busy = [p for p in candidates if p.pid in reports and reports[p.pid].busy_since]
        if busy or (model not in FORWARDING_PAIR and candidates):
            return (busy or candidates)[0]
        time.sleep(0.05)
    raise AssertionError(f"no {model} process got busy")


def _succeeds_again(url: str, image: bytes, since: float) -> float:
    """Seconds from `since` until an edit succeeds (retrying every 0.2 s)."""
    while time.monotonic() - since < GIVE_UP_S:
        try:
            _edit(url, image, steps=2, seed=9)
            return time.monotonic() - since
        except EditError:
            time.sleep(0.2)
    raise AssertionError(f"edits did not succeed again within {GIVE_UP_S:.0f} s")


def _replaced(server: TritonServer, model: str, since: int) -> None:
    """Waits until the supervisor has recorded a replacement of `model` after its first
    `since` recoveries, or a start of tritonserver again (which loads every model anew:
    once in a CI run, a reload after a forwarded edit's processes died timed out and
    tritonserver aborted)."""
    assert server.supervisor is not None
    deadline = time.monotonic() + GIVE_UP_S
    while not any(r.model in (model, SERVER) for r in server.supervisor.recoveries[since:]):
        assert time.monotonic() < deadline, f"{model} was never replaced"
        time.sleep(0.1)


def _killed_mid_edit(
    server: TritonServer, image: bytes, victim_of: Callable[[], ModelProcess]
) -> tuple[ModelProcess, float, str]:
    """SIGKILL to `victim_of()`, chosen 0.3 s into a long edit: the victim, when it was
    killed, and what the edit in flight got (its image or a retryable error)."""
    with ThreadPoolExecutor(1) as pool:
        in_flight: Future[bytes] = pool.submit(_edit, server.grpc_url, image, 150)
        time.sleep(0.3)
        victim = victim_of()
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        try:
            outcome = f"returned its image ({len(in_flight.result(timeout=GIVE_UP_S))} bytes)"
        except ServerUnavailable as error:
            outcome = f"failed, retryable: {error}"
    return victim, killed_at, outcome


KINDS = {
    "edit model": "instruct_pix2pix",
    "text encoder": "text_encoder",
    "VAE decoder": "vae_decoder",
    "UNet": "unet_pix2pix",
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_killed_model_process_is_replaced(
    server: TritonServer, image: bytes, kind: str, summary
) -> None:
    model = KINDS[kind]
    assert server.supervisor is not None
    recoveries = len(server.supervisor.recoveries)
    watch = ReadinessWatch(server)
    victim, killed_at, outcome = _killed_mid_edit(server, image, lambda: _in_loop(server, model))
    recovered_s = _succeeds_again(server.grpc_url, image, killed_at)
    _replaced(server, model, recoveries)
    watch.stop()
    summary(
        "recovery after kill -9 mid-edit",
        f"{kind:<13} ({victim.instance}): ready again {watch.ready_again_s or 0:.1f} s, "
        f"edits succeed {recovered_s:.1f} s after the kill; the edit in flight {outcome[:90]}",
    )
    assert watch.seen_not_ready, "readiness never turned false"
    # The dead process's shared memory region is gone with it.
    assert not (Path("/dev/shm") / victim.shm_region).exists()
    assert all(p.pid != victim.pid for p in processes_of(server, model))


@pytest.fixture(scope="module")
def forwarding_server(
    start_server: Callable[..., TritonServer], tiny_repository: Path
) -> TritonServer:
    """A server with streaming models: its unary models forward to them."""
    return start_server(tiny_repository)


@pytest.mark.parametrize("model", FORWARDING_PAIR)
def test_a_forwarded_edit_fails_retryably_when_either_process_dies(
    forwarding_server: TritonServer, image: bytes, model: str, summary
) -> None:
    """A unary edit runs in the streaming model's process, forwarded by the unary
    model's: kill -9 either mid-edit and the caller gets a retryable error (or its image),
    never a wait without end; the other process ends too (a response to a BLS caller that
    died would wait for ever, and so would the server's stop), both are replaced, and
    edits succeed again."""
    server = forwarding_server
    assert server.supervisor is not None
    recoveries = len(server.supervisor.recoveries)
    pair: dict[str, ModelProcess] = {}

    def busy() -> ModelProcess:
        pair.update({name: _in_loop(server, name) for name in FORWARDING_PAIR})
        return pair[model]

    _, killed_at, outcome = _killed_mid_edit(server, image, busy)
    recovered_s = _succeeds_again(server.grpc_url, image, killed_at)
    for name, process in pair.items():
        _replaced(server, name, recoveries)
        assert gone(process.pid), f"{name} ({process.pid}) outlived the other process"
    summary(
        "recovery after kill -9 mid-edit",
        f"forwarded edit, {model}: edits succeed {recovered_s:.1f} s after the kill; the "
        f"edit in flight {outcome[:90]}",
    )


def test_a_stopped_process_is_taken_as_hung_and_replaced(
    server: TritonServer, image: bytes, summary
) -> None:
    (victim,) = processes_of(server, "vae_encoder")
    assert server.supervisor is not None
    recoveries = len(server.supervisor.recoveries)
    stopped_at = time.monotonic()
    watch = ReadinessWatch(server)
    os.kill(victim.pid, signal.SIGSTOP)
    recovered_s = _succeeds_again(server.grpc_url, image, stopped_at)
    _replaced(server, "vae_encoder", recoveries)
    watch.stop()
    summary(
        "recovery after SIGSTOP",
        f"vae_encoder stopped: edits succeed {recovered_s:.1f} s later",
    )
    assert watch.seen_not_ready
    assert gone(victim.pid)


def test_a_long_call_that_computes_is_never_stuck_one_that_computes_nothing_is(
    start_server: Callable[..., TritonServer],
    tiny_repository_with: Callable[..., Path],
    summary,
) -> None:
    """A watchdog on a hair trigger (a call may run 10 times its longest before, at least
    0.1 s, and compute nothing for 0.3 s): a first large image after small ones makes
    calls tens of times longer than any before, computing all the while, and nothing is
    replaced; an idle process that reports a long call is."""
    repository = tiny_repository_with(**LEAN)
    watchdog = Watchdog(factor=10.0, floor_s=0.1, first_call_s=0.1, stall_s=0.3, min_cpu_s=0.03)
    server = start_server(repository, watchdog=watchdog)
    assert server.supervisor is not None
    small, large = png_bytes(photo(64, 64)), png_bytes(photo(LARGE_SIDE, LARGE_SIDE))
    for seed in range(3):
        _edit(server.grpc_url, small, steps=2, seed=seed)
    before = {r.instance: r.longest_call_s for r in read_reports(server.runtime_dir).values()}

    _edit(server.grpc_url, large, steps=2)
    after = {r.instance: r.longest_call_s for r in read_reports(server.runtime_dir).values()}
    growth = {name: after[name] / before[name] for name in before if before[name]}
    instance, most = max(growth.items(), key=lambda item: item[1])
    summary(
        "watchdog: real work against a hang",
        f"a {LARGE_SIDE}x{LARGE_SIDE} edit after 64x64 ones: {instance}'s longest call grew "
        f"{most:.0f}x to {after[instance]:.1f} s, computing; nothing replaced",
    )
    assert most >= 20
    assert server.supervisor.recoveries == []

    (victim,) = processes_of(server, "vae_decoder")
    report = server.runtime_dir / INSTANCES_DIR / f"{victim.instance}.{victim.pid}"
    longest = after[victim.instance]
    # The record of edit_pipeline/runtime_status.py: busy since, longest call, waiting,
    # unloading.
    report.write_bytes(struct.pack("<dddd", time.time() - 60 * longest, longest, 0.0, 0.0))
    _replaced(server, "vae_decoder", 0)
    assert gone(victim.pid)


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_hung_tritonserver_is_started_again(
    server: TritonServer, image: bytes, fault: str, summary
) -> None:
    """tritonserver itself killed (a crash, the OOM killer) or stopped (hung) mid-edit:
    the edit in flight fails as retryable, what is left of the server is killed with its
    model processes (their memory and shared memory freed), and a new server comes up on
    the same ports."""
    assert server.process is not None and server.supervisor is not None
    old = server.process.pid
    stubs = model_processes(old)
    recoveries = len(server.supervisor.recoveries)
    with ThreadPoolExecutor(1) as pool:
        in_flight: Future[bytes] = pool.submit(_edit, server.grpc_url, image, 150)
        _in_loop(server, "instruct_pix2pix")
        since = time.monotonic()
        os.kill(old, signal.Signals[fault])
        with pytest.raises(ServerUnavailable):
            in_flight.result()
    recovered_s = _succeeds_again(server.grpc_url, image, since)
    summary(
        "tritonserver itself killed or stopped mid-edit",
        f"{fault}: the edit in flight failed as retryable; a new server served edits "
        f"{recovered_s:.1f} s later",
    )
    assert server.process.pid != old
    assert any(r.model == SERVER for r in server.supervisor.recoveries[recoveries:])
    assert stubs and all(gone(stub.pid) for stub in stubs)
    assert not any((Path("/dev/shm") / stub.shm_region).exists() for stub in stubs)


# --------------------------------------------------------------------------- drain


def _serve(repository: Path, log_file: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    command = [
        sys.executable, "-m", "serving.serve",
        "--repository", str(repository),
        "--grpc-port", str(grpc_port),
        "--http-port", str(http_port),
        "--metrics-port", str(metrics_port),
        "--log-file", str(log_file),
        "--grace", "60",
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return process, f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}"


def _ready(http_url: str) -> bool:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(http_url)
    try:
        return bool(client.is_server_ready())
    except Exception:
        return False
    finally:
        client.close()


def _wait_served(process: subprocess.Popen[bytes], http_url: str) -> None:
    deadline = time.monotonic() + 300
    while not _ready(http_url):
        assert process.poll() is None, process.stdout.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.2)


# Both signals take the same path in serve: each is tried once, with and without the
# streaming models (make serve's default: the unary edit forwarded to the streaming one).
@pytest.mark.parametrize(
    ("signum", "streaming_models"),
    [(signal.SIGTERM, True), (signal.SIGINT, False)],
    ids=["SIGTERM-forwarded", "Ctrl-C"],
)
def test_sigterm_drains_edits_in_flight(
    tiny_repository_with: Callable[..., Path],
    tmp_path: Path,
    image: bytes,
    signum: int,
    streaming_models: bool,
    summary,
) -> None:
    """With streaming models served, the unary edit in flight runs in the streaming
    model's process, forwarded by the unary model's: the drain waits for both."""
    # Two edits at once: one in flight while the next is refused.
    options = {**LEAN, "edit_instances": 2, "streaming_models": streaming_models}
    repository = tiny_repository_with(**options)
    process, grpc_url, http_url = _serve(repository, tmp_path / "serve.log")
    try:
        _wait_served(process, http_url)
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(_edit, grpc_url, image, 250)
            time.sleep(1.0)
            assert not in_flight.done()
            signalled = time.monotonic()
            process.send_signal(signum)
            time.sleep(0.3)
            assert not _ready(http_url)
            with pytest.raises(ServerUnavailable, match="shutting down"):
                _edit(grpc_url, image, 2)
            png = in_flight.result(timeout=120)
        assert png.startswith(b"\x89PNG")
        code = process.wait(timeout=90)
        summary(
            "graceful drain",
            f"{signal.Signals(signum).name}{' (forwarded)' if streaming_models else ''}: the "
            f"edit in flight returned its image, a new one got UNAVAILABLE, exit {code} after "
            f"{time.monotonic() - signalled:.1f} s",
        )
        assert code == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_stop_after_a_previewed_stream_unloads_every_model(
    tiny_repository_with: Callable[..., Path], tmp_path: Path, summary
) -> None:
    """What `pix2pix edit` on a terminal and the web page do for every edit (a stream with
    latent previews), then SIGTERM to `serve` alone, as Docker and Kubernetes send it:
    every model unloads, none waits out tritonserver's exit timeout, serve exits 0."""
    repository = tiny_repository_with(pipelines=("instruct_pix2pix",), edit_instances=1)
    log = tmp_path / "tritonserver.log"
    process, grpc_url, http_url = _serve(repository, log)
    try:
        _wait_served(process, http_url)
        with EditClient(grpc_url) as client:
            events = list(
                client.edit_stream(
                    png_bytes(photo(256, 192)), "invert the colors", num_inference_steps=30,
                    preview_every=5, seed=1,
                )
            )  # fmt: skip
        previews = [e for e in events if isinstance(e, Progress) and e.preview_png]
        assert len(previews) == 6
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
        stop_s = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    text = log.read_text(errors="replace")
    summary("stop after a previewed stream", f"SIGTERM: exit {code} after {stop_s:.1f} s")
    assert code == 0
    assert "Non-graceful termination" not in text and "Exit timeout expired" not in text
    models = json.loads((repository / "repository.json").read_text())["models"]
    assert all(f"successfully unloaded '{model}'" in text for model in models)


# A decoupled model that keeps every response sender open: tritonserver then holds the
# model live and never asks its process to unload, the state Triton 2.51 now and then
# leaves a streaming model in when a client cancels a stream just as it ends (its gRPC
# frontend apparently never deletes that stream's request; every thread and model
# process idle).
HELD_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils

from edit_pipeline.runtime_status import InstanceStatus

OPEN_SENDERS = []


class TritonPythonModel:
    def initialize(self, args):
        self.status = InstanceStatus(args["model_instance_name"])

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            out = pb_utils.Tensor("out", np.array([1], dtype=np.int32))
            sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
            OPEN_SENDERS.append(sender)

    def finalize(self):
        self.status.close()
"""
HELD_CONFIG = """
name: "held"
backend: "python"
model_transaction_policy { decoupled: true }
input { name: "in" data_type: TYPE_INT32 dims: [ 1 ] }
output { name: "out" data_type: TYPE_INT32 dims: [ 1 ] }
instance_group { count: 1 kind: KIND_CPU }
"""


def test_a_model_tritonserver_never_unloads_does_not_hold_the_stop(tmp_path: Path, summary) -> None:
    """After the drain nothing is in flight: a model whose processes tritonserver never
    asks to unload is given up on once nothing else unloads, not waited for until the
    exit timeout (120 s here); the server and every model process end."""
    import tritonclient.grpc as triton_grpc

    repository = tmp_path / "repository"
    (repository / "held" / "1").mkdir(parents=True)
    (repository / "held" / "config.pbtxt").write_text(HELD_CONFIG)
    (repository / "held" / "1" / "model.py").write_text(HELD_MODEL)
    log = tmp_path / "tritonserver.log"
    settings = ServerSettings.on_free_ports(exit_timeout_s=120)
    server = TritonServer(repository, settings, log_file=log)
    server.start()
    try:
        server.wait_ready(timeout_s=300)
        assert server.process is not None
        tritonserver, stubs = server.process, model_processes(server.process.pid)
        responses: queue.Queue[object] = queue.Queue()
        client = triton_grpc.InferenceServerClient(server.grpc_url)
        client.start_stream(callback=lambda result, error: responses.put(error or result))
        probe = triton_grpc.InferInput("in", [1], "INT32")
        probe.set_data_from_numpy(np.array([7], dtype=np.int32))
        client.async_stream_infer("held", [probe])
        first = responses.get(timeout=60)
        assert not isinstance(first, Exception), first
        client.stop_stream(cancel_requests=True)
        client.close()
        started = time.monotonic()
    finally:
        server.stop()
    stop_s = time.monotonic() - started
    text = log.read_text(errors="replace")
    summary(
        "stop with a model tritonserver never unloads",
        f"stopped in {stop_s:.1f} s against an exit timeout of 120 s",
    )
    assert "successfully unloaded 'held'" not in text  # the model really was held
    assert stop_s < 60
    # Killed with its process group: a process with large mappings takes a moment to exit.
    _wait_gone([tritonserver.pid, *(stub.pid for stub in stubs)], within_s=10)


def _wait_gone(pids: list[int], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not all(gone(pid) for pid in pids):
        assert time.monotonic() < deadline, "a killed process is still there"
        time.sleep(0.2)


# --------------------------------------------------------------------------- shared memory


def test_no_shared_memory_is_left_behind(
    start_server: Callable[..., TritonServer],
    lean_repository: Path,
    tmp_path: Path,
    server: TritonServer,
) -> None:
    """Every process of `serve` killed with SIGKILL at once (kill -9 of them all, as when
    a machine runs out of memory) leaves the model processes' shared memory behind: the
    next server's start removes the regions no process maps. A normal stop removes its
    own, and only its own."""
    neighbour = server
    process, _, http_url = _serve(lean_repository, tmp_path / "serve.log")
    try:
        _wait_served(process, http_url)
        (tritonserver,) = psutil.Process(process.pid).children()
        stubs = model_processes(tritonserver.pid)
        orphaned = [p.shm_region for p in stubs]
        os.kill(process.pid, signal.SIGSTOP)  # its supervisor restarts nothing
        os.killpg(tritonserver.pid, signal.SIGKILL)  # tritonserver and its model processes
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    _wait_gone([p.pid for p in [tritonserver, *stubs]], within_s=60)
    assert orphaned and all((Path("/dev/shm") / r).exists() for r in orphaned)
    newest = max((Path("/dev/shm") / r).stat().st_ctime for r in orphaned)
    time.sleep(max(0.0, newest + ORPHANED_AFTER_S - time.time()))

    server = start_server(lean_repository)
    assert not [r for r in orphaned if (Path("/dev/shm") / r).exists()]
    assert server.process is not None
    regions = [p.shm_region for p in model_processes(server.process.pid)]
    assert regions and all((Path("/dev/shm") / r).exists() for r in regions)
    # Another server of this process, whose regions its stop must leave alone.
    assert neighbour.process is not None
    theirs = [p.shm_region for p in model_processes(neighbour.process.pid)]
    server.stop()
    assert not [r for r in regions if (Path("/dev/shm") / r).exists()]
    assert theirs and all((Path("/dev/shm") / r).exists() for r in theirs)
