"""Building and serving one benchmark configuration, and warming the server up."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from benchmarks.settings import BenchConfig, admin_key
from export.onnx_export import ensure_export
from model_repository.builder import build_repository
from model_repository.serve import ensure_preset, export_dir_for
from pix2pix_client import EditClient


def log(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class Built:
    preset_root: Path
    export_dir: Path
    repository: Path


def build(config: BenchConfig, build_dir: Path, name: str) -> Built:
    """Preset, export and a fresh repository for one configuration."""
    preset_root = ensure_preset(config.preset, build_dir)
    fp16 = config.options.precision == "fp16"
    fused = config.options.fused_export
    export_dir = export_dir_for(config.preset, build_dir, fused, fp16)
    ensure_export([preset_root], export_dir, fp16=fp16, optimize=fused)
    engines = None
    if config.options.flavour == "tensorrt":
        from export.tensorrt_engines import ENGINES_MANIFEST, build_engines

        engines = build_dir / "engines" / export_dir.name
        if not (engines / ENGINES_MANIFEST).is_file():
            build_engines(export_dir, engines, fp16=fp16)
    repository = build_dir / "bench" / name / "repository"
    build_repository(export_dir, repository, config.options, engines)
    return Built(preset_root, export_dir, repository)


@contextlib.contextmanager
def serving(repository: Path, url: str | None) -> Iterator[str]:
    """The gRPC URL of a running server: `url`, or one started on `repository`."""
    from model_repository.server import TritonServer

    if url is not None:
        yield url
        return
    log_file = repository.parent / "tritonserver.log"
    log_file.unlink(missing_ok=True)
    server = TritonServer(repository, log_file=log_file, admin_key=admin_key())
    started = time.perf_counter()
    server.start()
    try:
        server.wait_ready(timeout_s=600)
        log(f"tritonserver ready in {time.perf_counter() - started:.0f} s ({server.grpc_url})")
        yield server.grpc_url
    finally:
        server.stop()


def warm_up(url: str, config: BenchConfig, image: bytes) -> bytes:
    """As many edits at once as edit instances, twice, then one streamed: every instance
    of every model has run (the first call of an instance allocates lazily)."""
    options = config.request()
    prompt = options.pop("prompt")
    instances = config.options.edit_instances
    with EditClient(url, timeout_s=900) as client, ThreadPoolExecutor(instances) as pool:
        for _ in range(2):
            outputs = list(
                pool.map(
                    lambda _: client.edit(image, prompt, model=config.pipeline, **options).png,
                    range(instances),
                )
            )
        list(client.edit_stream(image, prompt, model=config.pipeline, **options))
    return outputs[0]
