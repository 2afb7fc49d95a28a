"""The web page: `pix2pix ui`, a Gradio app that edits through the client library.

    pix2pix ui --url HOST:8001 [--host 127.0.0.1] [--port 7860] [--concurrency 2]

Every control is built from the contract (pix2pix_client/contract.py): ranges, defaults per
pipeline and descriptions come from there, so the page cannot drift from what the server
accepts. Edits run on the streaming models: a progress bar and the latent previews while
they run, Cancel closes the stream (the server stops within one UNet step). The page talks
to Triton only through `AsyncEditClient`; it needs Gradio, Pillow and numpy, nothing of the
server side. Install it with `pip install 'pix2pix-client[ui]'`.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import io
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image, ImageOps, PngImagePlugin

from pix2pix_client import __version__, contract
from pix2pix_client.aio import AsyncEditClient
from pix2pix_client.errors import (
    DeadlineExceeded,
    EditError,
    InvalidArgument,
    ModelNotFound,
    ServerUnavailable,
)
from pix2pix_client.request import EditResult

# The server holds three waiting edits per running one (max_edits 8 over 2 instances);
# the page's queue holds as many before it says it is full.
WAITING_PER_RUNNING = 3

PIPELINE_TITLES = {contract.INSTRUCT_PIX2PIX: "InstructPix2Pix", contract.IMG2IMG: "img2img"}
PROMPT_LABELS = {contract.INSTRUCT_PIX2PIX: "Instruction", contract.IMG2IMG: "Prompt"}
PROMPT_PLACEHOLDERS = {
    contract.INSTRUCT_PIX2PIX: "what to change, e.g. 'make it snowy'",
    contract.IMG2IMG: "what the result shows, e.g. 'a snowy street at dusk'",
}
LABELS = {
    "image": "Image",
    "prompt": "Prompt",
    "negative_prompt": "Negative prompt",
    "num_inference_steps": "Steps",
    "guidance_scale": "Text guidance (CFG)",
    "image_guidance_scale": "Image guidance",
    "temperature": "Temperature",
    "seed": "Seed",
    "scheduler": "Scheduler",
    "preview_every": "Preview every N steps",
    "model": "Model",
}
# What temperature means differs per pipeline: one line each, under the slider.
TEMPERATURE_NOTES = {
    contract.INSTRUCT_PIX2PIX: "1 is standard InstructPix2Pix; lower starts later from the "
    "noised photo and keeps more of it",
    contract.IMG2IMG: "img2img's strength: lower keeps more of the photo, 1 keeps little",
}
# The contract sends progress only by default; the page shows a preview every step.
PAGE_PREVIEW_EVERY = 1
CHECKPOINT_DEFAULT = "checkpoint default"
FLOAT_SLIDER_STEP = 0.05
THUMBNAIL_SIDE = 160
HISTORY_LIMIT = 48
# Files the page wrote (results, previews) are deleted after this; Gradio serves its copies.
FILE_LIFETIME_S = 3600
# How long Cancel waits for the stream to close before it reports.
CANCEL_WAIT_S = 10.0

CSS = """
.edit-status { min-height: 2.6em; display: flex; align-items: center; gap: 0.8em; }
.edit-status progress { flex: 1; height: 0.9em; accent-color: var(--color-accent); }
.edit-status[data-state="error"] { color: var(--error-text-color); }
.edit-status[data-state="cancelled"] { color: var(--body-text-color-subdued); }
.server-status { text-align: right; }
"""


@dataclass
class HistoryEntry:
    """One finished edit of this browser session, enough to show it and make it again."""

    thumbnail: Image.Image
    model: str
    parameters: dict[str, Any]
    seed: int

    @property
    def caption(self) -> str:
        prompt = self.parameters.get("prompt", "")
        shown = prompt if len(prompt) <= 40 else prompt[:39] + "…"
        return f"{PIPELINE_TITLES[self.model]} · seed {self.seed} · {shown}"


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
    """The result as PNG with the model, every input sent and the seed as text chunks."""
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
    """The line under the images: a progress bar while running, else a sentence."""
    bar = f'<progress max="{num_steps}" value="{step}"></progress>' if state == "running" else ""
    return (
        f'<div class="edit-status" data-state="{state}" data-step="{step}" '
        f'data-steps="{num_steps}">{bar}<span>{html.escape(text)}</span></div>'
    )


def progress_text(step: int, num_steps: int, elapsed_s: float) -> str:
    rate = step / elapsed_s if elapsed_s > 0 else 0.0
    left = (num_steps - step) / rate if rate > 0 else 0.0
    return f"step {step} of {num_steps} · {rate:.1f} steps/s · {left:.0f} s left"


def read_photo(path: str) -> bytes:
    return Path(path).read_bytes()


def before_image(photo: bytes, size: tuple[int, int]) -> Image.Image:
    """The input as the comparison slider shows it: oriented, RGB, the result's size."""
    with Image.open(io.BytesIO(photo)) as opened:
        return ImageOps.exif_transpose(opened).convert("RGB").resize(size, Image.Resampling.LANCZOS)


