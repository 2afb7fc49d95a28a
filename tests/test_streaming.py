"""Streamed edits through a real tritonserver (tiny preset): the streaming models, the
client library's edit_stream and on_progress, and the command's progress bars."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import io
import os
import queue
import select
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyte
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from pix2pix_client import (
    AsyncEditClient,
    DeadlineExceeded,
    EditClient,
    EditResult,
    InvalidArgument,
    Progress,
    contract,
)
from pix2pix_client.request import build_inputs
from serving.procfs import model_processes, pss_bytes
from serving.tritonserver import TritonServer
from tests.serving import execution_counts, photo, plain_tritonserver, png_bytes

PROMPT = "make it snowy"


@pytest.fixture(scope="module")
def url(tiny_server: TritonServer) -> str:
    return tiny_server.grpc_url


def _events(url: str, image: bytes, model: str, **options: object) -> list[Progress | EditResult]:
    with EditClient(url, timeout_s=120) as client:
        return list(client.edit_stream(image, PROMPT, model=model, **options))


CASES = [
    ("instruct_pix2pix", "euler_a", (64, 64)),
    ("instruct_pix2pix", "ddim", (80, 48)),
    ("img2img", "dpmpp_2m", (64, 64)),
    ("img2img", "pndm", (48, 72)),
]


def test_the_unary_models_forward_to_the_streaming_ones_and_import_no_torch(
    tiny_server: TritonServer, url: str
) -> None:
    """One process per pipeline runs edits: a unary edit is run by the streaming model
    (its statistics count it), and the unary model's processes map no torch library and
    hold a fraction of an edit model's memory."""
    stream = contract.stream_model(contract.INSTRUCT_PIX2PIX)
    before, _ = execution_counts(tiny_server, stream)
    with EditClient(url) as client:
        client.edit(png_bytes(photo(40, 32)), PROMPT, num_inference_steps=2, seed=5)
    after, _ = execution_counts(tiny_server, stream)
    assert after == before + 1
    stubs = model_processes(tiny_server.process.pid)
    for pipeline in contract.PIPELINES:
        unary = [p for p in stubs if p.model == pipeline]
        edit = [p for p in stubs if p.model == contract.stream_model(pipeline)]
        assert unary and edit
        for stub in unary:
            assert "libtorch" not in Path(f"/proc/{stub.pid}/maps").read_text()
        assert all("libtorch" in Path(f"/proc/{p.pid}/maps").read_text() for p in edit)
        assert max(map(pss_bytes, (p.pid for p in unary))) * 4 < min(pss_bytes(p.pid) for p in edit)


@pytest.mark.parametrize(("model", "scheduler", "size"), CASES)
def test_the_streamed_result_equals_the_whole_edit_byte_for_byte(
    url: str, model: str, scheduler: str, size: tuple[int, int]
) -> None:
    image = png_bytes(photo(*size))
    options = {"num_inference_steps": 6, "seed": 21, "scheduler": scheduler}
    events = _events(url, image, model, preview_every=2, **options)
    *progress, result = events
    assert isinstance(result, EditResult) and result.seed == 21
    with EditClient(url) as client:
        whole = client.edit(image, PROMPT, model=model, **options)
    assert result.png == whole.png
    # One event per denoising step, in order; img2img runs temperature x steps of them.
    steps = progress[0].num_steps
    expected = 6 if model == contract.INSTRUCT_PIX2PIX else int(6 * 0.8)
    # PNDM (skipping its Runge-Kutta steps) calls the UNet on its first timestep twice.
    assert steps == expected + (scheduler == "pndm")
    assert [e.step for e in progress] == list(range(1, steps + 1))
    assert all(e.num_steps == steps and e.seed == 21 for e in progress)
    # Previews at steps 2, 4, ... and the last: decodable, the edit's size.
    previewed = [e.step for e in progress if e.preview_png is not None]
    assert previewed == sorted({*range(2, steps + 1, 2), steps})
    preview = next(e for e in progress if e.preview_png is not None).preview
    assert preview is not None and preview.size == whole.image.size


