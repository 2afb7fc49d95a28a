"""Building and serving one benchmark configuration, and warming the server up."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.settings import BenchConfig, admin_key
from model_repository.chain import BuiltModel, Source, prepare_in_child
from model_repository.configs import MAX_DERIVED_EDIT_INSTANCES
from model_repository.record import REPOSITORY_RECORD, read_record
from pix2pix_client import EditClient


def log(message: str) -> None:
    print(message, flush=True)


def build(config: BenchConfig, build_dir: Path, name: str) -> BuiltModel:
    """Preset, export, engines and a fresh repository for one configuration, through the
    chain `make serve` builds with, in a child process as `make serve` does: at sd15 size
    an export left this one at 8.5 GB RSS beside the servers it then measures."""
    repository = build_dir / "bench" / name / "repository"
    source = Source(preset=config.preset)
    return prepare_in_child(source, config.options, build_dir, repository=repository)


def repository_record(repository: Path) -> dict[str, Any]:
    """What a built repository records of itself (model_repository/record.py)."""
    record = read_record(str(repository))
    if record is None:
        raise FileNotFoundError(f"{repository}: not a built repository (no {REPOSITORY_RECORD})")
    return record


@contextlib.contextmanager
def serving(repository: Path, url: str | None) -> Iterator[str]:
    """The gRPC URL of a running server: `url`, or one started on `repository`."""
    from serving.tritonserver import TritonServer

    if url is not None:
        yield url
        return
    log_file = repository.parent / "tritonserver.log"
    log_file.unlink(missing_ok=True)
    server = TritonServer(repository, admin_key=admin_key(), log_file=log_file)
    started = time.perf_counter()
    server.start()
    try:
        server.wait_ready(timeout_s=600)
        log(f"tritonserver ready in {time.perf_counter() - started:.0f} s ({server.grpc_url})")
        yield server.grpc_url
    finally:
        server.stop()


def warm_up(url: str, config: BenchConfig, image: bytes, repository: Path | None) -> bytes:
    """As many edits at once as edit instances, twice, then one streamed: every instance
    of every model has run (the first call of an instance allocates lazily)."""
    options = config.request()
    prompt = options.pop("prompt")
    # Edits sent beyond the instances queue behind each other: at sd15 size on 2 cores,
    # minutes each. A server at --url derived at most MAX_DERIVED_EDIT_INSTANCES.
    if repository is None:
        instances = config.options.edit_instances or MAX_DERIVED_EDIT_INSTANCES
    else:
        instances = repository_record(repository)["options"]["edit_instances"]
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
