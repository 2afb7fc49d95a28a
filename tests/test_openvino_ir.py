"""bf16's fp16-stored weights: the IR the openvino flavours serve at bf16
(export/openvino_ir.py), on the tiny preset with real OpenVINO.

Converted when a bf16 repository is built and kept while current, converted again when
the export changes; served by both openvino flavours; computing in bf16 what the ONNX
export's fp32 weights compute, within bf16's own rounding; and a real tritonserver edits
with them, reused UNet work (the shallow pass's IR) included. A component read from IR
gives back its mapped weights file's pages, and an edit the heap pages it freed
(edit_pipeline/page_release.py).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from benchmarks.fidelity import psnr
from benchmarks.settings import BenchConfig
from benchmarks.systems import BareLoop
from edit_pipeline.openvino_component import OpenVinoComponent, bf16_unsupported_reason
from edit_pipeline.page_release import mapped_ranges, release_free_heap, release_mapped_pages
from edit_pipeline.preprocess import decode_image
from export.onnx_export import MANIFEST, MODEL_FILE, load_manifest
from export.openvino_ir import (
    FP16_WEIGHTS_DIR,
    IR_FILE,
    IR_WEIGHTS_FILE,
    RECORD_FILE,
    ensure_fp16_weights,
    fp16_weights_are_current,
    fp16_weights_dir,
)
from model_repository.builder import build_repository
from model_repository.configs import OPENVINO_FLAVOURS, RepositoryOptions
from tests.memory import anonymous_resident_bytes
from tests.serving import edit, photo, png_bytes
from tests.test_openvino import BF16_MAX_ABS_DIFFERENCE, BF16_MIN_PSNR_DB, unet_inputs
from tests.test_parity import CASES, PROMPT, SEED, reference_image

pytestmark = pytest.mark.skipif(
    bf16_unsupported_reason() is not None, reason="bf16 is refused where the CPU lacks it"
)

UNET = "unet_pix2pix"


def _config(repository: Path, model: str) -> mc.ModelConfig:
    return text_format.Parse((repository / model / "config.pbtxt").read_text(), mc.ModelConfig())


@pytest.fixture(scope="module")
def bf16_repositories(tiny_export: Path, tmp_path_factory) -> dict[str, Path]:
    """A bf16 repository of each openvino flavour, built from the tiny export."""
    root = tmp_path_factory.mktemp("bf16")
    repositories = {}
    for flavour in OPENVINO_FLAVOURS:
        repositories[flavour] = root / flavour
        options = RepositoryOptions(flavour=flavour, precision="bf16", intra_op_threads=1)
        build_repository(tiny_export, repositories[flavour], options)
    return repositories


def test_both_openvino_flavours_serve_the_fp16_weights_at_bf16(
    bf16_repositories: dict[str, Path], tiny_export: Path
) -> None:
    assert fp16_weights_are_current(tiny_export)
    for flavour, repository in bf16_repositories.items():
        for name in load_manifest(tiny_export)["components"]:
            if not (repository / name).is_dir():  # a shallow pass hosted by its UNet
                continue
            config = _config(repository, name)
            served = config.default_model_filename or config.parameters["model_file"].string_value
            assert served == IR_FILE, (flavour, name)
            for file in (IR_FILE, IR_WEIGHTS_FILE):
                converted = fp16_weights_dir(tiny_export) / name / file
                assert (repository / name / "1" / file).samefile(converted)
            assert not (repository / name / "1" / MODEL_FILE).exists()
    # python-openvino hosts the shallow pass in the UNet's model: its IR too.
    shallow = bf16_repositories["python-openvino"] / UNET / "1" / "shallow"
    assert (shallow / IR_FILE).samefile(fp16_weights_dir(tiny_export) / f"{UNET}_shallow" / IR_FILE)


def test_the_weights_are_stored_in_half_the_bytes(bf16_repositories, tiny_export: Path) -> None:
    record = json.loads((fp16_weights_dir(tiny_export) / RECORD_FILE).read_text())
    for name, entry in record["components"].items():
        onnx_bytes = sum(
            (tiny_export / path).stat().st_size
            for path in load_manifest(tiny_export)["components"][name]["files"]
        )
        weights = (fp16_weights_dir(tiny_export) / name / IR_WEIGHTS_FILE).stat().st_size
        assert 0.45 * onnx_bytes < weights < 0.55 * onnx_bytes, name
        assert entry["bytes"] >= weights


def test_a_current_conversion_is_kept_and_a_changed_export_converts_again(
    bf16_repositories, tiny_export: Path, tmp_path: Path
) -> None:
    weights = fp16_weights_dir(tiny_export) / UNET / IR_WEIGHTS_FILE
    written = weights.stat().st_mtime_ns
    options = RepositoryOptions(flavour="python-openvino", precision="bf16")
    build_repository(tiny_export, tmp_path / "again", options)
    assert weights.stat().st_mtime_ns == written

    # The same export with one UNet file's digest changed (as a new export would have).
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    manifest = json.loads((export / MANIFEST).read_text())
    next(iter(manifest["components"][UNET]["files"].values()))["sha256"] = "0" * 64
    (export / MANIFEST).write_text(json.dumps(manifest))
    assert not fp16_weights_are_current(export)
    build_repository(export, tmp_path / "changed", options)
    assert fp16_weights_are_current(export)
    record = json.loads((fp16_weights_dir(export) / RECORD_FILE).read_text())
    assert record["components"][UNET]["source"][f"{UNET}/{MODEL_FILE}"] == "0" * 64


def test_fp16_stored_weights_compute_in_bf16_what_fp32_ones_do(
    bf16_repositories, tiny_export: Path
) -> None:
    """The IR's weights go through fp16 on their way to bf16: the result stays about as
    far from fp32's as bf16 computed from the fp32 weights is (measured on the tiny UNet:
    0.021 against 0.024, the two bf16 outputs 0.018 apart)."""
    inputs = unet_inputs()
    onnx = tiny_export / UNET / MODEL_FILE
    fp32 = OpenVinoComponent(onnx, "fp32", threads=1).run(inputs)["noise_pred"]
    from_fp32 = OpenVinoComponent(onnx, "bf16", threads=1).run(inputs)["noise_pred"]
    ir = OpenVinoComponent(fp16_weights_dir(tiny_export) / UNET / IR_FILE, "bf16", threads=1)
    assert ir.inference_precision == "bf16"
    from_fp16 = ir.run(inputs)["noise_pred"]
    bf16_rounding = np.abs(from_fp32 - fp32).max()
    assert bf16_rounding > 0
    assert np.abs(from_fp16 - fp32).max() <= 1.5 * bf16_rounding
    assert np.abs(from_fp16 - from_fp32).max() <= 1.5 * bf16_rounding


def _outdated(export: Path) -> None:
    """As if converted by another OpenVINO."""
    record_file = export / FP16_WEIGHTS_DIR / RECORD_FILE
    record_file.write_text(json.dumps(json.loads(record_file.read_text()) | {"openvino": "0"}))


@pytest.mark.parametrize("beside", ["none", "outdated"])
def test_a_read_only_export_is_converted_into_the_cache(
    bf16_repositories, tiny_export: Path, read_only_copy, tmp_path: Path, monkeypatch, beside: str
) -> None:
    if beside == "none":
        export = read_only_copy(tiny_export, leave_out=(FP16_WEIGHTS_DIR,))
    else:
        export = read_only_copy(tiny_export, change=_outdated)
    assert not os.access(export, os.W_OK)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert not fp16_weights_are_current(export)
    converted = fp16_weights_dir(export)
    assert converted.parent == tmp_path / "cache" / "pix2pix" / FP16_WEIGHTS_DIR
    options = RepositoryOptions(flavour="python-openvino", precision="bf16", intra_op_threads=1)
    build_repository(export, tmp_path / "repository", options)
    assert fp16_weights_dir(export) == converted and fp16_weights_are_current(export)
    served = tmp_path / "repository" / UNET / "1" / IR_FILE
    assert served.read_bytes() == (converted / UNET / IR_FILE).read_bytes()
    written = (converted / UNET / IR_WEIGHTS_FILE).stat().st_mtime_ns
    build_repository(export, tmp_path / "again", options)
    assert (converted / UNET / IR_WEIGHTS_FILE).stat().st_mtime_ns == written


def test_a_read_only_export_with_a_current_conversion_is_served_from_it(
    bf16_repositories, tiny_export: Path, read_only_copy, tmp_path: Path, monkeypatch
) -> None:
    export = read_only_copy(tiny_export)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert fp16_weights_dir(export) == export / FP16_WEIGHTS_DIR
    build_repository(export, tmp_path / "repository", RepositoryOptions(precision="bf16"))
    assert not (tmp_path / "cache").exists()


def test_nowhere_to_write_the_conversion_is_one_line(
    tiny_export: Path, read_only_copy, tmp_path: Path, monkeypatch
) -> None:
    export = read_only_copy(tiny_export, leave_out=(FP16_WEIGHTS_DIR,))
    monkeypatch.setenv("XDG_CACHE_HOME", str(export / "cache"))
    with pytest.raises(ValueError) as refused:
        build_repository(export, tmp_path / "repository", RepositoryOptions(precision="bf16"))
    message = str(refused.value)
    assert "\n" not in message
    assert f"cannot write its fp16-stored weights to {export / 'cache'}" in message
    assert "Read-only file system" in message or "Permission denied" in message
    assert "point XDG_CACHE_HOME at a writable folder" in message


@pytest.fixture(scope="module")
def bf16_client(bf16_repositories: dict[str, Path], start_server):
    """A real tritonserver of the python-openvino bf16 repository."""
    client = grpcclient.InferenceServerClient(
        start_server(bf16_repositories["python-openvino"]).grpc_url
    )
    yield client
    client.close()


def test_a_served_bf16_edit_with_fp16_stored_weights(
    bf16_client, reference_pipelines, summary
) -> None:
    case = next(c for c in CASES if c.name == "pix2pix-euler_a-guided")
    encoded = png_bytes(photo(*case.size))
    request = {"image": encoded, "prompt": PROMPT, "num_inference_steps": case.steps, "seed": SEED}
    result = edit(bf16_client, case.model, **request, **case.arguments)
    served = result.pixels
    expected = reference_image(reference_pipelines[case.model], case, decode_image(encoded))
    difference = np.abs(served.astype(np.int16) - expected.astype(np.int16))
    quality = psnr(served, expected)
    summary(
        "served bf16 from fp16-stored weights (python-openvino) vs diffusers fp32, tiny",
        f"{case.name:<26} max {difference.max()}  PSNR {quality:5.1f} dB",
    )
    assert difference.max() <= BF16_MAX_ABS_DIFFERENCE
    assert quality >= BF16_MIN_PSNR_DB
    # Reused UNet work runs the shallow pass from its own IR.
    reused = edit(bf16_client, case.model, **request, **case.arguments, cache_interval=2)
    assert reused.pixels.shape == served.shape
    assert reused.png != result.png
    assert psnr(reused.pixels, served) >= 20.0


def _resident_bytes(path: Path) -> int:
    """Bytes of `path` resident in this process's mappings of it (/proc/self/smaps)."""
    target, resident, inside = str(path.resolve()), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(maxsplit=1)[0]:  # a mapping's header line
            inside = line.endswith(target)
        elif inside and line.startswith("Rss:"):
            resident += int(line.split()[1]) * 1024
    return resident


