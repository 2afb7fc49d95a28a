"""What the page makes of an edit's outcome: the status line, the downloadable PNG with
its parameters, the history entry, and errors in words."""

from __future__ import annotations

import html
import io
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, PngImagePlugin

from pix2pix_client import __version__
from pix2pix_client.errors import (
    DeadlineExceeded,
    EditError,
    InvalidArgument,
    ModelNotFound,
    ServerUnavailable,
)
from pix2pix_client.request import EditResult
from pix2pix_client.ui.controls import LABELS, PIPELINE_TITLES

THUMBNAIL_SIDE = 160
# Files the page wrote (results, previews) are deleted after this; Gradio serves its copies.
FILE_LIFETIME_S = 3600


@dataclass
class HistoryEntry:
    """One finished edit of this browser session, enough to show it and make it again."""

    thumbnail: Image.Image
    model: str
    parameters: dict[str, Any]
    seed: int

    @classmethod
    def of(cls, result: EditResult) -> HistoryEntry:
        thumbnail = result.image.copy()
        thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        return cls(thumbnail, result.model, dict(result.parameters), result.seed)

    @property
    def caption(self) -> str:
        prompt = self.parameters.get("prompt", "")
        shown = prompt if len(prompt) <= 40 else prompt[:39] + "…"
        steps = self.parameters.get("num_inference_steps", "")
        return f"{PIPELINE_TITLES[self.model]} · {steps} steps · seed {self.seed} · {shown}"


@dataclass
class FileStore:
    """A private folder for the files the page hands to Gradio; old ones are pruned."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pix2pix-ui-")))

    def write(self, data: bytes, name: str) -> str:
        self._prune()
        folder = self.root / uuid.uuid4().hex
        folder.mkdir()
        path = folder / name
        path.write_bytes(data)
        return str(path)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def _prune(self) -> None:
        expired = time.time() - FILE_LIFETIME_S
        for folder in self.root.iterdir():
            if folder.stat().st_mtime < expired:
                shutil.rmtree(folder, ignore_errors=True)


def png_with_parameters(result: EditResult) -> bytes:
    """The result as PNG with the model, every input sent and the seed as text chunks;
    the pixels are the server's."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", f"pix2pix-client {__version__}")
    info.add_text("model", result.model)
    for name, value in result.parameters.items():
        if name != "seed":
            info.add_text(name, str(value))
    info.add_text("seed", str(result.seed))
    buffer = io.BytesIO()
    result.image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def before_image(photo: bytes, size: tuple[int, int]) -> Image.Image:
    """The input as the comparison slider shows it: oriented, RGB, the result's size."""
    with Image.open(io.BytesIO(photo)) as opened:
        return ImageOps.exif_transpose(opened).convert("RGB").resize(size, Image.Resampling.LANCZOS)


def result_summary(result: EditResult) -> str:
    """The line under the result: the seed first, then how it was made."""
    steps = result.parameters.get("num_inference_steps", "default")
    return (
        f"**seed** `{result.seed}` · {PIPELINE_TITLES[result.model]} · {steps} steps · "
        f"{result.image.width}x{result.image.height} · {result.latency_s:.1f} s"
    )


def describe_error(error: EditError, url: str) -> str:
    """What went wrong, in words for the page: the field and the server's message."""
    message = " ".join(str(error).split())
    if isinstance(error, InvalidArgument):
        return f"{LABELS.get(error.field, error.field)} refused: {message}"
    if isinstance(error, ServerUnavailable):
        if "busy" in message:
            return f"The server is busy (every edit slot is taken); try again shortly: {message}"
        return f"The server at {url} is unavailable: {message}"
    if isinstance(error, DeadlineExceeded):
        return f"The server did not answer in time: {message}"
    if isinstance(error, ModelNotFound):
        return f"The server does not serve this model: {message}"
    return f"The server failed the edit: {message}"


def status_html(state: str, text: str, step: int = 0, num_steps: int = 0) -> str:
    """The line under the images: a progress bar while running, else a sentence. Its
    data-state (idle, running, done, cancelled, error) and data-step are for scripts."""
    bar = f'<progress max="{num_steps}" value="{step}"></progress>' if state == "running" else ""
    return (
        f'<div class="edit-status" data-state="{state}" data-step="{step}" '
        f'data-steps="{num_steps}">{bar}<span>{html.escape(text)}</span></div>'
    )


def progress_text(step: int, num_steps: int, elapsed_s: float) -> str:
    rate = step / elapsed_s if elapsed_s > 0 else 0.0
    left = (num_steps - step) / rate if rate > 0 else 0.0
    return f"step {step} of {num_steps} · {rate:.1f} steps/s · {left:.0f} s left"