def parse_seed(text: str | None) -> int | None:
    """The seed box: empty means random; anything else must be a seed of the contract."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        value: Any = int(text)
    except ValueError:
        value = text
    try:
        return contract.PARAMETERS_BY_NAME["seed"].validate(value)
    except contract.InvalidArgumentError as error:
        raise InvalidArgument.from_contract(error) from None


class EditPage:
    """The page's components and handlers around one AsyncEditClient."""

    def __init__(self, client: AsyncEditClient, concurrency: int) -> None:
        self.client = client
        self.concurrency = concurrency
        self.files = FileStore()
        self.controls: dict[str, Any] = {}
        # The edit each browser tab (Gradio session) is running, so Cancel can stop it.
        self.running: dict[str, asyncio.Task[Any]] = {}
        self.blocks = self._build()

    # ------------------------------------------------------------------ layout

    def _build(self) -> gr.Blocks:
        with gr.Blocks(
            title="pix2pix: instruction-based image editing",
            analytics_enabled=False,
            delete_cache=(FILE_LIFETIME_S, FILE_LIFETIME_S),
        ) as blocks:
            with gr.Row():
                gr.Markdown(
                    "## Image editing on Triton\n"
                    "Upload a photo, say what to change, press **Edit**. "
                    "InstructPix2Pix follows an instruction; img2img redraws toward a prompt."
                )
                self.server_status = gr.Markdown(
                    f"server `{self.client.url}`", elem_classes="server-status"
                )
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    self._build_images()
                with gr.Column(scale=2):
                    self._build_controls(contract.PIPELINES[0])
            self.history = gr.State([])
            self.last_seed = gr.State(None)
            self.gallery = gr.Gallery(
                label="This session's edits (click one to restore its parameters)",
                columns=8,
                fit_columns=False,
                height=230,
                allow_preview=False,
                object_fit="contain",
                format="png",
                elem_id="history",
            )
            self._wire(blocks)
        return blocks

    def _build_images(self) -> None:
        with gr.Row():
            self.photo = gr.Image(
                label="Input photo",
                type="filepath",
                image_mode=None,
                sources=["upload", "clipboard"],
                height=420,
                elem_id="photo",
            )
            self.result = gr.Image(
                label="Result",
                type="filepath",
                format="png",
                interactive=False,
                height=420,
                buttons=["fullscreen"],
                elem_id="result",
            )
        self.status = gr.HTML(status_html("idle", "ready"), elem_id="status")
        with gr.Row():
            self.edit_button = gr.Button("Edit", variant="primary", elem_id="edit")
            self.cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel")
        with gr.Row(equal_height=True):
            self.result_info = gr.Markdown("", elem_id="result-info")
            self.reuse_seed = gr.Button(
                "Reuse this seed", visible=False, size="sm", elem_id="reuse-seed"
            )
            self.download = gr.DownloadButton(
                "Download PNG", visible=False, size="sm", elem_id="download"
            )
        self.compare = gr.ImageSlider(
            label="Before / after",
            type="pil",
            format="png",
            interactive=False,
            max_height=520,
            elem_id="compare",
        )

    def _build_controls(self, pipeline: str) -> None:
        self.controls["model"] = gr.Radio(
            [(PIPELINE_TITLES[p], p) for p in contract.PIPELINES],
            value=pipeline,
            label=LABELS["model"],
            elem_id="model",
        )
        self.model_state = gr.State(pipeline)
        # Every input of every pipeline, in contract order; the ones this pipeline lacks
        # are hidden until the model that has them is picked.
        for parameter in contract.PARAMETERS:
            if parameter.name != "image":
                self.controls[parameter.name] = _control(parameter, pipeline)

    def _wire(self, blocks: gr.Blocks) -> None:
        controls = self.controls
        edit_event = self.edit_button.click(
            self.run_edit,
            inputs={self.photo, self.history, *controls.values()},
            outputs=[
                self.result,
                self.status,
                self.result_info,
                self.reuse_seed,
                self.download,
                self.compare,
                self.history,
                self.last_seed,
                self.gallery,
            ],
            concurrency_limit=self.concurrency,
            # The upload reaches the handler undecoded: the client library and the server
            # judge its bytes and name the image in their answer, as for any other caller
            # (gr.Image would decode it first and fail in Gradio's words).
            preprocess=False,
            # The result shows Gradio's queue position while the edit waits its turn.
            show_progress="full",
            show_progress_on=[self.result],
            api_visibility="private",
        )
        self.cancel_button.click(
            self.cancel,
            outputs=self.status,
            cancels=[edit_event],
            queue=False,
            api_visibility="private",
        )
        self.reuse_seed.click(
            lambda seed: str(seed),
            inputs=self.last_seed,
            outputs=controls["seed"],
            queue=False,
            api_visibility="private",
        )
        # .input, not .change: a restore from the history sets the model itself.
        controls["model"].input(
            self.switch_model,
            inputs=[controls["model"], self.model_state, *controls.values()],
            outputs=[self.model_state, *controls.values()],
            queue=False,
            api_visibility="private",
        )
        self.gallery.select(
            self.restore,
            inputs=self.history,
            outputs=[self.model_state, *controls.values()],
            queue=False,
            api_visibility="private",
        )
        blocks.load(
            self.server_health, outputs=self.server_status, queue=False, api_visibility="private"
        )

    # ---------------------------------------------------------------- handlers

    async def server_health(self) -> str:
        """The header's line: is the server ready, and which edit models it serves."""
        try:
            health = await self.client.health(timeout_s=5)
        except EditError as error:
            return f"server `{self.client.url}`: **unavailable** ({' '.join(str(error).split())})"
        models = ", ".join(
            f"{PIPELINE_TITLES[name]} {'ready' if ready else 'not ready'}"
            for name, ready in health["models"].items()
        )
        state = "ready" if health["ready"] else "**not ready**"
        return f"server `{self.client.url}`: {state} · {models}"

    def switch_model(self, pipeline: str, previous: str, *values: Any) -> list[Any]:
        """A new pipeline: its labels and inputs. A value still at the old pipeline's
        default moves to the new one's; a value the user set stays."""
        updates: list[Any] = [pipeline]
        for name, value in zip(self.controls, values, strict=True):
            parameter = contract.PARAMETERS_BY_NAME.get(name)
            if parameter is None or name == "preview_every":
                updates.append(gr.update())
                continue
            old, new = parameter.default_for(previous), parameter.default_for(pipeline)
            moved = new if new is not None and value == old else None
            updates.append(_pipeline_view(parameter, pipeline, value=moved))
        return updates

    def restore(self, history: list[HistoryEntry], selected: gr.SelectData) -> list[Any]:
        """Puts a past edit's model, inputs and seed back into the controls."""
        entry = history[len(history) - 1 - selected.index]  # the gallery shows newest first
        updates: list[Any] = [entry.model]
        for name in self.controls:
            if name == "model":
                updates.append(entry.model)
            elif name == "seed":
                updates.append(str(entry.seed))
            elif name == "scheduler":
                updates.append(entry.parameters.get("scheduler") or CHECKPOINT_DEFAULT)
            else:
                parameter = contract.PARAMETERS_BY_NAME[name]
                value = entry.parameters.get(name, parameter.default_for(entry.model))
                updates.append(_pipeline_view(parameter, entry.model, value=value))
        return updates

    async def cancel(self, request: gr.Request) -> str:
        """The Cancel button: stops this tab's edit and says so once it has stopped."""
        task = self.running.get(request.session_hash)
        if task is None:
            return status_html("cancelled", "cancelled: this page has no edit on the server")
        # Gradio cancels the event too; cancelling here as well means the status below is
        # written only after the stream is closed, and never overwritten by a late step.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), CANCEL_WAIT_S)
        return status_html("cancelled", "cancelled: the server stopped this edit")

    async def run_edit(
        self, values: dict[Any, Any], request: gr.Request
    ) -> AsyncIterator[dict[Any, Any]]:
        """The Edit button: streams the edit, yielding progress, previews, then the result."""
        if not values[self.photo]:
            yield {self.status: status_html("error", "Image refused: upload a photo first")}
            return
        session = request.session_hash
        running = asyncio.current_task()
        if session is not None and running is not None:
            self.running[session] = running
        try:
            async for update in self._edit(values):
                yield update
        except EditError as error:
            yield {self.status: status_html("error", describe_error(error, self.client.url))}
        finally:
            if session is not None and self.running.get(session) is running:
                del self.running[session]

    async def _edit(self, values: dict[Any, Any]) -> AsyncIterator[dict[Any, Any]]:
        pipeline = values[self.controls["model"]]
        photo = await asyncio.to_thread(read_photo, values[self.photo]["path"])
        options = self._options(values, pipeline)
        prompt = options.pop("prompt")
        yield {
            self.status: status_html("running", "starting…", 0, 1),
            self.reuse_seed: gr.update(visible=False),
            self.download: gr.update(visible=False),
        }
        started = time.monotonic()
        # Closed on every way out (done, failed, cancelled), so the server stops at once
        # rather than when the generator is collected.
        async with contextlib.aclosing(
            self.client.edit_stream(photo, prompt, model=pipeline, **options)
        ) as stream:
            async for event in stream:
                if isinstance(event, EditResult):
                    yield await self._finished(event, photo, values[self.history], started)
                    return
                elapsed = time.monotonic() - started
                update: dict[Any, Any] = {
                    self.status: status_html(
                        "running",
                        progress_text(event.step, event.num_steps, elapsed),
                        event.step,
                        event.num_steps,
                    )
                }
                if event.preview_png is not None:
                    name = f"preview_{event.step:04d}.png"
                    update[self.result] = self.files.write(event.preview_png, name)
                yield update

    def _options(self, values: dict[Any, Any], pipeline: str) -> dict[str, Any]:
        """The edit's inputs from the controls, as the client library takes them."""
        options: dict[str, Any] = {}
        for parameter in contract.parameters_for(pipeline, streaming=True):
            if parameter.name == "image":
                continue
            value = values[self.controls[parameter.name]]
            if parameter.name == "seed":
                value = parse_seed(value)
            elif parameter.name == "scheduler" and value == CHECKPOINT_DEFAULT:
                value = None
            elif parameter.wire_type in ("INT32", "INT64"):
                value = int(value)
            options[parameter.name] = value
        return options

    async def _finished(
        self, result: EditResult, photo: bytes, history: list[HistoryEntry], started: float
    ) -> dict[Any, Any]:
        png = await asyncio.to_thread(png_with_parameters, result)
        path = self.files.write(png, f"{result.model}_{result.seed}.png")
        before = await asyncio.to_thread(before_image, photo, result.image.size)
        thumbnail = result.image.copy()
        thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        entry = HistoryEntry(thumbnail, result.model, dict(result.parameters), result.seed)
        history = [*history, entry][-HISTORY_LIMIT:]
        steps = result.parameters["num_inference_steps"]
        return {
            self.result: path,
            self.status: status_html("done", f"done in {time.monotonic() - started:.1f} s"),
            self.result_info: (
                f"**seed** `{result.seed}` · {PIPELINE_TITLES[result.model]} · {steps} steps "
                f"· {result.image.width}x{result.image.height} · {result.latency_s:.1f} s"
            ),
            self.reuse_seed: gr.update(visible=True, value=f"Reuse seed {result.seed}"),
            self.download: gr.update(visible=True, value=path),
            self.compare: (before, result.image),
            self.history: history,
            self.last_seed: result.seed,
            self.gallery: [(e.thumbnail, e.caption) for e in reversed(history)],
        }


