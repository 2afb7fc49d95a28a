"""The `pix2pix` command: edit images, check the server's health, list its models, serve
the web page and OpenAI's Images API (the edit batch itself: batch.py).

Exit codes: 0 success, 2 invalid input (a bad flag value, an unreadable input file, a
request the client or the server rejects as invalid), 1 a server or connection error.
Each failure prints one line on stderr naming the problem.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from pix2pix_client import api as openai_api
from pix2pix_client import contract
from pix2pix_client.aio import AsyncEditClient
from pix2pix_client.batch import (
    EXIT_INTERRUPTED,
    EXIT_INVALID_INPUT,
    EXIT_OK,
    EXIT_SERVER_ERROR,
    PROG,
    make_directory,
    plan_jobs,
    print_json,
    report_failure,
    run_edits,
)
from pix2pix_client.connection import DEFAULT_URL, parse_urls
from pix2pix_client.errors import (
    EditError,
    InvalidArgument,
    ServerUnavailable,
)
from pix2pix_client.progress import EditProgress
from pix2pix_client.request import DEFAULT_MODEL, validate_parameters

URL_ENVIRONMENT_VARIABLE = "PIX2PIX_URL"

# Flag -> contract input. The flags are the short names people use for these knobs.
EDIT_FLAGS: dict[str, tuple[str, type, str]] = {
    "--negative-prompt": ("negative_prompt", str, "TEXT"),
    "--steps": ("num_inference_steps", int, "N"),
    "--cfg": ("guidance_scale", float, "SCALE"),
    "--image-cfg": ("image_guidance_scale", float, "SCALE"),
    "--temperature": ("temperature", float, "T"),
    "--seed": ("seed", int, "SEED"),
    "--scheduler": ("scheduler", str, "NAME"),
    "--cache-interval": ("cache_interval", int, "N"),
    "--preview-every": ("preview_every", int, "N"),
}
# With --previews and no --preview-every: a preview every this many steps.
DEFAULT_PREVIEW_EVERY = 5
# `pix2pix ui`: loopback unless told otherwise, Gradio's usual port, and as many edits at
# once as the server runs per model (its edit instances).
UI_HOST = "127.0.0.1"
UI_PORT = 7860
UI_CONCURRENCY = 2
# `pix2pix api`: loopback unless told otherwise, beside Triton's 8000-8002.
API_HOST = "127.0.0.1"
API_PORT = 8080


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_INVALID_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `pix2pix` command and its subcommands."""
    parser = _Parser(
        prog=PROG,
        description="Edit images with InstructPix2Pix or SD img2img served by NVIDIA Triton.",
        epilog=(
            "exit codes: 0 success, 2 invalid input (bad flag value, unreadable input, "
            "request rejected as invalid), 1 server or connection error"
        ),
    )
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")

    connection = _Parser(add_help=False)
    group = connection.add_argument_group("server connection")
    group.add_argument(
        "--url",
        default=os.environ.get(URL_ENVIRONMENT_VARIABLE, DEFAULT_URL),
        help=f"Triton's gRPC endpoint, host:port (default: ${URL_ENVIRONMENT_VARIABLE} "
        f"or {DEFAULT_URL})",
    )
    group.add_argument("--ssl", action="store_true", help="connect with TLS")
    group.add_argument("--root-certificates", metavar="PEM", help="CA certificates (TLS)")
    group.add_argument("--private-key", metavar="PEM", help="client private key (TLS)")
    group.add_argument("--certificate-chain", metavar="PEM", help="client certificate (TLS)")
    group.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="gRPC metadata sent with every call, e.g. 'authorization=Bearer TOKEN'; repeatable",
    )
    group.add_argument(
        "--admin-key",
        default=os.environ.get(contract.ADMIN_KEY_VARIABLE),
        metavar="KEY",
        help="the operator's key for the server's restricted APIs, which `models` needs "
        f"(default: ${contract.ADMIN_KEY_VARIABLE})",
    )
    group.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="deadline of each call, retries included (default: none)",
    )
    group.add_argument(
        "--retries",
        type=int,
        default=2,
        metavar="N",
        help="retries when the server is unavailable, with exponential backoff (default: 2)",
    )
    group.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")

    edit = subcommands.add_parser(
        "edit",
        parents=[connection],
        help="edit one or more images",
        description=(
            "Edit images following an instruction.\n\n"
            "With one input file, -o is the output file (default: STEM_edited.png in the\n"
            "current directory). With several inputs or a directory (the images directly\n"
            "inside it), -o is an output directory (default: ./edited) that receives\n"
            "STEM.png for each input, and the edits run concurrently. Parameters left out\n"
            "take the server's defaults."
        ),
        epilog=(
            "examples:\n"
            "  pix2pix edit photo.jpg -p 'make it snowy' --seed 42 -o snowy.png\n"
            "  pix2pix edit photos/ -p 'turn it into a painting' -o painted/ --json\n"
            "  pix2pix edit a.png b.png -p 'a castle at dusk' --model img2img --temperature 0.6\n"
            "\n"
            "exit codes: 0 success, 2 invalid input, 1 server or connection error"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    edit.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or directories")
    edit.add_argument(
        "-p", "--prompt", required=True, help="the edit instruction (img2img: the target prompt)"
    )
    edit.add_argument("-o", "--output", metavar="OUTPUT", help="output file or directory")
    edit.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        choices=contract.PIPELINES,
        help=f"the model (pipeline) to call (default: {DEFAULT_MODEL})",
    )
    parameters = edit.add_argument_group("edit parameters (validated against the contract)")
    for flag, (name, value_type, metavar) in EDIT_FLAGS.items():
        parameter = contract.PARAMETERS_BY_NAME[name]
        parameters.add_argument(
            flag,
            dest=name,
            type=value_type,
            metavar=metavar,
            choices=parameter.choices,
            help=_parameter_help(parameter),
        )
    edit.add_argument(
        "--concurrency",
        type=int,
        default=4,
        metavar="N",
        help="edits in flight at once (default: 4)",
    )
    edit.add_argument(
        "--previews",
        type=Path,
        metavar="DIR",
        help=f"write the latent previews there, STEM_stepNNNN.png (every {DEFAULT_PREVIEW_EVERY} "
        "steps unless --preview-every says)",
    )
    edit.add_argument("-q", "--quiet", action="store_true", help="no progress bars on stderr")

    subcommands.add_parser(
        "health",
        parents=[connection],
        help="is the server live and ready, and which edit models are ready",
        description="Exit code 0 when the server is live and ready and serves an edit model, "
        "1 otherwise.",
    )
    subcommands.add_parser(
        "models",
        parents=[connection],
        help="list the server's model repository",
        description="List the models of the server's repository: name, version, state.",
    )
    page = subcommands.add_parser(
        "ui",
        parents=[connection],
        help="serve the web page (needs pix2pix-client[ui])",
        description="Serve the web page: upload a photo, edit it, watch it change. It talks to "
        "the server at --url through this library and runs until Ctrl-C.",
    )
    page.add_argument(
        "--host", default=UI_HOST, help=f"address the page binds to (default: {UI_HOST})"
    )
    page.add_argument("--port", type=int, default=UI_PORT, help=f"(default: {UI_PORT})")
    page.add_argument(
        "--concurrency",
        type=int,
        default=UI_CONCURRENCY,
        metavar="N",
        help=f"edits the page runs at once, the others wait in its queue (default: "
        f"{UI_CONCURRENCY}; more than the server runs at once wait in its queue)",
    )
    page.add_argument(
        "--root-path", metavar="PATH", help="the page's path behind a reverse proxy, e.g. /edit"
    )
    gateway = subcommands.add_parser(
        "api",
        parents=[connection],
        help="serve OpenAI's Images API, /v1/images/edits (needs pix2pix-client[api])",
        description="Serve OpenAI's Images API over the server at --url: POST "
        "/v1/images/edits (streaming included) and GET /v1/models, for OpenAI's SDKs and "
        "anything else that speaks it. Runs until Ctrl-C or SIGTERM, which let requests "
        "in flight finish.",
    )
    gateway.add_argument(
        "--host", default=API_HOST, help=f"address the API binds to (default: {API_HOST})"
    )
    gateway.add_argument("--port", type=int, default=API_PORT, help=f"(default: {API_PORT})")
    gateway.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="file holding the key clients must send as 'Authorization: Bearer KEY' "
        f"(default: ${openai_api.API_KEY_VARIABLE}, the key itself, else the file named by "
        f"${openai_api.API_KEY_FILE_VARIABLE}; none of them set: no key is asked for)",
    )
    gateway.add_argument(
        "--max-n",
        type=int,
        default=openai_api.DEFAULT_MAX_N,
        metavar="N",
        help="images one request may ask for; at most the server's --max-edits (default: "
        f"{openai_api.DEFAULT_MAX_N}, the server's default)",
    )
    gateway.add_argument(
        "--max-image-side",
        type=int,
        default=openai_api.DEFAULT_MAX_IMAGE_SIDE,
        metavar="PIXELS",
        help="the largest side `size` may ask for: the server's --max-image-side (default: "
        f"{openai_api.DEFAULT_MAX_IMAGE_SIDE}, the server's default)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line `argv` (default: sys.argv[1:]) and returns its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        return _exit_code(exit_request)
    if args.command is None:
        parser.print_usage(sys.stderr)
        report_failure("a command is required: edit, health, models, ui or api")
        return EXIT_INVALID_INPUT
    try:
        connection = _connection_arguments(args)
        if args.command == "edit":
            return _edit(args, connection)
        if args.command == "health":
            return asyncio.run(_health(args, connection))
        if args.command == "ui":
            return _ui(args, connection)
        if args.command == "api":
            return _api(args, connection)
        return asyncio.run(_models(args, connection))
    except InvalidArgument as error:
        report_failure(str(error))
        return EXIT_INVALID_INPUT
    except ServerUnavailable as error:
        report_failure(f"server unavailable at {args.url}: {error}")
        return EXIT_SERVER_ERROR
    except EditError as error:
        report_failure(str(error))
        return EXIT_SERVER_ERROR
    except KeyboardInterrupt:
        report_failure("interrupted")
        return EXIT_INTERRUPTED


def _edit(args: argparse.Namespace, connection: dict[str, Any]) -> int:
    if args.concurrency < 1:
        raise InvalidArgument(
            "concurrency", f"--concurrency={args.concurrency} is out of range: allowed >= 1"
        )
    options = {name: getattr(args, name) for name, _, _ in EDIT_FLAGS.values()}
    bars = sys.stderr.isatty() and not args.quiet and not args.json
    # Progress bars and previews come from the streaming models.
    streaming = bars or args.previews is not None or options["preview_every"] is not None
    if args.previews is not None and options["preview_every"] is None:
        options["preview_every"] = DEFAULT_PREVIEW_EVERY
    if not streaming:
        del options["preview_every"]
    try:
        # Every input but the images is checked once, before any file is read.
        validate_parameters(args.model, args.prompt, streaming, **options)
    except InvalidArgument as error:
        raise InvalidArgument(error.field, f"{_flag_of(error.field)}: {error}") from None
    jobs = plan_jobs(args.inputs, args.output)
    if args.previews is not None:
        make_directory(args.previews, "previews")
    display = EditProgress(len(jobs), sys.stderr, enabled=bars)
    with display:
        return asyncio.run(run_edits(args, connection, options, jobs, streaming, display))


async def _health(args: argparse.Namespace, connection: dict[str, Any]) -> int:
    async with AsyncEditClient(args.url, **connection) as client:
        health = await client.health(timeout_s=args.timeout)
    # A server that is up but serves no edit model is no use to a load balancer.
    serving = any(health["models"].values())
    healthy = health["live"] and health["ready"] and serving
    if args.json:
        print_json({"url": args.url, **health})
    else:
        print(f"server {args.url}: live={_yes(health['live'])} ready={_yes(health['ready'])}")
        width = max(len(name) for name in health["models"])
        for name, ready in health["models"].items():
            print(f"  {name:<{width}}  {'ready' if ready else 'not ready'}")
    if not healthy:
        problem = "live" if not health["live"] else "ready" if not health["ready"] else None
        if problem is None:
            report_failure(
                f"server {args.url} serves no ready edit model ({', '.join(contract.PIPELINES)})"
            )
        else:
            report_failure(f"server {args.url} is not {problem}")
    return EXIT_OK if healthy else EXIT_SERVER_ERROR


async def _models(args: argparse.Namespace, connection: dict[str, Any]) -> int:
    async with AsyncEditClient(args.url, **connection) as client:
        entries = await client.models(timeout_s=args.timeout)
    if args.json:
        print_json(entries)
        return EXIT_OK
    columns = ("name", "version", "state", "reason")
    widths = {c: max([len(c), *(len(e[c]) for e in entries)]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for entry in entries:
        print("  ".join(entry[c].ljust(widths[c]) for c in columns).rstrip())
    return EXIT_OK


def _check_listening(args: argparse.Namespace) -> None:
    """The port a served page or API binds to, and the server address it forwards to."""
    if not 1 <= args.port <= 65535:
        raise InvalidArgument("port", f"--port={args.port} is out of range: allowed 1..65535")
    parse_urls(args.url)


def _ui(args: argparse.Namespace, connection: dict[str, Any]) -> int:
    _check_listening(args)
    if args.concurrency < 1:
        raise InvalidArgument(
            "concurrency", f"--concurrency={args.concurrency} is out of range: allowed >= 1"
        )
    try:
        from pix2pix_client import ui
    except ModuleNotFoundError as missing:
        raise InvalidArgument(
            "ui", f"the web page needs {missing.name}: pip install 'pix2pix-client[ui]'"
        ) from None
    return ui.serve(
        args.url,
        host=args.host,
        port=args.port,
        concurrency=args.concurrency,
        root_path=args.root_path,
        connection=connection,
    )


def _api(args: argparse.Namespace, connection: dict[str, Any]) -> int:
    _check_listening(args)
    for flag, value in (("max-n", args.max_n), ("max-image-side", args.max_image_side)):
        if value < 1:
            raise InvalidArgument(flag, f"--{flag}={value} is out of range: allowed >= 1")
    try:
        api_key = openai_api.load_api_key(args.api_key_file)
    except (OSError, ValueError) as error:
        raise InvalidArgument("api-key-file", f"the API key cannot be read: {error}") from None
    try:
        from pix2pix_client.api.serve import serve
    except ModuleNotFoundError as missing:
        raise InvalidArgument(
            "api", f"the API needs {missing.name}: pip install 'pix2pix-client[api]'"
        ) from None
    return serve(
        args.url,
        host=args.host,
        port=args.port,
        api_key=api_key,
        max_n=args.max_n,
        max_image_side=args.max_image_side,
        connection=connection,
    )


def _connection_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The AsyncEditClient keyword arguments the connection flags ask for."""
    headers = {}
    for header in args.header:
        key, separator, value = header.partition("=")
        if not separator or not key.strip():
            raise InvalidArgument("header", f"--header {header!r} is not KEY=VALUE")
        headers[key.strip()] = value
    if args.timeout is not None and not args.timeout > 0:
        raise InvalidArgument("timeout", f"--timeout={args.timeout} is out of range: allowed > 0")
    if args.retries < 0:
        raise InvalidArgument("retries", f"--retries={args.retries} is out of range: allowed >= 0")
    return {
        "ssl": args.ssl,
        "root_certificates": args.root_certificates,
        "private_key": args.private_key,
        "certificate_chain": args.certificate_chain,
        "headers": headers or None,
        "admin_key": args.admin_key,
        "retries": args.retries,
        "timeout_s": args.timeout,
    }


def _parameter_help(parameter: contract.Parameter) -> str:
    """A flag's help from the contract: description, allowed values, server default."""
    text = parameter.description
    if parameter.choices is not None or parameter.wire_type != "BYTES":
        text += f"; {parameter.allowed()}"
    if len(parameter.pipelines) == 1:
        text += f"; {parameter.pipelines[0]} only"
    defaults = {e: parameter.default_for(e) for e in parameter.pipelines}
    defaults = {e: v for e, v in defaults.items() if v not in (None, "")}
    if len(set(defaults.values())) == 1 and len(defaults) == len(parameter.pipelines):
        text += f" (server default: {next(iter(defaults.values()))})"
    elif defaults:
        text += " (server default: " + ", ".join(f"{e} {v}" for e, v in defaults.items()) + ")"
    return text.replace("%", "%%")


def _flag_of(field: str) -> str:
    for flag, (name, _, _) in EDIT_FLAGS.items():
        if name == field:
            return flag
    return {"prompt": "--prompt", "model": "--model"}.get(field, field)


def _exit_code(exit_request: SystemExit) -> int:
    code = exit_request.code
    if code is None:
        return EXIT_OK
    return code if isinstance(code, int) else EXIT_INVALID_INPUT


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


if __name__ == "__main__":
    sys.exit(main())