def test_progress_only_by_default(url: str) -> None:
    events = _events(url, png_bytes(photo(64, 64)), "instruct_pix2pix", num_inference_steps=3)
    assert [type(e).__name__ for e in events] == ["Progress"] * 3 + ["EditResult"]
    assert all(e.preview_png is None for e in events[:3])  # type: ignore[union-attr]


def test_a_bad_input_ends_the_stream_with_invalid_argument(url: str) -> None:
    image = png_bytes(photo(64, 64))
    with EditClient(url) as client:
        broken = client.edit_stream(image[:100], PROMPT, num_inference_steps=3)
        with pytest.raises(InvalidArgument) as refused:
            next(broken)
        assert refused.value.field == "image"
        assert refused.value.status == "StatusCode.INVALID_ARGUMENT"
        # The next stream works.
        assert isinstance(
            list(client.edit_stream(image, PROMPT, num_inference_steps=2))[-1], EditResult
        )


def test_a_cancel_token_from_a_client_is_refused(url: str) -> None:
    """cancel_token is what the unary models forward their edits with (their caller's
    cancellation, errors as an output they relay). From a client it turned the stream
    into one without progress whose errors came back as a successful response; now it is
    INVALID_ARGUMENT naming it, and the next stream works."""
    inputs, outputs = build_inputs(
        png_bytes(photo(64, 64)), {"prompt": PROMPT, "num_inference_steps": 2}, streaming=True
    )
    token = grpcclient.InferInput("cancel_token", [1], "BYTES")
    token.set_data_from_numpy(np.array([b"0123456789abcdef"], dtype=np.object_))
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: responses.put(error or result))
        client.async_stream_infer("instruct_pix2pix_stream", [*inputs, token], outputs=outputs)
        refused = responses.get(timeout=60)
        client.stop_stream()
    finally:
        client.close()
    assert isinstance(refused, InferenceServerException), refused
    assert "cancel_token is what a unary model forwards its edits to" in refused.message()
    assert "allowed none" in refused.message()
    events = _events(url, png_bytes(photo(64, 64)), "instruct_pix2pix", num_inference_steps=2)
    assert [type(e).__name__ for e in events] == ["Progress"] * 2 + ["EditResult"]


def _unet_executions(server: TritonServer) -> int:
    return execution_counts(server, "unet_pix2pix")[1]


def test_leaving_a_stream_early_cancels_the_servers_work(
    tiny_server: TritonServer, url: str, summary
) -> None:
    big = png_bytes(photo(256, 256))
    with EditClient(url) as client:
        stream = client.edit_stream(big, PROMPT, num_inference_steps=300, seed=1)
        for event in stream:
            assert isinstance(event, Progress)
            if event.step == 2:
                break
        stream.close()  # what garbage collection would do
        left = time.monotonic()
        stopped_at = _unet_executions(tiny_server)
        quick = client.edit(png_bytes(photo(64, 64)), PROMPT, num_inference_steps=2, seed=2)
        quick_s = time.monotonic() - left
    time.sleep(1.0)
    growth = _unet_executions(tiny_server) - stopped_at
    summary(
        "stream cancellation",
        f"a 300-step stream left after 2 events: the next 2-step edit took {quick_s:.2f} s "
        f"({quick.latency_s:.2f} s on the server); UNet executions since: {growth}",
    )
    assert growth <= 2 + 1  # the quick edit's 2 steps, and at most the step in progress


def test_cancelling_the_async_task_cancels_the_servers_work(
    tiny_server: TritonServer, url: str
) -> None:
    big = png_bytes(photo(256, 256))

    async def watch(steps_seen: list[int]) -> None:
        async with AsyncEditClient(url) as client:
            async for event in client.edit_stream(big, PROMPT, num_inference_steps=300):
                if isinstance(event, Progress):
                    steps_seen.append(event.step)

    async def run() -> list[int]:
        steps_seen: list[int] = []
        task = asyncio.create_task(watch(steps_seen))
        while len(steps_seen) < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return steps_seen

    assert len(asyncio.run(run())) >= 2
    time.sleep(0.3)
    stopped_at = _unet_executions(tiny_server)
    time.sleep(1.0)
    assert _unet_executions(tiny_server) - stopped_at <= 1