def _control(parameter: contract.Parameter, pipeline: str) -> Any:
    """The widget of one contract input, as `pipeline` shows it first."""
    name = parameter.name
    elem_id = name.replace("_", "-")
    if name == "prompt":
        return gr.Textbox(
            label=PROMPT_LABELS[pipeline],
            placeholder=PROMPT_PLACEHOLDERS[pipeline],
            info=_info(parameter, pipeline),
            lines=2,
            elem_id=elem_id,
        )
    if name == "negative_prompt":
        return gr.Textbox(
            label=LABELS[name],
            value=parameter.default_for(pipeline),
            info=parameter.description,
            elem_id=elem_id,
        )
    if name == "seed":
        return gr.Textbox(
            label=LABELS[name],
            placeholder="random",
            info=_info(parameter, pipeline),
            elem_id=elem_id,
        )
    if name == "scheduler":
        assert parameter.choices is not None
        return gr.Dropdown(
            [CHECKPOINT_DEFAULT, *parameter.choices],
            value=CHECKPOINT_DEFAULT,
            label=LABELS[name],
            info=parameter.description,
            elem_id=elem_id,
        )
    assert parameter.minimum is not None and parameter.maximum is not None
    integral = parameter.wire_type in ("INT32", "INT64")
    value = PAGE_PREVIEW_EVERY if name == "preview_every" else parameter.default_for(pipeline)
    return gr.Slider(
        parameter.minimum,
        parameter.maximum,
        value=value,
        step=1 if integral else FLOAT_SLIDER_STEP,
        precision=0 if integral else None,
        label=LABELS[name],
        info=_info(parameter, pipeline),
        visible=pipeline in parameter.pipelines,
        elem_id=elem_id,
    )


