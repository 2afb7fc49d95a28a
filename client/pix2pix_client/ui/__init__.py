"""The web page: `pix2pix ui`, a Gradio app that edits through the client library.

    pix2pix ui --url HOST:8001 [--host 127.0.0.1] [--port 7860] [--concurrency 2]

controls.py makes a control of every contract input (pix2pix_client/contract.py) and
reads the edit's inputs back; page.py lays the page out and runs each tab's edits on the
streaming models; results.py turns outcomes into the status line, the PNG download and
the history. The page talks to Triton only through `AsyncEditClient`: it needs Gradio,
Pillow and numpy, nothing of the server side (`pip install 'pix2pix-client[ui]'`).
"""

from __future__ import annotations

import os

# Before Gradio is imported: it reads this in more places than Blocks' own flag reaches
# (usage analytics, the version check). The page calls no host but its own and Triton.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import signal
import sys
import time
from typing import Any

from pix2pix_client import contract
from pix2pix_client.aio import AsyncEditClient
from pix2pix_client.ui.page import CSS, EditPage

# The server holds three waiting edits per running one (max_edits 8 over 2 instances);
# the page's queue holds as many before it says it is full.
WAITING_PER_RUNNING = 3

__all__ = ["EditPage", "build_page", "launch", "serve"]


def build_page(client: AsyncEditClient, concurrency: int) -> EditPage:
    """The page for a client, its edits queued `concurrency` at a time."""
    page = EditPage(client, concurrency)
    page.blocks.queue(
        max_size=WAITING_PER_RUNNING * concurrency, default_concurrency_limit=concurrency
    )
    return page


def launch(page: EditPage, *, host: str, port: int, root_path: str | None = None) -> str:
    """Starts serving the page in the background; returns its local URL."""
    page.blocks.launch(
        server_name=host,
        server_port=port,
        share=False,
        quiet=True,
        root_path=root_path,
        max_file_size=contract.MAX_IMAGE_BYTES,
        footer_links=["gradio"],
        css=CSS,
        ssr_mode=False,
        prevent_thread_lock=True,
    )
    return f"http://{host}:{port}{root_path or ''}/"


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
    client = AsyncEditClient(url, **(connection or {}))
    page = build_page(client, concurrency)
    # Both explicitly: a page started in the background of a script inherits an ignored
    # SIGINT, and `make ui` stops it with SIGTERM.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        address = launch(page, host=host, port=port, root_path=root_path)
    except OSError as error:
        print(f"pix2pix: error: cannot serve the page on {host}:{port}: {error}", file=sys.stderr)
        page.files.close()
        return 1
    print(
        f"pix2pix ui: {address} (Triton at {client.url}, {concurrency} edits at once); "
        "Ctrl-C stops it",
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
