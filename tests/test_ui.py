"""The web page (`pix2pix ui`) in a real browser: Playwright drives Debian's Chromium,
headless, against the page served over a real tritonserver on the tiny preset.

The server runs one edit per model at a time (and the page one at a time, to match), so
an edit the page failed to stop on Cancel would hold up the next one for minutes: the
cancel test sees that as a slow follow-up edit, not as a timing guess.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from pix2pix_client import EditClient, contract
from tests.conftest import TEST_OPTIONS
from tests.serving import photo, png_bytes

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "make it snowy"
# The photo the page edits; small, so that the tiny preset's steps are quick.
PHOTO_SIDE = 128
# Tiny-preset images above this many pixels are refused (the "too large" case).
MAX_PIXELS = 192 * 192
LONG_STEPS = 1000
# Generous: the machine is shared, and the first edit loads the models' sessions.
EDIT_WAIT_S = 180
TERMINAL = ("done", "error", "cancelled")


def _chromium() -> str | None:
    """Debian's Chromium (Playwright's own browser download cannot be reached here)."""
    configured = os.environ.get("PIX2PIX_CHROMIUM")
    if configured:
        return configured
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if importlib.util.find_spec("playwright") is None:
        return "no Playwright for Python: pip install playwright (make setup installs it)"
    if _chromium() is None:
        return (
            "no Chromium executable: apt-get install chromium (make test does it where it "
            "runs as root), or point PIX2PIX_CHROMIUM at one"
        )
    return None


pytest.importorskip(
    "gradio", reason="the page needs Gradio: pip install './client[ui]' (make setup installs it)"
)
needs_browser = pytest.mark.skipif(_browser_missing() is not None, reason=_browser_missing() or "")


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ui_server(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory, start_server):
    """A tritonserver of the tiny preset running one edit per model at a time."""
    from model_repository.builder import build_repository
    from model_repository.configs import RepositoryOptions

    options = RepositoryOptions(
        **{**TEST_OPTIONS, "edit_instances": 1, "max_edits": 4, "max_image_pixels": MAX_PIXELS}
    )
    repository = tmp_path_factory.mktemp("repository") / "tiny-ui"
    build_repository(tiny_export, repository, options)
    return start_server(repository)


def _launch_page(grpc_url: str) -> tuple[Any, str]:
    from pix2pix_client.aio import AsyncEditClient
    from pix2pix_client.ui import build_page, launch
    from serving.tritonserver import free_port

    page = build_page(AsyncEditClient(grpc_url), concurrency=1)
    return page, launch(page, host="127.0.0.1", port=free_port())


@pytest.fixture(scope="module")
def page_url(ui_server) -> Iterator[str]:
    """The page, served from this process (it stops with the module)."""
    page, url = _launch_page(ui_server.grpc_url)
    yield url
    page.blocks.close()
    page.files.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=_chromium(), headless=True, args=["--no-sandbox"]
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def outside_requests() -> list[str]:
    """Every request a tab made to a host other than loopback (refused, and recorded)."""
    return []


@pytest.fixture()
def open_tab(browser, outside_requests: list[str]):
    """`open_tab(url)`: a new browser tab on the page, ready to use."""
    contexts = []

    def open_(url: str) -> Tab:
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        contexts.append(context)

        def refuse_outside(route: Any) -> None:
            if urlsplit(route.request.url).hostname not in ("127.0.0.1", "localhost"):
                outside_requests.append(route.request.url)
                route.abort()
            else:
                route.continue_()

        context.route("**/*", refuse_outside)
        tab = Tab(context.new_page())
        tab.page.goto(url)
        tab.page.wait_for_selector("#edit", timeout=EDIT_WAIT_S * 1000)
        return tab

    yield open_
    for context in contexts:
        context.close()


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ui") / "astronaut.png"
    path.write_bytes(png_bytes(photo(PHOTO_SIDE, PHOTO_SIDE)))
    return path


# ------------------------------------------------------------------- driving the page


class Tab:
    """One browser tab on the page, driven through its controls as a person would."""

    def __init__(self, page: Any) -> None:
        self.page = page

    def upload(self, path: Path) -> None:
        remove = self.page.locator("#photo button[aria-label='Remove Image']")
        if remove.count():
            remove.click()
        self.page.locator("#photo input[type=file]").set_input_files(str(path))
        self.page.wait_for_selector("#photo img", timeout=60_000)

    def type_prompt(self, text: str) -> None:
        self.page.locator("#prompt textarea").fill(text)

    def set_number(self, control: str, value: float) -> None:
        box = self.page.locator(f"#{control} input[type=number]")
        box.fill(str(value))
        box.press("Enter")

    def number(self, control: str) -> float:
        return float(self.page.locator(f"#{control} input[type=number]").input_value())

    def set_seed(self, seed: int | str) -> None:
        self.page.locator("#seed textarea").fill(str(seed))

    @property
    def seed_box(self) -> str:
        return self.page.locator("#seed textarea").input_value()

    def pick_model(self, title: str) -> None:
        self.page.locator("#model").get_by_text(title, exact=True).click()

    def checked_model(self) -> str:
        return self.page.locator("#model input:checked").get_attribute("value") or ""

    def click_edit(self) -> None:
        # Marks the current status line: the next edit's status replaces the element.
        self.page.evaluate(
            "document.querySelectorAll('#status .edit-status').forEach(s => s.dataset.stale = '1')"
        )
        self.page.locator("#edit").click()

    def wait_status(self, states: tuple[str, ...], predicate: str = "true") -> None:
        """Waits for a fresh status line in one of `states` for which the JavaScript
        expression `predicate` (over the status element `s`) holds."""
        self.page.wait_for_function(
            "states => { const s = document.querySelector('#status .edit-status'); return s"
            f" && !s.dataset.stale && states.includes(s.dataset.state) && ({predicate}); }}",
            arg=list(states),
            timeout=EDIT_WAIT_S * 1000,
        )

    def step(self) -> int:
        return int(self.page.locator("#status .edit-status").get_attribute("data-step") or 0)

    @property
    def status(self) -> str:
        return self.page.locator("#status").inner_text().strip()

    def state(self) -> str:
        return self.page.locator("#status .edit-status").get_attribute("data-state") or ""

    def watch_progress(self) -> None:
        """Records, from now on, every step the status line's progress bar shows
        (window.__steps) and every latent preview the result pane shows (window.__previews)."""
        self.page.evaluate(
            """() => { window.__steps = []; window.__previews = new Set();
            const options = {subtree: true, childList: true, attributes: true};
            new MutationObserver(() => {
              const s = document.querySelector('#status .edit-status');
              if (s && s.dataset.state === 'running' && s.querySelector('progress'))
                window.__steps.push(+s.dataset.step);
            }).observe(document.querySelector('#status'), options);
            new MutationObserver(() => {
              const img = document.querySelector('#result img');
              if (img && img.src.includes('preview_')) window.__previews.add(img.src);
            }).observe(document.querySelector('#result'), options); }"""
        )

    def steps_seen(self) -> list[int]:
        return list(self.page.evaluate("window.__steps"))

    def previews_seen(self) -> int:
        return int(self.page.evaluate("window.__previews.size"))

    def edit(self, model: str, seed: int | None = None) -> bytes:
        """Clicks Edit, waits for the result, returns the PNG the page shows."""
        self.click_edit()
        self.wait_status(TERMINAL)
        assert self.state() == "done", self.status
        shown = self.page.locator("#result img")
        if seed is not None:
            # The final result's file is named after its model and seed; previews are not.
            self.page.wait_for_function(
                "name => document.querySelector('#result img')?.src.endsWith(name)",
                arg=f"{model}_{seed}.png",
                timeout=30_000,
            )
        return self.page.request.get(shown.get_attribute("src")).body()

    def shown_seed(self) -> int:
        text = self.page.locator("#result-info").inner_text()
        match = re.search(r"seed\s+(\d+)", text)
        assert match, text
        return int(match.group(1))


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _library_edit(url: str, image: Path, model: str, **options: Any) -> np.ndarray:
    with EditClient(url, timeout_s=EDIT_WAIT_S) as client:
        return _pixels(client.edit(image.read_bytes(), PROMPT, model=model, **options).png)


# -------------------------------------------------------------------------------- tests


@needs_browser
def test_an_edit_on_the_page_is_the_client_librarys_edit(
    ui_server, page_url: str, open_tab, photo_file: Path, outside_requests: list[str]
) -> None:
    tab = open_tab(page_url)
    tab.upload(photo_file)
    tab.type_prompt(PROMPT)
    tab.set_number("num-inference-steps", 12)
    tab.set_seed(1234)
    tab.watch_progress()
    shown = tab.edit(contract.INSTRUCT_PIX2PIX, seed=1234)

    # Progress advanced step by step, and the result pane showed the latent previews.
    seen = tab.steps_seen()
    assert len({s for s in seen if 0 < s < 12}) >= 3, seen
    assert seen == sorted(seen), seen
    assert tab.previews_seen() >= 2
    assert tab.shown_seed() == 1234
    expected = _library_edit(
        ui_server.grpc_url, photo_file, contract.INSTRUCT_PIX2PIX, num_inference_steps=12, seed=1234
    )
    np.testing.assert_array_equal(_pixels(shown), expected)

    # Before/after: the slider holds the photo and the result.
    assert tab.page.locator("#compare img").count() == 2

    # The download is the same pixels, with the parameters and seed as PNG text.
    with tab.page.expect_download() as download:
        tab.page.locator("#download").click()
    downloaded = Image.open(download.value.path())
    assert downloaded.text["seed"] == "1234"
    assert downloaded.text["num_inference_steps"] == "12"
    assert downloaded.text["prompt"] == PROMPT
    assert downloaded.text["model"] == contract.INSTRUCT_PIX2PIX
    np.testing.assert_array_equal(np.asarray(downloaded.convert("RGB")), expected)

    # img2img: its own inputs and defaults (no image guidance, temperature 0.8).
    tab.pick_model("img2img")
    tab.page.locator("#image-guidance-scale").wait_for(state="hidden")
    default_temperature = contract.PARAMETERS_BY_NAME["temperature"].default_for("img2img")
    tab.page.wait_for_function(
        "t => +document.querySelector('#temperature input[type=number]').value === t",
        arg=default_temperature,
    )
    tab.set_number("num-inference-steps", 10)
    tab.set_seed(99)
    shown = tab.edit(contract.IMG2IMG, seed=99)
    expected = _library_edit(
        ui_server.grpc_url, photo_file, contract.IMG2IMG, num_inference_steps=10, seed=99
    )
    np.testing.assert_array_equal(_pixels(shown), expected)

    # History: newest first; clicking the older one restores its model and inputs.
    thumbnails = tab.page.locator("#history .thumbnail-item")
    assert thumbnails.count() == 2
    assert "img2img" in thumbnails.nth(0).inner_text()
    thumbnails.nth(1).click()
    tab.page.locator("#image-guidance-scale").wait_for(state="visible")
    tab.page.wait_for_function(
        "() => document.querySelector('#seed textarea').value === '1234'", timeout=30_000
    )
    assert tab.checked_model() == contract.INSTRUCT_PIX2PIX
    assert tab.number("num-inference-steps") == 12
    assert tab.number("temperature") == 1.0

    # The finished page, for the README (docs/ui.png is a committed copy of it).
    screenshot = ROOT / "out" / "ui.png"
    screenshot.parent.mkdir(exist_ok=True)
    tab.page.screenshot(path=str(screenshot), full_page=True)
    assert outside_requests == []


@needs_browser
def test_a_random_seed_is_shown_and_one_click_reuses_it(
    page_url: str, open_tab, photo_file: Path
) -> None:
    tab = open_tab(page_url)
    tab.upload(photo_file)
    tab.type_prompt(PROMPT)
    tab.set_number("num-inference-steps", 4)
    assert tab.seed_box == ""  # random by default
    first = tab.edit(contract.INSTRUCT_PIX2PIX)
    seed = tab.shown_seed()
    tab.page.locator("#reuse-seed").click()
    tab.page.wait_for_function(
        "seed => document.querySelector('#seed textarea').value === seed", arg=str(seed)
    )
    again = tab.edit(contract.INSTRUCT_PIX2PIX, seed=seed)
    np.testing.assert_array_equal(_pixels(again), _pixels(first))


@needs_browser
def test_cancel_stops_the_servers_work_and_a_second_tab_waits_its_turn(
    page_url: str, open_tab, photo_file: Path
) -> None:
    running, waiting = open_tab(page_url), open_tab(page_url)
    for tab in (running, waiting):
        tab.upload(photo_file)
        tab.type_prompt(PROMPT)
    running.set_number("num-inference-steps", LONG_STEPS)
    waiting.set_number("num-inference-steps", 4)
    running.click_edit()
    running.wait_status(("running",), "+s.dataset.step >= 3")

    # The page runs one edit at a time, as the server does: the second tab is queued.
    waiting.click_edit()
    waiting.page.wait_for_function(
        "() => /queue: *1\\/1/.test(document.querySelector('#result').innerText)",
        timeout=EDIT_WAIT_S * 1000,
    )

    # The rate the page measured (steps received per second) says how long the long edit
    # would take if nothing stopped it.
    running.wait_status(("running",), "+s.dataset.step >= 10")
    rate = re.search(r"([\d.]+) steps/s", running.status)
    assert rate, running.status
    long_edit_s = LONG_STEPS / float(rate.group(1))

    cancelled = time.monotonic()
    running.page.locator("#cancel").click()
    running.wait_status(("cancelled",))
    assert "cancelled" in running.status
    # Both follow-up edits would wait behind the long one had the server not stopped it.
    waiting.wait_status(TERMINAL)
    assert waiting.state() == "done", waiting.status
    running.set_number("num-inference-steps", 4)
    running.edit(contract.INSTRUCT_PIX2PIX)
    followed_s = time.monotonic() - cancelled
    assert followed_s < long_edit_s / 4, (followed_s, long_edit_s)


@needs_browser
def test_bad_uploads_are_refused_in_words_naming_the_image(
    page_url: str, open_tab, photo_file: Path, tmp_path: Path
) -> None:
    tab = open_tab(page_url)
    tab.type_prompt(PROMPT)
    tab.click_edit()
    tab.wait_status(("error",))
    assert "upload a photo" in tab.status

    corrupt = tmp_path / "holiday.png"
    corrupt.write_bytes(png_bytes(photo(64, 64))[:200])
    tab.page.locator("#photo input[type=file]").set_input_files(str(corrupt))
    tab.click_edit()
    tab.wait_status(("error",))
    assert tab.status.startswith("Image refused: image"), tab.status
    assert "Traceback" not in tab.status

    large = tmp_path / "large.png"
    large.write_bytes(png_bytes(photo(256, 256)))
    tab.upload(large)
    tab.click_edit()
    tab.wait_status(("error",))
    # The server's own message, naming the field and the limit.
    assert tab.status.startswith("Image refused: image"), tab.status
    assert str(MAX_PIXELS) in tab.status.replace(",", ""), tab.status


@needs_browser
def test_a_server_that_is_down_is_said_in_words(open_tab, photo_file: Path) -> None:
    from serving.tritonserver import free_port

    page, url = _launch_page(f"127.0.0.1:{free_port()}")
    try:
        tab = open_tab(url)
        tab.page.wait_for_selector(".server-status :text('unavailable')")
        tab.upload(photo_file)
        tab.type_prompt(PROMPT)
        tab.click_edit()
        tab.wait_status(("error",))
        assert "is unavailable" in tab.status, tab.status
    finally:
        page.blocks.close()
        page.files.close()


def test_busy_and_down_servers_are_told_apart_in_words() -> None:
    from tritonclient.utils import InferenceServerException

    from pix2pix_client.errors import from_triton
    from pix2pix_client.ui.results import describe_error

    def said(message: str, status: str) -> str:
        error = from_triton(InferenceServerException(message, status=status), model="img2img")
        return describe_error(error, "triton:8001")

    busy = said("Exceeds maximum queue size", "StatusCode.UNAVAILABLE")
    assert busy.startswith("The server is busy"), busy
    down = said("failed to connect to all addresses", "StatusCode.UNAVAILABLE")
    assert down.startswith("The server at triton:8001 is unavailable"), down
    bad = said(
        "seed=-1 is out of range: allowed 0..2^63-1",
        "StatusCode.INVALID_ARGUMENT",
    )
    assert bad == "Seed refused: seed=-1 is out of range: allowed 0..2^63-1", bad


def test_the_command_serves_the_page_until_ctrl_c(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import urllib.request

    from pix2pix_client.cli import main
    from serving.tritonserver import free_port

    assert main(["ui", "--concurrency", "0"]) == 2
    port = free_port()
    command = [sys.executable, "-m", "pix2pix_client", "ui", "--url", f"127.0.0.1:{free_port()}"]
    page = subprocess.Popen(
        [*command, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert page.stdout is not None
        line = page.stdout.readline()  # the URL, once the page is served
        assert line.startswith(f"pix2pix ui: http://127.0.0.1:{port}/"), line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as response:
            assert response.status == 200
        page.send_signal(signal.SIGINT)
        output, _ = page.communicate(timeout=60)
    finally:
        page.kill()
    assert page.returncode == 0, output
    assert "pix2pix ui: stopped" in output
