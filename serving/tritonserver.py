"""A real tritonserver, started with this project's flags and kept healthy by a supervisor.

`server_flags` is the one list of tritonserver flags: the process started here, the
container command and the Kubernetes manifests all take it from there, and
`ServerSettings` is the one place their values and defaults are declared (serve's flags
come from its fields). Secure by default: every endpoint binds to 127.0.0.1 unless a host
is given, and every API but inference, health, metadata and metrics needs the admin key
(Triton's restricted protocols). Models load under explicit model control, so the
supervisor can replace a model whose process died without restarting the server.

Without Docker the binary comes from the `nvidia-pytriton` wheel, which ships tritonserver
with the Python backend only: all the python flavours need. The Python backend stub runs
in this interpreter's environment, so models import this project and its dependencies.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from edit_pipeline.runtime_status import RUNTIME_DIR_VARIABLE
from model_repository.arguments import option
from model_repository.record import read_record
from pix2pix_client.contract import ADMIN_HEADER, ADMIN_KEY_VARIABLE
from serving.admin import AdminClient, new_admin_key
from serving.supervisor import Supervisor, Watchdog

ADMIN_KEY_FILE_VARIABLE = "IMAGE_EDIT_ADMIN_KEY_FILE"
# Everything but inference, health, metadata (and metrics, a port of its own).
RESTRICTED_APIS = (
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)
LOOPBACK = "127.0.0.1"
# SIGKILL for tritonserver when the thread that started it ends, so that a killed test run
# or supervisor never leaves one behind. setpriv (util-linux) sets it between fork and
# exec: a Python preexec_fn would run Python in the child of a process with many threads.
DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "KILL", "--")


def admin_key_from_environment() -> str | None:
    """The admin key the operator set: $IMAGE_EDIT_ADMIN_KEY, or the file named by
    $IMAGE_EDIT_ADMIN_KEY_FILE (a mounted secret). None when neither is set."""
    if os.environ.get(ADMIN_KEY_VARIABLE):
        return os.environ[ADMIN_KEY_VARIABLE]
    path = os.environ.get(ADMIN_KEY_FILE_VARIABLE)
    if path:
        key = Path(path).read_text().strip()
        if not key:
            raise ValueError(f"{ADMIN_KEY_FILE_VARIABLE}={path}: the file is empty")
        return key
    return None


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of gRPC's TLS: the server's certificate and key; with a root
    certificate, clients must present a certificate it signed (mutual TLS)."""

    certificate: Path
    private_key: Path
    root_certificate: Path | None = None


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ServerSettings:
    """How a tritonserver listens, what it lets through and how it stops: each a flag of
    `serve` (TLS has flags of its own there)."""

    host: str = option(LOOPBACK, "address every endpoint binds to (0.0.0.0 opens it)")
    grpc_port: int = option(8001, "gRPC port (edits, health, metadata)")
    http_port: int = option(8000, "HTTP port (KServe v2: health, metadata, inference)")
    metrics_port: int = option(8002, "Prometheus metrics port")
    grace: float = option(60.0, "seconds edits in flight may take to finish on SIGTERM")
    exit_timeout_s: int = option(30, "seconds tritonserver may take to unload its models")
    log_verbose: int = option(0, "tritonserver's log verbosity (0: informational only)")
    tls: TlsFiles | None = None

    @classmethod
    def on_free_ports(cls, **settings: Any) -> ServerSettings:
        """Settings whose ports are free ones of this machine's loopback (tests, demo)."""
        ports = {name: free_port() for name in ("grpc_port", "http_port", "metrics_port")}
        return cls(**{**ports, **settings})

    def check(self) -> None:
        """Raises ValueError (one line) naming each setting outside what tritonserver takes."""
        ports = {name: getattr(self, name) for name in ("grpc_port", "http_port", "metrics_port")}
        problems = [f"{name}={port}" for name, port in ports.items() if not 1 <= port <= 65535]
        if problems:
            raise ValueError(f"{', '.join(problems)}: allowed a port 1..65535")
        if len(set(ports.values())) < len(ports):
            shown = ", ".join(f"{name}={port}" for name, port in ports.items())
            raise ValueError(f"{shown}: allowed three different ports")
        if not math.isfinite(self.grace) or self.grace < 0:
            raise ValueError(f"grace={self.grace}: allowed seconds >= 0")
        if self.exit_timeout_s < 1:
            raise ValueError(f"exit_timeout_s={self.exit_timeout_s}: allowed seconds >= 1")
        if self.log_verbose < 0:
            raise ValueError(f"log_verbose={self.log_verbose}: allowed 0 or more")
        if not self.host.strip():
            raise ValueError(
                f"host={self.host!r}: allowed an address to bind to (127.0.0.1, 0.0.0.0, ...)"
            )

    @property
    def connect_host(self) -> str:
        """Where local clients reach the server (a wildcard bind answers on loopback)."""
        return LOOPBACK if self.host in ("0.0.0.0", "::", "") else self.host


