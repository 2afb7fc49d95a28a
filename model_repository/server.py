"""Runs a real tritonserver without Docker, from the binary in the `nvidia-pytriton` wheel.

That wheel ships tritonserver with the Python backend only, which is all the
`python-onnxruntime` flavour needs. The Python backend stub runs in this interpreter's
environment, so models import torch, diffusers, onnxruntime and this project.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType


def _pytriton_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nvidia-pytriton is not installed: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations)))


def tritonserver_binary() -> Path:
    return _pytriton_dir() / "tritonserver" / "bin" / "tritonserver"


def prepare_backend_directory(target: Path) -> Path:
    """A backend directory whose python/ holds the backend and this Python's stub."""
    triton = _pytriton_dir() / "tritonserver"
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    source = triton / "backends" / "python"
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(source / name, python_dir / name)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = triton / "python_backend_stubs" / version / "triton_python_backend_stub"
    shutil.copy2(stub, python_dir / "triton_python_backend_stub")
    return target


def server_environment() -> dict[str, str]:
    """This interpreter's LIBDIR first: otherwise the stub loads Debian's older libpython."""
    libs = _pytriton_dir().parent / "nvidia_pytriton.libs"
    paths = [sysconfig.get_config_var("LIBDIR"), str(libs)]
    if os.environ.get("LD_LIBRARY_PATH"):
        paths.append(os.environ["LD_LIBRARY_PATH"])
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(p for p in paths if p)
    # The stub must import from the same environment as this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TritonServer:
    """A tritonserver process serving one model repository on local ports.

    Use as a context manager; `wait_ready` blocks until every model is loaded.
    """

    def __init__(
        self,
        repository: Path,
        *,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        log_file: Path | None = None,
        log_verbose: int = 0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.repository = Path(repository).resolve()
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_file = log_file
        self.log_verbose = log_verbose
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self._scratch: tempfile.TemporaryDirectory[str] | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def repository_arguments(self) -> list[str]:
        """Flags the repository asks for in its repository.json (e.g. the rate limiter)."""
        record = self.repository / "repository.json"
        if not record.is_file():
            return []
        return list(json.loads(record.read_text()).get("server_args", []))

    def command(self, backend_directory: Path) -> list[str]:
        return [
            str(tritonserver_binary()),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_directory}",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-timeout-secs=30",
            f"--log-verbose={self.log_verbose}",
            *self.repository_arguments(),
            *self.extra_args,
        ]

    def start(self) -> TritonServer:
        self._scratch = tempfile.TemporaryDirectory(prefix="tritonserver-")
        backends = prepare_backend_directory(Path(self._scratch.name) / "backends")
        log_target = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            self.command(backends),
            env=server_environment(),
            stdout=log_target,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Blocks until the server reports ready, or raises with the end of its log."""
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.http_url)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(
                        f"tritonserver exited with {self.process.returncode}\n{self.log_tail()}"
                    )
                with contextlib.suppress(Exception):
                    if client.is_server_ready():
                        return
                time.sleep(0.25)
        finally:
            client.close()
        raise TimeoutError(f"tritonserver not ready after {timeout_s:.0f} s\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        if self.log_file and Path(self.log_file).is_file():
            return "\n".join(Path(self.log_file).read_text(errors="replace").splitlines()[-lines:])
        return "(no log file)"

    def stop(self, timeout_s: float = 45.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def running_server(repository: Path, **kwargs: object) -> Iterator[TritonServer]:
    """Starts a server, waits until it is ready, and stops it afterwards."""
    server = TritonServer(repository, **kwargs)  # type: ignore[arg-type]
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
