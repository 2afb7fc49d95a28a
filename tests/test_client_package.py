"""The client package stands alone: no server-side or heavy ML imports."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import pix2pix_client

FORBIDDEN = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "tensorrt")
SERVER_PACKAGES = ("export", "edit_pipeline", "model_repository", "serving", "benchmarks", "deploy")
# The web page (pix2pix-client[ui]) is held to the same rule where Gradio is installed.
HAS_GRADIO = importlib.util.find_spec("gradio") is not None


def test_importing_the_client_loads_no_ml_framework() -> None:
    page = ", pix2pix_client.ui" if HAS_GRADIO else ""
    code = (
        f"import sys, pix2pix_client, pix2pix_client.cli, pix2pix_client.aio{page}\n"
        f"loaded = sorted(m for m in {FORBIDDEN!r} if m in sys.modules)\n"
        "print(','.join(loaded))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert completed.stdout.strip() == ""


def test_sources_import_nothing_from_the_server_side() -> None:
    package = Path(pix2pix_client.__file__).parent
    for source in package.rglob("*.py"):
        tree = ast.parse(source.read_text(), filename=str(source))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top not in FORBIDDEN + SERVER_PACKAGES, f"{source.name} imports {name}"


@pytest.mark.skipif(not HAS_GRADIO, reason="the page needs Gradio: pip install './client[ui]'")
def test_the_pages_controls_are_the_contracts() -> None:
    from model_repository.configs import MAX_DERIVED_EDIT_INSTANCES, RepositoryOptions
    from pix2pix_client import contract
    from pix2pix_client.aio import AsyncEditClient
    from pix2pix_client.cli import UI_CONCURRENCY
    from pix2pix_client.ui import build_page
    from pix2pix_client.ui.controls import CHECKPOINT_DEFAULT, PAGE_PREVIEW_EVERY

    # The page runs edits at once up to the server's derived edit instances; those the
    # server cannot start yet wait in its queue, which holds more than the page sends.
    assert UI_CONCURRENCY <= MAX_DERIVED_EDIT_INSTANCES < RepositoryOptions().max_edits
    page = build_page(AsyncEditClient("127.0.0.1:1"), UI_CONCURRENCY)
    first = contract.PIPELINES[0]
    names = [p.name for p in contract.PARAMETERS if p.name != "image"]
    assert list(page.controls) == ["model", *names]
    for parameter in contract.PARAMETERS:
        if parameter.minimum is None or parameter.name == "seed":
            continue
        control = page.controls[parameter.name]
        assert (control.minimum, control.maximum) == (parameter.minimum, parameter.maximum)
        integral = parameter.wire_type in ("INT32", "INT64")
        assert (control.step == 1) == integral, parameter.name
        default = parameter.default_for(first)
        expected = PAGE_PREVIEW_EVERY if parameter.name == "preview_every" else default
        assert control.value == expected, parameter.name
        assert control.visible == (first in parameter.pipelines)
    scheduler = page.controls["scheduler"]
    assert [choice[1] for choice in scheduler.choices] == [
        CHECKPOINT_DEFAULT,
        *contract.SCHEDULERS,
    ]
    assert scheduler.value == CHECKPOINT_DEFAULT


def test_public_api() -> None:
    for name in (
        "EditClient",
        "AsyncEditClient",
        "EditResult",
        "EditError",
        "InvalidArgument",
        "ServerUnavailable",
        "DeadlineExceeded",
        "ModelNotFound",
        "ServerError",
        "contract",
    ):
        assert hasattr(pix2pix_client, name), name
