"""Builds whatever is missing for a preset or checkpoint, then serves it until Ctrl-C.

    python -m model_repository.serve [--preset tiny | --model DIR] [--flavour ...]

Steps, each skipped when its output is already there and current: the preset's weights,
the validated ONNX export, the model repository; then tritonserver (from the
`nvidia-pytriton` wheel) starts, the endpoints are printed once every model is ready,
and Ctrl-C (or SIGTERM) shuts it down cleanly.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from export.checkpoint import UnsupportedCheckpointError
from export.onnx_export import MANIFEST
from export.presets import PRESETS
from model_repository.builder import build_repository
from model_repository.configs import FLAVOURS, RepositoryOptions
from model_repository.server import TritonServer

DEFAULT_BUILD_DIR = Path("build")


@dataclass(frozen=True)
class BuiltModel:
    name: str
    export_dir: Path
    repository: Path


def _log(message: str) -> None:
    print(message, flush=True)


def ensure_export(source: Path, export_dir: Path) -> None:
    """Exports `source` unless a passing export of the same folder exists."""
    from export.onnx_export import export_checkpoint, format_table

    manifest_path = export_dir / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        sources = {Path(p["source"]) for p in manifest["pipelines"].values()}
        resolved = source.resolve()
        if manifest["validation"]["passed"] and all(
            p == resolved or p.parent == resolved for p in sources
        ):
            _log(f"export up to date: {export_dir}")
            return
    _log(f"exporting {source} to ONNX ...")
    manifest, rows = export_checkpoint([source], export_dir)
    _log(format_table(rows))
    if not manifest["validation"]["passed"]:
        raise RuntimeError(f"{export_dir}: the export failed validation against PyTorch")


def ensure_preset(preset: str, build_dir: Path) -> Path:
    from export.presets import build_preset

    root = build_dir / "presets" / preset
    marker = root / "preset.json"
    if marker.is_file() and json.loads(marker.read_text()).get("preset") == preset:
        _log(f"preset up to date: {root}")
        return root
    _log(f"building the {preset} preset (random weights of the real architectures) ...")
    for folder, digest in build_preset(preset, root).items():
        _log(f"  {folder}: sha256 {digest}")
    return root


def resolve_source(preset: str | None, model: Path | None, build_dir: Path) -> tuple[str, Path]:
    """The served model's name and its diffusers folder, building the preset if needed."""
    if model is not None:
        model = Path(model)
        if not model.is_dir():
            raise FileNotFoundError(f"{model}: no such folder")
        return model.resolve().name, model
    name = preset or "tiny"
    return name, ensure_preset(name, build_dir)


def export_dir_for(name: str, build_dir: Path) -> Path:
    return build_dir / "onnx" / name


def write_repository(
    name: str,
    export_dir: Path,
    build_dir: Path,
    options: RepositoryOptions,
    engines_dir: Path | None = None,
) -> Path:
    repository = build_dir / "repository" / f"{name}-{options.flavour}"
    models = build_repository(export_dir, repository, options, engines_dir)
    _log(f"repository ({options.flavour}, {len(models)} models): {repository}")
    return repository


def prepare(
    *,
    preset: str | None = None,
    model: Path | None = None,
    build_dir: Path = DEFAULT_BUILD_DIR,
    options: RepositoryOptions | None = None,
    engines_dir: Path | None = None,
) -> BuiltModel:
    """Preset or checkpoint -> validated export -> model repository."""
    options = options or RepositoryOptions()
    name, source = resolve_source(preset, model, build_dir)
    export_dir = export_dir_for(name, build_dir)
    ensure_export(source, export_dir)
    repository = write_repository(name, export_dir, build_dir, options, engines_dir)
    return BuiltModel(name=name, export_dir=export_dir, repository=repository)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    source.add_argument("--model", type=Path, help="a diffusers folder (or a preset root)")
    parser.add_argument("--flavour", choices=FLAVOURS, default="python-onnxruntime")
    parser.add_argument("--engines", type=Path, help="TensorRT engine folder (tensorrt flavour)")
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--max-image-side", type=int, default=RepositoryOptions.max_image_side)
    parser.add_argument("--intra-op-threads", type=int, default=0)
    args = parser.parse_args(argv)

    options = RepositoryOptions(
        flavour=args.flavour,
        max_image_side=args.max_image_side,
        intra_op_threads=args.intra_op_threads,
    )
    try:
        built = prepare(
            preset=None if args.model else args.preset,
            model=args.model,
            build_dir=args.build_dir,
            options=options,
            engines_dir=args.engines,
        )
    except (UnsupportedCheckpointError, FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    log_file = args.build_dir / "logs" / f"tritonserver-{built.name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    server = TritonServer(
        built.repository,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        log_file=log_file,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    started = time.perf_counter()
    server.start()
    try:
        server.wait_ready()
        _log(f"tritonserver ready in {time.perf_counter() - started:.1f} s")
        _log(
            f"  gRPC     {server.grpc_url}   (pix2pix edit IMAGE -p '...' --url {server.grpc_url})"
        )
        _log(f"  HTTP     {server.http_url}")
        _log(f"  metrics  http://127.0.0.1:{server.metrics_port}/metrics")
        _log(f"  log      {log_file}")
        _log("Ctrl-C stops the server.")
        while not stop.wait(0.5):
            if server.process is not None and server.process.poll() is not None:
                print(f"error: tritonserver exited\n{server.log_tail()}", file=sys.stderr)
                return 1
    except (RuntimeError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        _log("stopping tritonserver ...")
        server.stop()
    _log("stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
