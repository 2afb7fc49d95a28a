"""The client package stands alone: no server-side or heavy ML imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pix2pix_client

FORBIDDEN = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "tensorrt")
SERVER_PACKAGES = ("export", "model_repository", "benchmarks")


def test_importing_the_client_loads_no_ml_framework() -> None:
    code = (
        "import sys, pix2pix_client, pix2pix_client.cli, pix2pix_client.aio\n"
        f"loaded = sorted(m for m in {FORBIDDEN!r} if m in sys.modules)\n"
        "print(','.join(loaded))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert completed.stdout.strip() == ""


def test_sources_import_nothing_from_the_server_side() -> None:
    package = Path(pix2pix_client.__file__).parent
    for source in package.glob("*.py"):
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
