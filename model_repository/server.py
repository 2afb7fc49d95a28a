"""A real tritonserver, started with this project's flags and kept healthy by a supervisor.

`server_flags` is the one list of tritonserver flags: the process started here, the
container command and the Kubernetes manifests all take it from there. Secure by
default: every endpoint binds to 127.0.0.1 unless a host is given, and every API but
inference, health, metadata and metrics needs the admin key (Triton's restricted
protocols). Models load under explicit model control, so the supervisor can replace a
model whose process died without restarting the server.

Without Docker the binary comes from the `nvidia-pytriton` wheel, which ships tritonserver
with the Python backend only: all the `python-onnxruntime` flavour needs. The Python
backend stub runs in this interpreter's environment, so models import torch, diffusers,
onnxruntime and this project.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from model_repository.runtime import RUNTIME_DIR_VARIABLE
from model_repository.supervisor import shared_memory_prefix
from pix2pix_client.contract import ADMIN_GRPC_HEADER, ADMIN_HEADER, ADMIN_KEY_VARIABLE

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
# Seconds tritonserver may take to exit once every model process is gone.
UNLOADED_EXIT_S = 3.0
# Times a tritonserver killed by a signal while it starts is started again.
STARTUP_CRASHES = 2


def new_admin_key() -> str:
    """A key for one server's run: hexadecimal, so that it never starts with "-" and is
    read as a value on any command line (`--admin-key KEY`)."""
    return secrets.token_hex(24)


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


@dataclass(frozen=True)
class ServerSettings:
    """How a tritonserver listens and what it lets through."""

    host: str = LOOPBACK
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    # Never a default value: None makes a random key for this process only.
    admin_key: str | None = None
    tls: TlsFiles | None = None
    exit_timeout_s: int = 30
    log_verbose: int = 0
    extra_flags: tuple[str, ...] = field(default=())

    @property
    def connect_host(self) -> str:
        """Where local clients reach the server (a wildcard bind answers on loopback)."""
        return LOOPBACK if self.host in ("0.0.0.0", "::", "") else self.host


def server_flags(repository: str, settings: ServerSettings, admin_key: str) -> list[str]:
    """Every tritonserver flag of this project, but --backend-directory."""
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
        # process once more, importing torch and diffusers, before loading it.
        "--disable-auto-complete-config",
        "--model-control-mode=explicit",
        "--load-model=*",
        # Edit models import torch and diffusers: on a busy machine a stub's start can
        # take longer than the Python backend's 30 s default.
        "--backend-config=python,stub-timeout-seconds=300",
        f"--backend-config=python,shm-region-prefix-name={shared_memory_prefix()}",
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
    return [*flags, *settings.extra_flags]


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


# SIGKILL for tritonserver when the thread that started it ends, so that a killed test run
# or supervisor never leaves one behind. setpriv (util-linux) sets it between fork and
# exec: a Python preexec_fn would run Python in the child of a process with many threads.
DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "KILL", "--")


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class TritonServer:
    """A tritonserver process serving one model repository, and its supervisor.

    Use as a context manager, or `start()`, `wait_ready()` and `stop()`. While it runs,
    a supervisor thread replaces a model whose process dies or hangs (readiness is false
    meanwhile) and restarts tritonserver if it exits. `stop()` drains: readiness goes
    false, new edits are refused with UNAVAILABLE, edits in flight finish (up to
    `grace_s`), then the server exits.
    """

    def __init__(
        self,
        repository: Path | str,
        *,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        host: str = LOOPBACK,
        admin_key: str | None = None,
        tls: TlsFiles | None = None,
        log_file: Path | None = None,
        log_verbose: int = 0,
        extra_args: tuple[str, ...] = (),
        supervise: bool = True,
        grace_s: float = 60.0,
    ) -> None:
        text = str(repository)
        self.repository = text if "://" in text else str(Path(text).resolve())
        self.settings = ServerSettings(
            host=host,
            grpc_port=grpc_port or free_port(),
            http_port=http_port or free_port(),
            metrics_port=metrics_port or free_port(),
            admin_key=admin_key,
            tls=tls,
            log_verbose=log_verbose,
            extra_flags=tuple(extra_args),
        )
        # Never a default value: without one, a random key only this process knows.
        self.admin_key = admin_key or admin_key_from_environment() or new_admin_key()
        self.log_file = log_file
        self.grace_s = grace_s
        self.process: subprocess.Popen[bytes] | None = None
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self._backends: Path | None = None
        self._supervise = supervise
        self.supervisor = None

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
        return {ADMIN_GRPC_HEADER: self.admin_key}

    @property
    def http_admin_headers(self) -> dict[str, str]:
        return {ADMIN_HEADER: self.admin_key}

    @property
    def runtime_dir(self) -> Path:
        if self._scratch is None:
            raise RuntimeError("the server has not been started")
        return Path(self._scratch.name) / "runtime"

    def repository_arguments(self) -> list[str]:
        """Flags the repository asks for in its repository.json (e.g. the rate limiter),
        read from object storage too: a published repository is served like a local one."""
        if self.repository.startswith("s3://"):
            from model_repository.publish import read_text

            text = read_text(self.repository, "repository.json")
        elif "://" in self.repository:
            return []
        else:
            record = Path(self.repository) / "repository.json"
            text = record.read_text() if record.is_file() else None
        if text is None:
            return []
        return list(json.loads(text).get("server_args", []))

    def command(self, backend_directory: Path | None) -> list[str]:
        flags = server_flags(self.repository, self.settings, self.admin_key)
        if backend_directory is not None:
            flags.append(f"--backend-directory={backend_directory}")
        return [str(tritonserver_binary()), *flags, *self.repository_arguments()]

    def start(self) -> TritonServer:
        self._scratch = tempfile.TemporaryDirectory(prefix="tritonserver-")
        self.runtime_dir.mkdir()
        self._backends = prepare_backend_directory(Path(self._scratch.name) / "backends")
        self._launch()
        if self._supervise:
            from model_repository.supervisor import Supervisor

            self.supervisor = Supervisor(self)
            self.supervisor.start()
        return self

    def _launch(self) -> None:
        """Starts the tritonserver process (again, after it died)."""
        assert self._scratch is not None
        # A log file, this process's stdout ("-": containers log there), or nowhere.
        if self.log_file is None:
            log_target: Any = subprocess.DEVNULL
        elif str(self.log_file) == "-":
            log_target = None
        else:
            log_target = open(self.log_file, "ab")  # noqa: SIM115
        environment = server_environment()
        environment[RUNTIME_DIR_VARIABLE] = str(self.runtime_dir)
        self.process = subprocess.Popen(
            [*DIE_WITH_PARENT, *self.command(self._backends)],
            env=environment,
            stdout=log_target,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if hasattr(log_target, "close"):
            log_target.close()

    def http_client(self) -> object:
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(self.http_url, connection_timeout=5.0)

    def is_ready(self) -> bool:
        client = self.http_client()
        try:
            return bool(client.is_server_ready())  # type: ignore[attr-defined]
        except Exception:
            return False
        finally:
            client.close()  # type: ignore[attr-defined]

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Blocks until the server reports ready, or raises with the end of its log.

        A tritonserver killed by a signal while it loads (seen: an abort in the Python
        backend's shared-memory locks on an overloaded machine) is started again, twice at
        most; one that exits on its own (a broken repository, a port in use) is not.
        """
        deadline = time.monotonic() + timeout_s
        crashes = 0
        while time.monotonic() < deadline:
            process = self.process
            restarting = self.supervisor is not None and self.supervisor.restarting
            if process is not None and process.poll() is not None and not restarting:
                if process.returncode >= 0 or crashes == STARTUP_CRASHES:
                    raise RuntimeError(
                        f"tritonserver exited with {process.returncode}\n{self.log_tail()}"
                    )
                crashes += 1
                self._launch()
            if self.is_ready():
                return
            time.sleep(0.25)
        raise TimeoutError(f"tritonserver not ready after {timeout_s:.0f} s\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        if self.log_file and str(self.log_file) != "-" and Path(self.log_file).is_file():
            return "\n".join(Path(self.log_file).read_text(errors="replace").splitlines()[-lines:])
        return "(no log file)"

    def stop(self, grace_s: float | None = None) -> None:
        """Drains (edits in flight finish, up to the grace period), then stops the server."""
        grace_s = self.grace_s if grace_s is None else grace_s
        if self.supervisor is not None:
            self.supervisor.drain(grace_s)
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self._wait_for_exit()
        if self.supervisor is not None:
            # Only now: a tritonserver that the supervisor started again dies with its thread.
            self.supervisor.stop()
            self.supervisor.remove_shared_memory()
            self.supervisor = None
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def _wait_for_exit(self) -> None:
        """Waits for tritonserver to exit after SIGINT; kills it when it cannot.

        A model whose process died never finishes unloading in Triton 2.51, so shutdown
        would wait the whole exit timeout for it. After the drain nothing is in flight:
        once no live model process is left for a while, the rest is that wait, cut short.
        """
        assert self.process is not None
        deadline = time.monotonic() + self.settings.exit_timeout_s + 5
        unloaded_since: float | None = None
        while time.monotonic() < deadline:
            try:
                self.process.wait(timeout=0.5)
                return
            except subprocess.TimeoutExpired:
                pass
            if self.supervisor is None or self.supervisor.model_processes_alive():
                unloaded_since = None
            elif unloaded_since is None:
                unloaded_since = time.monotonic()
            elif time.monotonic() - unloaded_since > UNLOADED_EXIT_S:
                break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