def test_under_a_plain_tritonserver_a_forwarded_edit_stops_when_its_caller_leaves(
    tiny_repository_with, tmp_path: Path, summary
) -> None:
    """tritonserver run by hand on the repository (no supervisor, no runtime directory):
    a unary edit whose caller gives up stops in the streaming model's process that runs
    it, and the folder the two models shared goes when the server stops."""
    repository = tiny_repository_with(pipelines=("instruct_pix2pix",), edit_instances=1)
    with plain_tritonserver(repository, tmp_path) as (server, process):
        shared = Path(tempfile.gettempdir()) / f"image-edit-{os.getuid()}-{process.pid}"
        client = EditClient(server.grpc_url, retries=0, timeout_s=2.0)
        with client, pytest.raises(DeadlineExceeded):
            client.edit(png_bytes(photo(256, 256)), PROMPT, num_inference_steps=300)
        time.sleep(0.3)
        stopped_at = _unet_executions(server)
        time.sleep(1.5)
        growth = _unet_executions(server) - stopped_at
        left_over = list(shared.glob("forwarded/*"))
    summary(
        "plain tritonserver",
        f"a forwarded 300-step edit abandoned at 2 s: UNet executions 0.3-1.8 s later: {growth}",
    )
    assert growth <= 1 and left_over == []
    assert not shared.exists()


def test_on_progress_gets_every_step(url: str) -> None:
    seen: list[int] = []
    with EditClient(url) as client:
        result = client.edit(
            png_bytes(photo(64, 64)),
            PROMPT,
            num_inference_steps=4,
            seed=5,
            on_progress=lambda event: seen.append(event.step),
        )
    assert seen == [1, 2, 3, 4] and result.seed == 5


def test_four_concurrent_streams_merge_their_unet_calls(
    tiny_server: TritonServer, url: str, summary
) -> None:
    images = [png_bytes(photo(64, 64)) for _ in range(4)]
    before = execution_counts(tiny_server, "unet_pix2pix")

    def stream(index: int) -> EditResult:
        event = _events(url, images[index], "instruct_pix2pix", num_inference_steps=8, seed=index)
        return event[-1]  # type: ignore[return-value]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(stream, range(4)))
    after = execution_counts(tiny_server, "unet_pix2pix")
    requests, executions = after[0] - before[0], after[1] - before[1]
    summary(
        "streams and dynamic batching",
        f"4 concurrent streams: {requests} UNet calls ran in {executions} executions",
    )
    assert all(isinstance(r, EditResult) for r in results)
    assert requests == 4 * 8 and executions < requests


# --------------------------------------------------------------------------- the command


# The command as a shell's foreground job starts it: the pseudo-terminal is its controlling
# terminal, and Ctrl-C is on. A test run started in the background of a script passes an
# ignored SIGINT on, and the command would rightly keep ignoring it. A small launcher,
# in the new session, takes the terminal and restores Ctrl-C, then becomes the command.
_AS_A_FOREGROUND_JOB = (
    "import fcntl, os, signal, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, '-m', 'pix2pix_client', *sys.argv[1:]])"
)


class _Terminal:
    """The command running in a 30x120 pseudo-terminal, and what its screen shows.

    Started by subprocess, whose fork runs no Python in the child: Python in the forked
    child of a process with this many threads is unsafe.
    """

    def __init__(self, arguments: list[str], cwd: Path) -> None:
        self._controller, terminal = os.openpty()
        try:
            fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
            self.process = subprocess.Popen(
                [sys.executable, "-c", _AS_A_FOREGROUND_JOB, *arguments],
                stdin=terminal, stdout=terminal, stderr=terminal, cwd=cwd,
                start_new_session=True,
                env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"},
            )  # fmt: skip
        except BaseException:
            os.close(self._controller)
            raise
        finally:
            os.close(terminal)
        self.screen = pyte.Screen(120, 30)
        self._stream = pyte.ByteStream(self.screen)
        self._closed = False

    def show(self, wait: float = 0.05) -> str:
        """Everything written so far, as the screen shows it."""
        while not self._closed and select.select([self._controller], [], [], wait)[0]:
            try:
                written = os.read(self._controller, 65536)
            except OSError as error:  # EIO: the command and its children closed the terminal
                if error.errno != errno.EIO:
                    raise
                written = b""
            if not written:
                os.close(self._controller)
                self._closed = True
            self._stream.feed(written)
        return "\n".join(self.screen.display)

    def alive(self) -> bool:
        return self.process.poll() is None

    def __enter__(self) -> _Terminal:
        return self

    def __exit__(self, *failure: object) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait()
        if not self._closed:
            os.close(self._controller)

    def finish(self, timeout: float) -> str:
        """How the command ended, once it has, with the screen read to the end."""
        deadline = time.monotonic() + timeout
        while not self._closed and time.monotonic() < deadline:
            self.show(wait=0.5)
        code = self.process.wait(timeout=max(1.0, deadline - time.monotonic()))
        return f"exit {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"


