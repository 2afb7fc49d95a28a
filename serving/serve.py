"""Serves a model repository until SIGTERM or Ctrl-C, building it first when needed.

    python -m serving.serve [--preset tiny | --model DIR | --repository DIR]
        [--host 127.0.0.1] [--grpc-port 8001] [--tls-cert PEM --tls-key PEM] ...

With --preset or --model, every step whose output is missing or stale runs first
(model_repository/chain.py: the preset's weights, the validated ONNX export, the engines,
the model repository), in a process of its own that exits before the server starts. With
--repository, a built repository is served as it is (the container's entry point). Then
tritonserver starts with the project's flags (serving/tritonserver.py) under the
supervisor, and the endpoints are printed once every model is ready.

Secure by default: it listens on 127.0.0.1 only (`--host 0.0.0.0` to open it), and
every API but inference, health, metadata and metrics needs the admin key from
$IMAGE_EDIT_ADMIN_KEY or the file $IMAGE_EDIT_ADMIN_KEY_FILE (without one, a random key
only this process knows). On SIGTERM or Ctrl-C it drains: readiness turns false, new
edits are refused with UNAVAILABLE, edits in flight finish (up to --grace seconds), and
it exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from export.checkpoint import UnsupportedCheckpointError
from model_repository.arguments import add_arguments, from_arguments
from model_repository.chain import (
    DEFAULT_BUILD_DIR,
    Source,
    add_source_arguments,
    prepare_in_child,
)
from model_repository.configs import RepositoryOptions
from model_repository.record import code_differences, read_record
from serving.tritonserver import ServerSettings, TlsFiles, TritonServer


def _log(message: str) -> None:
    print(message, flush=True)


def warn_if_built_by_other_code(repository: str) -> None:
    """Warns when the code running now is not the code that built the repository."""
    for difference in code_differences(read_record(repository)):
        _log(f"warning: {repository}: {difference}; rebuild it with this code to be sure")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = add_source_arguments(parser)
    source.add_argument("--repository", help="a built model repository, served as it is")
    building = parser.add_argument_group("building (with --preset or --model)")
    building.add_argument("--engines", type=Path, help="TensorRT engine folder (tensorrt)")
    building.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR)
    options = add_arguments(building, RepositoryOptions)
    # What --repository refuses beside it (building_flags_given).
    parser.set_defaults(building_flags=("engines", "build_dir", *options))
    serving = parser.add_argument_group("serving")
    add_arguments(serving, ServerSettings)
    serving.add_argument("--tls-cert", type=Path, help="gRPC TLS: the server certificate (PEM)")
    serving.add_argument("--tls-key", type=Path, help="gRPC TLS: its private key (PEM)")
    serving.add_argument(
        "--tls-client-ca",
        type=Path,
        help="gRPC mutual TLS: clients must present a certificate this CA signed (PEM)",
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
    return TritonServer(repository, server_settings(args), admin_key=admin_key, log_file=log_file)


def building_flags_given(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The building flags given a value other than their default: a built repository is
    served as it was built, so with --repository they would change nothing."""
    given = []
    for name in args.building_flags:
        value = getattr(args, name)
        if (tuple(value) if isinstance(value, list) else value) != parser.get_default(name):
            given.append("--" + name.replace("_", "-"))
    return given


def server_settings(args: argparse.Namespace) -> ServerSettings:
    """The server's settings from the parsed arguments, checked (ValueError, one line)."""
    settings = from_arguments(ServerSettings, args, tls=tls_files(args))
    settings.check()
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # Checked before anything is built: a bad port found after an hour's export.
        server_settings(args)
        if args.log_file is not None and args.log_file.is_dir():
            raise ValueError(f"--log-file {args.log_file}: is a folder; allowed a file, or -")
        if args.repository is not None and not args.repository.strip():
            raise ValueError("--repository '': allowed a repository folder or s3://...")
        if args.repository is not None and (given := building_flags_given(parser, args)):
            raise ValueError(
                f"{' '.join(given)}: building flags; --repository serves the repository as it "
                "was built: drop them, or build with them (--preset or --model)"
            )
        options = from_arguments(RepositoryOptions, args)
        if args.repository is not None:
            repository, name = args.repository, Path(str(args.repository).rstrip("/")).name
            warn_if_built_by_other_code(repository)
        else:
            built = prepare_in_child(
                Source.from_arguments(args), options, args.build_dir, engines_dir=args.engines
            )
            repository, name = str(built.repository), built.name
        log_file = args.log_file or (
            Path("-") if args.repository else args.build_dir / "logs" / f"tritonserver-{name}.log"
        )
        if str(log_file) != "-":
            log_file.parent.mkdir(parents=True, exist_ok=True)
        server = make_server(args, repository, log_file)
    except (UnsupportedCheckpointError, OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    started = time.perf_counter()
    settings = server.settings
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
            scheme = "TLS" if settings.tls else "plain"
            host = settings.host
            _log(f"  gRPC     {host}:{settings.grpc_port}  ({scheme}; pix2pix edit IMAGE -p '...')")
            _log(f"  HTTP     {host}:{settings.http_port}  (health: /v2/health/ready)")
            _log(f"  metrics  http://{host}:{settings.metrics_port}/metrics")
            _log(f"  log      {log_file}")
            _log("SIGTERM or Ctrl-C drains and stops the server.")
        while not stop.wait(0.5):
            pass
    except (RuntimeError, TimeoutError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        server.stop(grace=0)
        return 1
    _log(f"draining: edits in flight finish (up to {settings.grace:.0f} s), new ones are refused")
    server.stop()
    _log("stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
