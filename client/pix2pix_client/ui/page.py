"""The page: its layout, and the handlers that run one browser tab's edits.

Edits run on the streaming models through AsyncEditClient.edit_stream: a progress bar
and the latent previews while they run; Cancel closes the stream, which stops the
server's loop within one denoising step.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import gradio as gr

from pix2pix_client import contract
from pix2pix_client.aio import AsyncEditClient
from pix2pix_client.errors import EditError
from pix2pix_client.request import EditResult
from pix2pix_client.ui import controls as page_controls
from pix2pix_client.ui.results import (
    FILE_LIFETIME_S,
    FileStore,
    HistoryEntry,
    before_image,
    describe_error,
    png_with_parameters,
    progress_text,
    result_summary,
    status_html,
)

HISTORY_LIMIT = 48
# How long Cancel waits for the stream to close before it reports.
CANCEL_WAIT_S = 10.0

CSS = """
.edit-status { min-height: 2.6em; display: flex; align-items: center; gap: 0.8em; }
.edit-status progress { flex: 1; height: 0.9em; accent-color: var(--color-accent); }
.edit-status[data-state="error"] { color: var(--error-text-color); }
.edit-status[data-state="cancelled"] { color: var(--body-text-color-subdued); }
.server-status { text-align: right; }
"""


class EditPage:
    """The page's components and handlers around one AsyncEditClient."""

    def __init__(self, client: AsyncEditClient, concurrency: int) -> None:
        self.client = client
        self.concurrency = concurrency
        self.files = FileStore()
        # The edit each browser tab (Gradio session) is running, so Cancel can stop it.
        self.running: dict[str, asyncio.Task[Any]] = {}
        self.blocks = self._build()

    # ------------------------------------------------------------------ layout

    def _build(self) -> gr.Blocks:
        pipeline = contract.PIPELINES[0]
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
                    self.controls: dict[str, Any] = {
                        "model": page_controls.model_control(pipeline),
                        **page_controls.input_controls(pipeline),
                    }
            self.model_state = gr.State(pipeline)
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
            f"{page_controls.PIPELINE_TITLES[name]} {'ready' if ready else 'not ready'}"
            for name, ready in health["models"].items()
        )
        state = "ready" if health["ready"] else "**not ready**"
        return f"server `{self.client.url}`: {state} · {models}"

    def switch_model(self, pipeline: str, previous: str, *values: Any) -> list[Any]:
        """A new pipeline: its labels and inputs, defaults moved where the user kept them."""
        return [
            pipeline,
            *page_controls.switched(list(self.controls), list(values), previous, pipeline),
        ]

    def restore(self, history: list[HistoryEntry], selected: gr.SelectData) -> list[Any]:
        """Puts a past edit's model, inputs and seed back into the controls."""
        entry = history[len(history) - 1 - selected.index]  # the gallery shows newest first
        updates = page_controls.restored(
            list(self.controls), entry.model, entry.parameters, entry.seed
        )
        return [entry.model, *updates]

    async def cancel(self, request: gr.Request) -> str:
        """The Cancel button: stops this tab's edit and says so once it has stopped."""
        task = self.running.get(request.session_hash or "")
        if task is not None:
            # Gradio cancels the event too; cancelling here as well means the status is
            # written only after the stream is closed, and never overwritten by a late step.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), CANCEL_WAIT_S)
        return status_html("cancelled", "cancelled: the server's work on this edit stopped")

    async def run_edit(
        self, values: dict[Any, Any], request: gr.Request
    ) -> AsyncIterator[dict[Any, Any]]:
        """The Edit button: streams the edit, yielding progress, previews, then the result."""
        if not values[self.photo]:
            yield {self.status: status_html("error", "Image refused: upload a photo first")}
            return
        session = request.session_hash or ""
        running = asyncio.current_task()
        if running is not None:
            self.running[session] = running
        try:
            async for update in self._edit(values):
                yield update
        except EditError as error:
            yield {self.status: status_html("error", describe_error(error, self.client.url))}
        finally:
            if self.running.get(session) is running:
                del self.running[session]

    async def _edit(self, values: dict[Any, Any]) -> AsyncIterator[dict[Any, Any]]:
        by_name = {name: values[control] for name, control in self.controls.items()}
        pipeline = by_name["model"]
        photo = await asyncio.to_thread(Path(values[self.photo]["path"]).read_bytes)
        options = page_controls.edit_options(by_name, pipeline)
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
                text = progress_text(event.step, event.num_steps, elapsed)
                update: dict[Any, Any] = {
                    self.status: status_html("running", text, event.step, event.num_steps)
                }
                if event.preview_png is not None:
                    name = f"preview_{event.step:04d}.png"
                    update[self.result] = self.files.write(event.preview_png, name)
                yield update

    async def _finished(
        self, result: EditResult, photo: bytes, history: list[HistoryEntry], started: float
    ) -> dict[Any, Any]:
        png = await asyncio.to_thread(png_with_parameters, result)
        path = self.files.write(png, f"{result.model}_{result.seed}.png")
        before = await asyncio.to_thread(before_image, photo, result.image.size)
        history = [*history, HistoryEntry.of(result)][-HISTORY_LIMIT:]
        return {
            self.result: path,
            self.status: status_html("done", f"done in {time.monotonic() - started:.1f} s"),
            self.result_info: result_summary(result),
            self.reuse_seed: gr.update(visible=True, value=f"Reuse seed {result.seed}"),
            self.download: gr.update(visible=True, value=path),
            self.compare: (before, result.image),
            self.history: history,
            self.last_seed: result.seed,
            self.gallery: [(e.thumbnail, e.caption) for e in reversed(history)],
        }