def test_the_command_shows_a_progress_bar_in_a_terminal(url: str, tmp_path: Path, summary) -> None:
    source = tmp_path / "photo.png"
    source.write_bytes(png_bytes(photo(128, 128)))
    arguments = ["edit", "photo.png", "-p", PROMPT, "--steps", "60", "--seed", "3", "--url", url,
                 "--previews", "previews", "--preview-every", "20"]  # fmt: skip
    with _Terminal(arguments, tmp_path) as command:
        seen_bar = ""
        deadline = time.monotonic() + 120
        while command.alive() and time.monotonic() < deadline:
            shown = command.show()
            if "steps" in shown and "/60" in shown:
                seen_bar = next(line for line in shown.splitlines() if "/60" in line)
        ended = command.finish(timeout=30)
        summary("the command's bar in a pseudo-terminal", seen_bar.strip())
        assert ended == "exit 0", command.show()
        assert "photo.png" in seen_bar and "steps" in seen_bar
        assert "photo.png -> photo_edited.png" in command.show()
    edited = Image.open(tmp_path / "photo_edited.png")
    assert edited.size == (128, 128)
    previews = sorted(p.name for p in (tmp_path / "previews").iterdir())
    assert previews == ["photo_step0020.png", "photo_step0040.png", "photo_step0060.png"]
    with EditClient(url) as client:
        same = client.edit(source, PROMPT, num_inference_steps=60, seed=3)
    assert np.array_equal(np.asarray(edited), np.asarray(same.image))


def test_ctrl_c_cancels_the_servers_work_and_exits_130(
    tiny_server: TritonServer, url: str, tmp_path: Path
) -> None:
    (tmp_path / "photo.png").write_bytes(png_bytes(photo(256, 256)))
    # The most steps allowed: the edit still runs when the signal lands.
    arguments = ["edit", "photo.png", "-p", PROMPT, "--steps", "1000", "--url", url]
    with _Terminal(arguments, tmp_path) as command:
        deadline = time.monotonic() + 120
        while "/1000" not in command.show():
            assert command.alive() and time.monotonic() < deadline, command.show()
        command.process.send_signal(signal.SIGINT)
        ended = command.finish(timeout=90)  # a loaded machine exits slowly
        assert ended == "exit 130", command.show()
    time.sleep(0.3)
    stopped_at = _unet_executions(tiny_server)
    time.sleep(1.0)
    assert _unet_executions(tiny_server) - stopped_at <= 1
    assert not (tmp_path / "photo_edited.png").exists()


def test_json_and_pipes_stay_plain(url: str, tmp_path: Path) -> None:
    """Not a terminal: no bar, the same lines as before streaming existed."""
    (tmp_path / "photo.png").write_bytes(png_bytes(photo(64, 64)))
    done = subprocess.run(
        [sys.executable, "-m", "pix2pix_client", "edit", "photo.png", "-p", PROMPT, "--steps",
         "2", "--seed", "4", "--url", url, "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    line = done.stdout.strip()
    assert line.startswith("{") and '"seed": 4' in line


def test_an_edit_streamed_to_a_non_square_size_previews_at_that_aspect(url: str) -> None:
    image = png_bytes(photo(96, 48))
    *progress, result = _events(url, image, "img2img", num_inference_steps=5, preview_every=1)
    assert isinstance(result, EditResult)
    previews = [Image.open(io.BytesIO(e.preview_png)) for e in progress if e.preview_png]
    assert previews and all(p.size == (96, 48) for p in previews)