def test_mapped_pages_are_given_back_and_read_again(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 255, 4 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        assert mapped[:] == data  # every page touched
        assert _resident_bytes(path) >= len(data)
        assert release_mapped_pages(path) >= len(data)
        assert _resident_bytes(path) == 0
        assert mapped[:] == data


def test_a_writable_mapping_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "scratch.bin"
    path.write_bytes(bytes(1 << 20))
    with path.open("r+b") as file, mmap.mmap(file.fileno(), 0) as mapped:
        mapped[:4] = b"kept"
        assert mapped_ranges(path) == []
        assert release_mapped_pages(path) == 0
        assert mapped[:4] == b"kept"


def test_free_heap_pages_are_given_back() -> None:
    """Freed blocks between kept ones stay in the process until the heap is trimmed."""
    blocks = [bytearray(4096) for _ in range(20_000)]  # 80 MB of small allocations
    kept = blocks[::64]
    del blocks
    before = anonymous_resident_bytes()
    assert release_free_heap()
    assert before - anonymous_resident_bytes() > 40 << 20
    assert all(len(block) == 4096 for block in kept)


@pytest.mark.parametrize("cancelled", [False, True], ids=["finished", "cancelled"])
def test_an_edit_gives_back_the_heap_pages_it_freed(tiny_export: Path, cancelled: bool) -> None:
    """The served pipeline code trims the heap when an edit ends, however it ends: the
    blocks a component call freed between kept ones leave the process."""
    options = RepositoryOptions(flavour="python-openvino", intra_op_threads=1)
    pipeline = BareLoop(tiny_export, BenchConfig(preset="tiny", options=options)).pipeline
    kept, freed_resident = [], []
    encode_prompts = pipeline.components.encode_prompts

    def encode_prompts_freeing_blocks(input_ids: np.ndarray) -> torch.Tensor:
        blocks = [bytearray(4096) for _ in range(20_000)]  # 80 MB of small allocations
        kept.extend(blocks[::64])
        del blocks
        freed_resident.append(anonymous_resident_bytes())
        return encode_prompts(input_ids)

    class Cancelled(Exception):
        """What the edit model raises at a step once the caller has left."""

    def cancel(step: int, steps: int, latents: torch.Tensor) -> None:
        if cancelled:
            raise Cancelled

    pipeline.components.encode_prompts = encode_prompts_freeing_blocks
    prepared = pipeline.prepare({"image": png_bytes(photo(64, 64)), "prompt": PROMPT})
    try:
        pipeline.run(prepared, on_step=cancel)
    except Cancelled:
        assert cancelled
    assert freed_resident[0] - anonymous_resident_bytes() > 40 << 20


def test_a_component_from_ir_keeps_none_of_its_weights_file(tiny_export: Path) -> None:
    """After a call has packed the weights, the mapped file's pages are given back and the
    next calls compute the same."""
    ensure_fp16_weights(tiny_export)
    ir = fp16_weights_dir(tiny_export) / UNET / IR_FILE
    component = OpenVinoComponent(ir, "bf16", threads=1)
    first = component.run(unet_inputs())["noise_pred"]
    weights = ir.with_name(IR_WEIGHTS_FILE)
    assert mapped_ranges(weights)
    assert _resident_bytes(weights) == 0
    assert np.array_equal(component.run(unet_inputs())["noise_pred"], first)
    component.run(unet_inputs(batch=2))
    assert _resident_bytes(weights) == 0
