"""onnxruntime's graphs optimized for this CPU and saved (edit_pipeline/cpu_graph.py,
model_repository/cpu_graphs.py): they compute what the plain graph computes, byte for byte, are
loaded only on the machine they were made for, and the repository builder saves them
once per export and machine (into the user's cache when the export is read-only)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from edit_pipeline.cpu_graph import (
    CPU_GRAPH_DIR,
    MADE_FOR_FILE,
    load_graph,
    save_cpu_graph,
    this_machine,
)
from edit_pipeline.onnxruntime_component import OnnxComponent
from edit_pipeline.unet_passes import SHALLOW_DIR
from export.onnx_export import EXTERNAL_DATA_FILE, MODEL_FILE
from model_repository.builder import build_repository
from model_repository.configs import RepositoryOptions
from model_repository.cpu_graphs import CPU_GRAPHS_DIR, cpu_graphs_dir
from tests.test_openvino import unet_inputs

NCHWC_DOMAIN = "com.microsoft.nchwc"


def domains(model: Path) -> set[str]:
    graph = onnx.load(str(model), load_external_data=False).graph
    return {node.domain for node in graph.node}


def test_a_saved_graph_computes_what_the_plain_graph_computes(
    tiny_export: Path, tmp_path: Path
) -> None:
    plain = tiny_export / "unet_pix2pix" / MODEL_FILE
    save_cpu_graph(plain, tmp_path / "unet")
    saved = tmp_path / "unet" / MODEL_FILE
    # The convolutions are already in onnxruntime's blocked layout for this CPU.
    assert NCHWC_DOMAIN in domains(saved) and NCHWC_DOMAIN not in domains(plain)
    assert json.loads((tmp_path / "unet" / MADE_FOR_FILE).read_text()) == this_machine()
    inputs = unet_inputs()
    expected = OnnxComponent(plain, intra_op_threads=1).run(inputs)["noise_pred"]
    actual = OnnxComponent(saved, intra_op_threads=1).run(inputs)["noise_pred"]
    np.testing.assert_array_equal(actual, expected)


def test_a_graph_made_for_another_machine_is_not_loaded(
    tiny_export: Path, tmp_path: Path, capfd
) -> None:
    version_dir = tmp_path / "1"
    version_dir.mkdir()
    (version_dir / MODEL_FILE).write_bytes((tiny_export / "vae_decoder" / MODEL_FILE).read_bytes())
    assert load_graph(version_dir, Path) == version_dir / MODEL_FILE
    save_cpu_graph(version_dir / MODEL_FILE, version_dir / CPU_GRAPH_DIR)
    assert load_graph(version_dir, Path) == version_dir / CPU_GRAPH_DIR / MODEL_FILE
    made_for = version_dir / CPU_GRAPH_DIR / MADE_FOR_FILE
    for other in ({"isa": ["avx2", "fma"]}, {"onnxruntime": "1.0.0"}):
        made_for.write_text(json.dumps(this_machine() | other))
        assert load_graph(version_dir, Path) == version_dir / MODEL_FILE
        assert "made for another CPU or onnxruntime" in capfd.readouterr().err


def test_a_damaged_saved_graph_leaves_the_plain_one_to_serve(
    tiny_export: Path, tmp_path: Path, capfd
) -> None:
    version_dir = tmp_path / "1"
    version_dir.mkdir()
    plain = version_dir / MODEL_FILE
    plain.write_bytes((tiny_export / "unet_pix2pix" / MODEL_FILE).read_bytes())
    save_cpu_graph(plain, version_dir / CPU_GRAPH_DIR)
    weights = version_dir / CPU_GRAPH_DIR / EXTERNAL_DATA_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    def component(graph: Path) -> OnnxComponent:
        return OnnxComponent(graph, intra_op_threads=1)

    loaded = load_graph(version_dir, component)
    assert loaded.model_path == plain
    assert "does not load" in capfd.readouterr().err
    inputs = unet_inputs()
    np.testing.assert_array_equal(
        loaded.run(inputs)["noise_pred"], component(plain).run(inputs)["noise_pred"]
    )


def test_the_builder_saves_them_once_and_links_them_beside_each_graph(
    tiny_export: Path, tmp_path: Path
) -> None:
    options = RepositoryOptions(flavour="python-onnxruntime", precision="fp32", edit_instances=1)
    build_repository(tiny_export, tmp_path / "first", options)
    graphs = cpu_graphs_dir(tiny_export)
    assert graphs.parent == tiny_export / "cpu_graphs"
    record = graphs / "record.json"
    written = record.stat().st_mtime_ns
    build_repository(tiny_export, tmp_path / "second", options)
    assert record.stat().st_mtime_ns == written
    unet = tmp_path / "second" / "unet_pix2pix" / "1"
    for folder in (unet, unet / SHALLOW_DIR, tmp_path / "second" / "text_encoder" / "1"):
        assert load_graph(folder, Path) == folder / CPU_GRAPH_DIR / MODEL_FILE
    saved = unet / CPU_GRAPH_DIR / MODEL_FILE
    assert saved.stat().st_ino == (graphs / "unet_pix2pix" / MODEL_FILE).stat().st_ino


def test_a_read_only_export_gets_them_in_the_cache(
    tiny_export: Path, tmp_path: Path, read_only_copy, monkeypatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    export = read_only_copy(tiny_export, leave_out=("cpu_graphs", "fp16_weights", "int8"))
    options = RepositoryOptions(flavour="python-onnxruntime", precision="fp32", edit_instances=1)
    build_repository(export, tmp_path / "repository", options)
    graphs = cpu_graphs_dir(export)
    assert graphs.is_relative_to(tmp_path / "cache")
    unet = tmp_path / "repository" / "unet_img2img" / "1"
    assert load_graph(unet, Path) == unet / CPU_GRAPH_DIR / MODEL_FILE


def test_with_nowhere_to_write_them_the_models_optimize_as_they_load(
    tiny_export: Path, tmp_path: Path, read_only_copy, monkeypatch, capfd
) -> None:
    export = read_only_copy(tiny_export, leave_out=("cpu_graphs", "fp16_weights", "int8"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(export / "cache"))
    options = RepositoryOptions(flavour="python-onnxruntime", precision="fp32", edit_instances=1)
    build_repository(export, tmp_path / "repository", options)
    assert "graphs optimized for this CPU not saved" in capfd.readouterr().err
    unet = tmp_path / "repository" / "unet_img2img" / "1"
    assert not (unet / CPU_GRAPH_DIR).exists()
    assert load_graph(unet, Path) == unet / MODEL_FILE


def test_a_full_disk_leaves_them_out_and_takes_back_what_was_saved(
    tiny_export: Path, tmp_path: Path, monkeypatch, capfd
) -> None:
    """onnxruntime writes each saved graph itself; on a full disk (its weights file on
    /dev/full here) the build says so, removes what it had saved and serves the plain
    graphs."""
    export = tmp_path / "export"
    shutil.copytree(
        tiny_export, export, symlinks=True, ignore=shutil.ignore_patterns(CPU_GRAPHS_DIR)
    )
    made = tempfile.mkdtemp

    def scratch_on_a_full_disk(*args, **kwargs) -> str:
        folder = made(*args, **kwargs)
        if CPU_GRAPHS_DIR in Path(folder).parts:
            (Path(folder) / EXTERNAL_DATA_FILE).symlink_to("/dev/full")
        return folder

    monkeypatch.setattr(tempfile, "mkdtemp", scratch_on_a_full_disk)
    options = RepositoryOptions(flavour="python-onnxruntime", precision="fp32", edit_instances=1)
    build_repository(export, tmp_path / "repository", options)
    assert "graphs optimized for this CPU not saved" in capfd.readouterr().err
    assert not list((export / CPU_GRAPHS_DIR).glob("*/*"))
    unet = tmp_path / "repository" / "unet_img2img" / "1"
    assert load_graph(unet, Path) == unet / MODEL_FILE


def test_switched_off_nothing_is_saved(tiny_export: Path, tmp_path: Path, capfd) -> None:
    """--no-cpu-graphs: an operator short of disk serves the plain graphs."""
    export = tmp_path / "export"
    shutil.copytree(
        tiny_export, export, symlinks=True, ignore=shutil.ignore_patterns(CPU_GRAPHS_DIR)
    )
    options = RepositoryOptions(
        flavour="python-onnxruntime", precision="fp32", edit_instances=1, cpu_graphs=False
    )
    build_repository(export, tmp_path / "repository", options)
    assert not (export / CPU_GRAPHS_DIR).exists()
    assert not list((tmp_path / "repository").glob(f"**/{CPU_GRAPH_DIR}"))
    assert "graphs optimized for this CPU" not in capfd.readouterr().err
