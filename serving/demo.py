"""`make demo`: the whole system once, from weights to an edited photo.

    python -m serving.demo [--model DIR | --preset tiny] [--build-dir build]
        [--out out] [--prompt TEXT] [--size N] [--steps N] [--seed N]

Builds the preset (random weights of the real architectures) unless --model names a
diffusers folder, exports it to ONNX, builds the python-onnxruntime repository, starts
tritonserver, edits scikit-image's astronaut photo through the client library
(`EditClient`), writes OUT/edited.png and OUT/compare.png (input | output, the
parameters printed under them), stops the server and prints how long each step took.
Steps whose output is already there and current are skipped, as in `make serve`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from export.checkpoint import UnsupportedCheckpointError
from export.onnx_export import load_manifest
from model_repository.chain import (
    DEFAULT_BUILD_DIR,
    Source,
    add_source_arguments,
    prepare_in_child,
)
from model_repository.configs import RepositoryOptions
from pix2pix_client import EditClient, EditError, EditResult
from pix2pix_client.contract import (
    IMG2IMG,
    INSTRUCT_PIX2PIX,
    PARAMETERS_BY_NAME,
    SCHEDULERS,
    parameters_for,
)
from serving.tritonserver import TritonServer

DEFAULT_OUT_DIR = Path("out")
DEFAULT_PROMPT = "turn it into a watercolor painting"
DEFAULT_SEED = 42
# The photo's own size; smaller sides are resized from it.
ASTRONAUT_SIDE = 512
# InstructPix2Pix's own scheduler (EulerAncestralDiscreteScheduler in its model card).
DEFAULT_SCHEDULER = "euler_a"
RANDOM_WEIGHTS_NOTE = "random weights: the edit is noise; serve a real checkpoint with MODEL=..."


@dataclass
class Timings:
    """Seconds per demo step, in the order the steps ran, with a note each."""

    steps: dict[str, tuple[float, str]] = field(default_factory=dict)

    @contextmanager
    def measure(self, step: str, note: str = "") -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.steps[step] = (time.perf_counter() - started, note)

    def table(self) -> str:
        width = max(len(step) for step in self.steps)
        lines = ["timings:"]
        for step, (seconds, note) in self.steps.items():
            lines.append(f"  {step:<{width}}  {seconds:7.2f} s  {note}".rstrip())
        total = sum(seconds for seconds, _ in self.steps.values())
        lines.append(f"  {'total':<{width}}  {total:7.2f} s")
        return "\n".join(lines)


def _log(message: str) -> None:
    print(message, flush=True)


def astronaut(side: int = ASTRONAUT_SIDE) -> Image.Image:
    """scikit-image's astronaut photo (Eileen Collins, NASA; public domain), side x side RGB."""
    from skimage import data

    photo = Image.fromarray(data.astronaut())
    return photo if side == ASTRONAUT_SIDE else photo.resize((side, side), Image.Resampling.LANCZOS)


def compare_image(source: Image.Image, result: EditResult, lines: list[str]) -> Image.Image:
    """Input | output side by side, on white, with `lines` of text printed under them."""
    font = ImageFont.load_default(size=14)
    margin, gap, line_height = 8, 8, 18
    edited = result.image.convert("RGB")
    text_width = max(font.getlength(line) for line in lines)
    width = margin * 2 + max(source.width + gap + edited.width, int(text_width) + 1)
    text_top = margin + max(source.height, edited.height) + margin
    canvas = Image.new("RGB", (width, text_top + line_height * len(lines) + margin), "white")
    canvas.paste(source.convert("RGB"), (margin, margin))
    canvas.paste(edited, (margin + source.width + gap, margin))
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        draw.text((margin, text_top + index * line_height), line, fill="black", font=font)
    return canvas


def parameter_lines(result: EditResult, prompt: str, weights: str) -> list[str]:
    """What the edit was asked to do, one readable line per group of inputs."""
    shown = {k: v for k, v in result.parameters.items() if k not in ("prompt", "seed")}
    settings = "  ".join(f"{name}={value}" for name, value in shown.items())
    return [
        f"{result.model}: {prompt!r}",
        f"{settings}  seed={result.seed}",
        f"{result.image.width}x{result.image.height}, {result.latency_s:.2f} s; weights: {weights}",
    ]


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; returns 0 on success, 2 for a bad model folder, 1 for a failed server."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_source_arguments(parser)
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="where images go")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the edit instruction")
    parser.add_argument(
        "--steps",
        type=int,
        default=PARAMETERS_BY_NAME["num_inference_steps"].default_for(INSTRUCT_PIX2PIX),
        help="denoising steps (default: the contract's)",
    )
    parser.add_argument(
        "--size", type=int, default=ASTRONAUT_SIDE, help="side of the photo edited, in pixels"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--scheduler", default=DEFAULT_SCHEDULER, choices=SCHEDULERS)
    args = parser.parse_args(argv)

    timings = Timings()
    try:
        built = prepare_in_child(Source.from_arguments(args), RepositoryOptions(), args.build_dir)
    except (UnsupportedCheckpointError, OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    timings.steps |= {step.name: (step.seconds, step.note) for step in built.steps}
    name = built.name
    pipelines = load_manifest(built.export_dir)["pipelines"]
    pipeline = INSTRUCT_PIX2PIX if INSTRUCT_PIX2PIX in pipelines else IMG2IMG
    random_weights = built.random_weights
    weights = f"{built.weights.resolve().name} (random)" if random_weights else str(built.weights)

    log_file = args.build_dir / "logs" / f"tritonserver-demo-{name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    server = TritonServer(built.repository, log_file=log_file)
    photo = astronaut(args.size)
    try:
        with timings.measure("server start", "tritonserver, every model ready"):
            server.start()
            server.wait_ready()
        _log(f"tritonserver ready at {server.grpc_url} (log: {log_file})")
        # Every input spelled out (the contract's defaults where the command line is
        # silent), so compare.png shows exactly what made the edit.
        edit_options = {
            parameter.name: parameter.default_for(pipeline)
            for parameter in parameters_for(pipeline)
            if parameter.default_for(pipeline) not in (None, "")
        }
        edit_options |= {
            "num_inference_steps": args.steps,
            "seed": args.seed,
            "scheduler": args.scheduler,
        }
        with (
            timings.measure(
                "edit", f"{pipeline}, {args.steps} steps, {photo.width}x{photo.height}"
            ),
            EditClient(server.grpc_url) as client,
        ):
            result = client.edit(np.asarray(photo), args.prompt, model=pipeline, **edit_options)
    except (RuntimeError, TimeoutError, EditError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        with timings.measure("server stop"):
            server.stop()
    _log("tritonserver stopped")

    args.out.mkdir(parents=True, exist_ok=True)
    photo.save(args.out / "astronaut.png")
    edited_path = result.save(args.out / "edited.png")
    compare_path = args.out / "compare.png"
    compare_image(photo, result, parameter_lines(result, args.prompt, weights)).save(compare_path)
    _log(f"edited:  {edited_path}  ({pipeline}, {args.prompt!r}, seed {result.seed})")
    _log(f"compare: {compare_path}  (input | output)")
    if random_weights:
        _log(RANDOM_WEIGHTS_NOTE)
    _log(timings.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
