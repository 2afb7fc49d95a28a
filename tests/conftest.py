"""Shared fixtures: the tiny preset and its validated ONNX export, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.onnx_export import export_checkpoint
from export.presets import build_preset


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root folder of the tiny preset: instruct-pix2pix/ and img2img/ diffusers folders."""
    root = tmp_path_factory.mktemp("presets") / "tiny"
    build_preset("tiny", root, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_export(tiny_preset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset exported to ONNX and validated; the folder holds manifest.json."""
    output = tmp_path_factory.mktemp("onnx") / "tiny"
    manifest, rows = export_checkpoint([tiny_preset], output)
    assert manifest["validation"]["passed"], rows
    return output