def server_flags(repository: str, settings: ServerSettings, admin_key: str) -> list[str]:
    """Every tritonserver flag of this project, but those of one start (the backend
    directory and the shared memory regions' prefix)."""
    restricted = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={admin_key}"
    flags = [
        f"--model-repository={repository}",
        f"--grpc-address={settings.host}",
        f"--http-address={settings.host}",
        f"--metrics-address={settings.host}",
        f"--grpc-port={settings.grpc_port}",
        f"--http-port={settings.http_port}",
        f"--metrics-port={settings.metrics_port}",
        f"--grpc-restricted-protocol={restricted}",
        f"--http-restricted-api={restricted}",
        "--allow-metrics=true",
        "--allow-gpu-metrics=false",
        "--strict-readiness=true",
        # The configs are complete; auto-completion would start every Python model's
        # process once more before loading it.
        "--disable-auto-complete-config",
        "--model-control-mode=explicit",
        "--load-model=*",
        # A model process imports its libraries first: on a busy machine its start can
        # take longer than the Python backend's 30 s default.
        "--backend-config=python,stub-timeout-seconds=300",
        f"--exit-timeout-secs={settings.exit_timeout_s}",
        f"--log-verbose={settings.log_verbose}",
    ]
    if settings.tls is not None:
        flags += [
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={settings.tls.certificate}",
            f"--grpc-server-key={settings.tls.private_key}",
        ]
        if settings.tls.root_certificate is not None:
            flags += [
                "--grpc-use-ssl-mutual=true",
                f"--grpc-root-cert={settings.tls.root_certificate}",
            ]
    return flags


def _pytriton_dir() -> Path | None:
    """The nvidia-pytriton wheel's folder, or None where it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def tritonserver_binary() -> Path:
    """The wheel's tritonserver; elsewhere (the NGC container) the one on PATH."""
    wheel = _pytriton_dir()
    if wheel is not None:
        return wheel / "tritonserver" / "bin" / "tritonserver"
    found = shutil.which("tritonserver")
    if found is None:
        raise FileNotFoundError(
            "no tritonserver: run `make setup` (nvidia-pytriton) or use the NGC container"
        )
    return Path(found)