def _info(parameter: contract.Parameter, pipeline: str) -> str:
    """The line under a control: the contract's description and allowed values."""
    if parameter.name == "temperature":
        return f"{parameter.description}; {TEMPERATURE_NOTES[pipeline]}"
    if parameter.name == "seed":
        return f"{parameter.description}; empty for random, or {parameter.allowed()}"
    return f"{parameter.description}; {parameter.allowed()}"


def _pipeline_view(parameter: contract.Parameter, pipeline: str, value: Any = None) -> Any:
    """A control as `pipeline` shows it: label, visibility, explanation, and `value` if
    one is given."""
    update: dict[str, Any] = {"visible": pipeline in parameter.pipelines}
    if parameter.name == "prompt":
        update.update(label=PROMPT_LABELS[pipeline], placeholder=PROMPT_PLACEHOLDERS[pipeline])
    if parameter.name == "temperature":
        update["info"] = _info(parameter, pipeline)
    if value is not None:
        update["value"] = value
    return gr.update(**update)


def build_page(client: AsyncEditClient, concurrency: int) -> EditPage:
    """The page for a client, its edits queued `concurrency` at a time."""
    page = EditPage(client, concurrency)
    page.blocks.queue(
        max_size=WAITING_PER_RUNNING * concurrency, default_concurrency_limit=concurrency
    )
    return page


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(
    url: str,
    *,
    host: str,
    port: int,
    concurrency: int,
    root_path: str | None = None,
    connection: dict[str, Any] | None = None,
) -> int:
    """Serves the page until Ctrl-C or SIGTERM; returns the exit code."""
    # Gradio reads this in more places than Blocks' own flag reaches.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    client = AsyncEditClient(url, **(connection or {}))
    page = build_page(client, concurrency)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        page.blocks.launch(
            server_name=host,
            server_port=port,
            share=False,
            quiet=True,
            root_path=root_path,
            max_file_size=contract.MAX_IMAGE_BYTES,
            footer_links=["gradio"],
            css=CSS,
            prevent_thread_lock=True,
        )
    except OSError as error:
        print(f"pix2pix: error: cannot serve the page on {host}:{port}: {error}", file=sys.stderr)
        page.files.close()
        return 1
    print(
        f"pix2pix ui: http://{host}:{port}{root_path or ''}/ "
        f"(Triton at {client.url}, {concurrency} edits at once); Ctrl-C stops it",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        page.blocks.close()
        page.files.close()
        print("pix2pix ui: stopped", flush=True)
