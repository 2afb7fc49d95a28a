"""What `pix2pix edit` does with its files: which input becomes which output, the edits run
N at a time (streamed when there are progress bars or previews to show), one line or
JSON object per outcome, and the exit code of the whole batch.

Exit codes: 0 success, 2 invalid input (a bad flag value, an unreadable input file, a
request the client or the server rejects as invalid), 1 a server or connection error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pix2pix_client.aio import AsyncEditClient
from pix2pix_client.errors import (
    EditError,
    InvalidArgument,
    ModelNotFound,
    ServerError,
    ServerUnavailable,
)
from pix2pix_client.progress import EditProgress
from pix2pix_client.request import EditResult

EXIT_OK = 0
EXIT_SERVER_ERROR = 1
EXIT_INVALID_INPUT = 2
EXIT_INTERRUPTED = 130
PROG = "pix2pix"

# Files a directory input contributes; Pillow reads them all, the client re-encodes
# the ones the server does not decode itself.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Job:
    input: Path
    output: Path


def plan_jobs(inputs: Sequence[str], output: str | None) -> list[Job]:
    """Pairs every input image with its output path; checks inputs exist up front."""
    paths: list[Path] = []
    from_directory = False
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            from_directory = True
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise InvalidArgument(
                    "image", f"{raw}: no images in directory ({', '.join(IMAGE_SUFFIXES)})"
                )
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        elif path.exists():
            raise InvalidArgument("image", f"{raw}: not a regular file")
        else:
            raise InvalidArgument("image", f"{raw}: no such file or directory")

    if len(paths) == 1 and not from_directory:
        target = Path(output) if output else Path(f"{paths[0].stem}_edited.png")
        if target.is_dir():
            target = target / f"{paths[0].stem}.png"
        if target.suffix.lower() not in ("", *IMAGE_SUFFIXES):
            # Found before the edit runs, not when its result cannot be saved.
            raise InvalidArgument(
                "output",
                f"-o {output}: {target.suffix} is no format the result is saved in: allowed "
                f"{', '.join(IMAGE_SUFFIXES)}, or none (PNG)",
            )
        jobs = [Job(paths[0], target)]
    else:
        directory = Path(output) if output else Path("edited")
        if directory.exists() and not directory.is_dir():
            raise InvalidArgument(
                "output", f"-o {output}: several inputs need an output directory, not a file"
            )
        jobs = [Job(path, directory / f"{path.stem}.png") for path in paths]

    seen: dict[Path, Path] = {}
    for job in jobs:
        key = job.output.resolve()
        if key == job.input.resolve():
            raise InvalidArgument("output", f"{job.input}: the output would overwrite the input")
        if key in seen:
            raise InvalidArgument(
                "output", f"{seen[key]} and {job.input} would both be written to {job.output}"
            )
        seen[key] = job.input
    for directory in {job.output.parent for job in jobs}:
        make_directory(directory)
    return jobs


def make_directory(directory: Path, field: str = "output") -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InvalidArgument(
            field, f"cannot create directory {str(directory)!r}: {error.strerror}"
        ) from None


def _exit_code_of(error: EditError) -> int:
    return EXIT_INVALID_INPUT if isinstance(error, InvalidArgument) else EXIT_SERVER_ERROR


def _worse(current: int, new: int) -> int:
    """A server error (1) outranks invalid input (2), which outranks success (0)."""
    if EXIT_SERVER_ERROR in (current, new):
        return EXIT_SERVER_ERROR
    return max(current, new)


def _print_success(
    job: Job, result: EditResult, *, as_json: bool, display: EditProgress | None = None
) -> None:
    if as_json:
        print_json({"input": str(job.input), "output": str(job.output), **result.to_dict()})
        return
    line = f"{job.input} -> {job.output}  seed={result.seed}  {result.latency_s:.2f}s"
    if display is not None and display.enabled:
        # Above the bars, on the terminal they are drawn on.
        display.print(line)
    else:
        print(line, flush=True)


def _error_dict(error: EditError) -> dict[str, Any]:
    described: dict[str, Any] = {"type": type(error).__name__, "message": str(error)}
    if isinstance(error, InvalidArgument):
        described["field"] = error.field
    return described


def print_json(value: Any) -> None:
    print(json.dumps(value), flush=True)


def report_failure(message: str, display: EditProgress | None = None) -> None:
    # One line per failure, whatever the underlying message contains.
    line = f"{PROG}: error: {' '.join(message.split())}"
    if display is not None and display.enabled:
        display.print(line)
    else:
        print(line, file=sys.stderr, flush=True)


async def run_edits(
    args: argparse.Namespace,
    connection: dict[str, Any],
    options: dict[str, Any],
    jobs: list[Job],
    streaming: bool,
    display: EditProgress,
) -> int:
    semaphore = asyncio.Semaphore(args.concurrency)
    exit_code = EXIT_OK

    async with AsyncEditClient(args.url, **connection) as client:

        async def edit(job: Job) -> EditResult:
            if not streaming:
                return await client.edit(job.input, args.prompt, model=args.model, **options)
            bar = display.start_edit(job.input.name)
            try:
                async for event in client.edit_stream(
                    job.input, args.prompt, model=args.model, **options
                ):
                    if isinstance(event, EditResult):
                        return event
                    display.step(bar, event)
                    if event.preview_png is not None and args.previews is not None:
                        name = f"{job.input.stem}_step{event.step:04d}.png"
                        await asyncio.to_thread(
                            (args.previews / name).write_bytes, event.preview_png
                        )
            finally:
                display.remove_edit(bar)
            raise ServerError(f"{job.input}: the stream ended without a result")

        async def run(job: Job) -> tuple[Job, EditResult | EditError]:
            try:
                async with semaphore:
                    result = await edit(job)
                await asyncio.to_thread(result.save, job.output)
            except (ServerUnavailable, ModelNotFound):
                # The same answer awaits every other input: stop at the first.
                raise
            except EditError as error:
                return job, error
            except OSError as error:
                return job, InvalidArgument(
                    "output", f"cannot write {str(job.output)!r}: {error.strerror}"
                )
            return job, result

        tasks = [asyncio.create_task(run(job)) for job in jobs]
        try:
            for finished in asyncio.as_completed(tasks):
                job, outcome = await finished
                failed = isinstance(outcome, EditError)
                if isinstance(outcome, EditError):
                    report_failure(f"{job.input}: {outcome}", display)
                    if args.json:
                        print_json({"input": str(job.input), "error": _error_dict(outcome)})
                    exit_code = _worse(exit_code, _exit_code_of(outcome))
                else:
                    _print_success(job, outcome, as_json=args.json, display=display)
                display.edit_done(failed=failed)
        finally:
            # Ctrl-C or a failure that stops the batch: the edits still running are
            # cancelled, and so is their work on the server.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return exit_code
