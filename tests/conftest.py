"""Shared fixtures: the tiny preset and its validated ONNX export, built once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from export.onnx_export import export_checkpoint, format_table
from export.presets import build_preset


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root folder of the tiny preset: instruct-pix2pix/ and img2img/ diffusers folders."""
    root = tmp_path_factory.mktemp("presets") / "tiny"
    build_preset("tiny", root, seed=0)
    return root


# Sections printed at the end of the run: figures worth reading, not only pass/fail.
_SUMMARY: dict[str, list[str]] = {}


def add_summary(section: str, text: str) -> None:
    _SUMMARY.setdefault(section, []).append(text)


@pytest.fixture(scope="session")
def summary() -> Callable[[str, str], None]:
    """`summary(section, line)` adds a line to the figures printed after the run."""
    return add_summary


@pytest.fixture(scope="session")
def tiny_export(tiny_preset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset exported to ONNX and validated; the folder holds manifest.json."""
    output = tmp_path_factory.mktemp("onnx") / "tiny"
    manifest, rows = export_checkpoint([tiny_preset], output)
    add_summary("ONNX export validated against PyTorch (tiny preset)", format_table(rows))
    assert manifest["validation"]["passed"], rows
    return output


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for section, lines in _SUMMARY.items():
        terminalreporter.write_sep("-", section)
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def reference_pipelines(tiny_preset: Path) -> dict[str, object]:
    """diffusers' reference pipelines of the tiny preset, in PyTorch fp32, by model name."""
    from export.checkpoint import inspect_folder, load_pipeline
    from export.presets import IMG2IMG_FOLDER, PIX2PIX_FOLDER

    return {
        "instruct_pix2pix": load_pipeline(inspect_folder(tiny_preset / PIX2PIX_FOLDER)),
        "img2img": load_pipeline(inspect_folder(tiny_preset / IMG2IMG_FOLDER)),
    }


# What the tests' repositories share: one onnxruntime thread per session (the test
# machine's cores are shared by every model of every server).
# fp32 in onnxruntime (the exact-parity mode, whatever the CPU) and two edits at a time
# per edit model (concurrency tests need two), on one thread per component.
TEST_OPTIONS = {
    "flavour": "python-onnxruntime",
    "precision": "fp32",
    "edit_instances": 2,
    "intra_op_threads": 1,
}
# A server that only has to edit: one pipeline, no streaming models, one edit at a time.
LEAN = {"pipelines": ("instruct_pix2pix",), "streaming_models": False, "edit_instances": 1}


@pytest.fixture(scope="session")
def tiny_repository_with(
    tiny_export: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Path]:
    """`tiny_repository_with(**RepositoryOptions fields)`: a python-onnxruntime repository
    of the tiny preset with these options over TEST_OPTIONS, built once per session."""
    from model_repository.builder import build_repository
    from model_repository.configs import RepositoryOptions

    built: dict[RepositoryOptions, Path] = {}

    def repository(**options: object) -> Path:
        chosen = RepositoryOptions(**{**TEST_OPTIONS, **options})  # type: ignore[arg-type]
        if chosen not in built:
            output = tmp_path_factory.mktemp("repository") / "tiny"
            build_repository(tiny_export, output, chosen)
            built[chosen] = output
        return built[chosen]

    return repository


@pytest.fixture(scope="session")
def tiny_repository(tiny_repository_with: Callable[..., Path]) -> Path:
    """The tiny preset's repository with every model `make serve` serves."""
    return tiny_repository_with()


@pytest.fixture(scope="session")
def lean_repository(tiny_repository_with: Callable[..., Path]) -> Path:
    """The tiny preset's repository with only what an edit needs (LEAN)."""
    return tiny_repository_with(**LEAN)


@pytest.fixture(scope="session")
def tiny_server(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real tritonserver serving the tiny repository for the whole test session."""
    from serving.tritonserver import TritonServer

    log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    server = TritonServer(tiny_repository, log_file=log)
    server.start()
    try:
        server.wait_ready(timeout_s=300)
        yield server
    finally:
        server.stop()


@pytest.fixture()
def grpc_client(tiny_server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory):
    """Starts servers of the module's own (they stop with the module): `start(repository,
    watchdog=None, **ServerSettings fields)` returns a ready TritonServer on free ports."""
    from serving.supervisor import Watchdog
    from serving.tritonserver import ServerSettings, TritonServer

    started: list[TritonServer] = []

    def start(
        repository: Path, watchdog: Watchdog | None = None, **settings: object
    ) -> TritonServer:
        log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
        server = TritonServer(
            repository,
            ServerSettings.on_free_ports(**settings),
            log_file=log,
            watchdog=watchdog,
        )
        started.append(server)
        server.start()
        server.wait_ready(timeout_s=300)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def read_only_copy(tmp_path: Path, request: pytest.FixtureRequest) -> Callable[..., Path]:
    """Makes a copy of a folder, less the names in `leave_out` and changed by `change`,
    that cannot be written: a read-only bind mount as root (a volume mounted read-only),
    write bits cleared otherwise; skips the test where root may not mount."""
    made: list[Path] = []

    def make(
        source: Path, leave_out: tuple[str, ...] = (), change: Callable[[Path], None] | None = None
    ) -> Path:
        copy = tmp_path / f"{source.name}-copy{len(made)}"
        made.append(copy)
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns(*leave_out))
        if change is not None:
            change(copy)
        if os.geteuid() != 0:
            for path in (copy, *copy.rglob("*")):
                path.chmod(path.stat().st_mode & ~0o222)
            return copy
        mounted = copy.with_name(f"{copy.name}-read-only")
        mounted.mkdir()
        mount = ["mount", "--bind", "-o", "ro", str(copy), str(mounted)]
        if subprocess.run(mount, capture_output=True).returncode != 0:
            pytest.skip("no read-only folder here: root, and bind mounts are not allowed")
        # Lazily: unmounted even while something still holds a file open in it.
        request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(mounted)]))
        return mounted

    return make