def prepare_backend_directory(target: Path) -> Path | None:
    """For the wheel's tritonserver: a backend directory whose python/ holds the backend
    and this Python's stub. None elsewhere: the container's own backends serve."""
    wheel = _pytriton_dir()
    if wheel is None:
        return None
    triton = wheel / "tritonserver"
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
    """This interpreter's LIBDIR first: otherwise the wheel's stub loads Debian's older
    libpython."""
    env = dict(os.environ)
    wheel = _pytriton_dir()
    if wheel is None:
        return env
    paths = [sysconfig.get_config_var("LIBDIR"), str(wheel.parent / "nvidia_pytriton.libs")]
    if os.environ.get("LD_LIBRARY_PATH"):
        paths.append(os.environ["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(p for p in paths if p)
    # The stub must import from the same environment as this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


class TritonServer:
    """A tritonserver process serving one model repository, under a supervisor.

    Use as a context manager, or `start()`, `wait_ready()` and `stop()`. While it runs,
    the supervisor replaces a model whose process dies or hangs (readiness is false
    meanwhile) and starts tritonserver again if it dies. `stop()` drains: readiness goes
    false, new edits are refused with UNAVAILABLE, edits in flight finish (up to the
    grace period), then the server exits. Without settings, it listens on free ports of
    loopback.
    """

    def __init__(
        self,
        repository: Path | str,
        settings: ServerSettings | None = None,
        *,
        admin_key: str | None = None,
        log_file: Path | None = None,
        watchdog: Watchdog | None = None,
    ) -> None:
        text = str(repository)
        self.repository = text if "://" in text else str(Path(text).resolve())
        self.settings = settings or ServerSettings.on_free_ports()
        # Never a default value: without one, a random key only this process knows.
        self.admin_key = admin_key or admin_key_from_environment() or new_admin_key()
        self.admin = AdminClient(self.http_url, self.admin_key)
        self.log_file = log_file
        self.watchdog = watchdog
        self.supervisor: Supervisor | None = None
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self._backends: Path | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.settings.connect_host}:{self.settings.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.settings.connect_host}:{self.settings.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.settings.connect_host}:{self.settings.metrics_port}/metrics"

    @property
    def grpc_admin_headers(self) -> dict[str, str]:
        """Headers that open the restricted APIs to a tritonclient gRPC call."""
        return self.admin.grpc_headers

    @property
    def http_admin_headers(self) -> dict[str, str]:
        return self.admin.http_headers

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The tritonserver process running now (the supervisor may have started another)."""
        return None if self.supervisor is None else self.supervisor.process

    @property
    def runtime_dir(self) -> Path:
        if self._scratch is None:
            raise RuntimeError("the server has not been started")
        return Path(self._scratch.name) / "runtime"

    def command(self, shm_prefix: str) -> list[str]:
        """tritonserver's command line for one start."""
        flags = server_flags(self.repository, self.settings, self.admin_key)
        flags.append(f"--backend-config=python,shm-region-prefix-name={shm_prefix}")
        if self._backends is not None:
            flags.append(f"--backend-directory={self._backends}")
        record = read_record(self.repository) or {}
        # Flags the repository asks for (the rate limiter, for one).
        return [str(tritonserver_binary()), *flags, *record.get("server_args", [])]

    def start(self) -> TritonServer:
        self._scratch = tempfile.TemporaryDirectory(prefix="tritonserver-")
        self.runtime_dir.mkdir()
        self._backends = prepare_backend_directory(Path(self._scratch.name) / "backends")
        self.supervisor = Supervisor(self._launch, self.admin, self.runtime_dir, self.watchdog)
        self.supervisor.start()
        return self

    def _launch(self, shm_prefix: str) -> subprocess.Popen[bytes]:
        """Starts a tritonserver process (the supervisor calls it, again after a death)."""
        # A log file, this process's stdout ("-": containers log there), or nowhere.
        if self.log_file is None:
            log_target: Any = subprocess.DEVNULL
        elif str(self.log_file) == "-":
            log_target = None
        else:
            log_target = open(self.log_file, "ab")  # noqa: SIM115
        environment = server_environment()
        environment[RUNTIME_DIR_VARIABLE] = str(self.runtime_dir)
        try:
            return subprocess.Popen(
                [*DIE_WITH_PARENT, *self.command(shm_prefix)],
                env=environment,
                stdout=log_target,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            if hasattr(log_target, "close"):
                log_target.close()

    def is_ready(self) -> bool:
        return self.admin.is_ready()

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Blocks until the server reports ready, or raises with the end of its log."""
        if self.supervisor is None:
            raise RuntimeError("the server has not been started")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.supervisor.failure is not None:
                raise RuntimeError(f"{self.supervisor.failure}\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise TimeoutError(f"tritonserver not ready after {timeout_s:.0f} s\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        if self.log_file and str(self.log_file) != "-" and Path(self.log_file).is_file():
            return "\n".join(Path(self.log_file).read_text(errors="replace").splitlines()[-lines:])
        return "(no log file)"

    def stop(self, grace: float | None = None) -> None:
        """Drains (edits in flight finish, up to the grace period), then stops the server."""
        if self._scratch is None:
            return
        if self.supervisor is not None:
            self.supervisor.drain(self.settings.grace if grace is None else grace)
            self.supervisor.stop(self.settings.exit_timeout_s)
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
