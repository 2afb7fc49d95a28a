"""Serves a model repository until SIGTERM or Ctrl-C, building it first when needed.

    python -m model_repository.serve [--preset tiny | --model DIR | --repository DIR]
        [--host 127.0.0.1] [--grpc-port 8001] [--tls-cert PEM --tls-key PEM] ...

With --preset or --model, every step whose output is missing or stale runs first: the
preset's weights, the validated ONNX export, the model repository. With --repository, a
built repository is served as it is (the container's entry point). Then tritonserver
starts with the project's flags (model_repository/server.py) under the supervisor, and
the endpoints are printed once every model is ready.

Secure by default: it listens on 127.0.0.1 only (`--host 0.0.0.0` to open it), and
every API but inference, health, metadata and metrics needs the admin key from
$IMAGE_EDIT_ADMIN_KEY or the file $IMAGE_EDIT_ADMIN_KEY_FILE (without one, a random key
only this process knows). On SIGTERM or Ctrl-C it drains: readiness turns false, new
edits are refused with UNAVAILABLE, edits in flight finish (up to --grace seconds), and
it exits 0.
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
from export.onnx_export import ensure_export
from export.presets import PRESETS
from model_repository.arguments import add_arguments, from_arguments
from model_repository.builder import build_repository
from model_repository.configs import RepositoryOptions
from model_repository.server import TlsFiles, TritonServer

DEFAULT_BUILD_DIR = Path("build")
DEFAULT_GRACE_S = 60.0


@dataclass(frozen=True)
class BuiltModel:
    name: str
    export_dir: Path
    repository: Path


def _log(message: str) -> None:
    print(message, flush=True)


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


def export_dir_for(name: str, build_dir: Path, fused: bool = False, fp16: bool = False) -> Path:
    """Where the export of `name` goes: one folder per precision and fusions."""
    suffix = ("-fp16" if fp16 else "") + ("-fused" if fused else "")
    return build_dir / "onnx" / f"{name}{suffix}"


def write_repository(
    name: str,
    export_dir: Path,
    build_dir: Path,
    options: RepositoryOptions,
    engines_dir: Path | None = None,
) -> Path:
    precision = "" if options.precision == "fp32" else f"-{options.precision}"
    repository = build_dir / "repository" / f"{name}-{options.flavour}{precision}"
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
    fp16 = options.precision == "fp16"
    export_dir = export_dir_for(name, build_dir, options.fused_export, fp16)
    ensure_export([source], export_dir, fp16=fp16, optimize=options.fused_export)
    repository = write_repository(name, export_dir, build_dir, options, engines_dir)
    return BuiltModel(name=name, export_dir=export_dir, repository=repository)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    source.add_argument("--model", type=Path, help="a diffusers folder (or a preset root)")
    source.add_argument("--repository", help="a built model repository, served as it is")
    building = parser.add_argument_group("building (with --preset or --model)")
    building.add_argument("--engines", type=Path, help="TensorRT engine folder (tensorrt)")
    building.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR)
    add_arguments(building, RepositoryOptions)
    serving = parser.add_argument_group("serving")
    serving.add_argument(
        "--host",
        default="127.0.0.1",
        help="address every endpoint binds to (default: %(default)s; 0.0.0.0 opens it)",
    )
    serving.add_argument("--grpc-port", type=int, default=8001)
    serving.add_argument("--http-port", type=int, default=8000)
    serving.add_argument("--metrics-port", type=int, default=8002)
    serving.add_argument("--tls-cert", type=Path, help="gRPC TLS: the server certificate (PEM)")
    serving.add_argument("--tls-key", type=Path, help="gRPC TLS: its private key (PEM)")
    serving.add_argument(
        "--tls-client-ca",
        type=Path,
        help="gRPC mutual TLS: clients must present a certificate this CA signed (PEM)",
    )
    serving.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE_S,
        help="seconds edits in flight may take to finish on SIGTERM (default: %(default)s)",
    )
    serving.add_argument(
        "--log-file",
        type=Path,
        help="tritonserver's log; - for stdout (default: stdout with --repository, else a "
        "file in BUILD_DIR/logs)",
    )
    return parser


def tls_files(args: argparse.Namespace) -> TlsFiles | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    for path in (args.tls_cert, args.tls_key, args.tls_client_ca):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
    return TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca)


def make_server(
    args: argparse.Namespace,
    repository: str,
    log_file: Path | None,
    *,
    admin_key: str | None = None,
) -> TritonServer:
    """The TritonServer that `serve` runs for its parsed arguments. deploy/check.py builds
    it from the Kubernetes manifests' container arguments the same way."""
    return TritonServer(
        repository,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        admin_key=admin_key,
        tls=tls_files(args),
        log_file=log_file,
        grace_s=args.grace,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = from_arguments(RepositoryOptions, args)
        tls = tls_files(args)
        if args.repository is not None:
            repository, name = args.repository, Path(str(args.repository).rstrip("/")).name
        else:
            built = prepare(
                preset=None if args.model else args.preset,
                model=args.model,
                build_dir=args.build_dir,
                options=options,
                engines_dir=args.engines,
            )
            repository, name = str(built.repository), built.name
    except (UnsupportedCheckpointError, FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    log_file = args.log_file or (
        Path("-") if args.repository else args.build_dir / "logs" / f"tritonserver-{name}.log"
    )
    if str(log_file) != "-":
        log_file.parent.mkdir(parents=True, exist_ok=True)
    server = make_server(args, repository, log_file)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    started = time.perf_counter()
    try:
        server.start()
        while not stop.is_set():
            try:
                server.wait_ready(timeout_s=0.5)
                break
            except TimeoutError:
                continue
        if not stop.is_set():
            _log(f"tritonserver ready in {time.perf_counter() - started:.1f} s")
            scheme = "TLS" if tls else "plain"
            _log(
                f"  gRPC     {args.host}:{args.grpc_port}  ({scheme}; pix2pix edit IMAGE -p '...')"
            )
            _log(f"  HTTP     {args.host}:{args.http_port}  (health: /v2/health/ready)")
            _log(f"  metrics  http://{args.host}:{args.metrics_port}/metrics")
            _log(f"  log      {log_file}")
            _log("SIGTERM or Ctrl-C drains and stops the server.")
        while not stop.wait(0.5):
            pass
    except (RuntimeError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        server.stop(grace_s=0)
        return 1
    _log(f"draining: edits in flight finish (up to {args.grace:.0f} s), new ones are refused")
    server.stop()
    _log("stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
