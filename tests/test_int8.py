"""The int8 precision: UNets quantized by NNCF (export/int8.py), served by the openvino
flavours.

Real NNCF and OpenVINO on the tiny preset, calibrated on a few short edits (the settings
are what the build records; the default calibration's 120 UNet calls take a minute at
tiny size): the build is reproducible byte for byte, skipped when current, refused where
it cannot serve, and an edit through a real tritonserver of the python-openvino flavour
computes with the quantized UNets. The fidelity gate is tests/test_int8_fidelity.py (slow).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from benchmarks.fidelity import psnr
from edit_pipeline.preprocess import decode_image
from edit_pipeline.unet_passes import SHALLOW_DIR
from export import int8
from export.components import shallow_unet
from export.int8 import (
    CALIBRATION_FILE,
    CALIBRATION_PROMPTS,
    QUANTIZED_COMPONENTS,
    Calibration,
    build_int8,
    ensure_int8,
    int8_dir,
    int8_is_current,
)
from export.int8 import main as int8_main
from export.onnx_export import MANIFEST, MODEL_FILE
from export.openvino_ir import IR_FILE, IR_WEIGHTS_FILE, fp16_weights_dir
from model_repository.builder import build_repository
from model_repository.configs import FLAVOURS, OPENVINO_FLAVOURS, RepositoryOptions
from tests.serving import edit, photo, png_bytes
from tests.test_parity import CASES, PROMPT, SEED, reference_image
from tests.test_toy import CHECKS
from training.toy.photos import HELD_OUT_PHOTOS, TRAINING_PHOTOS

# A few short edits at the tiny preset's smallest useful size: what the tests can afford.
TEST_CALIBRATION = Calibration(subset_size=8, steps=4, image_side=64)
# Served int8 against diffusers' fp32 on the tiny preset's random weights (6 steps, 64x64):
# far from bit-equal, still the same image (measured: see the summary).
MIN_SERVED_PSNR_DB = 20.0


@pytest.fixture(scope="module")
def tiny_int8(tiny_export: Path) -> dict:
    """The tiny export with its UNets quantized (TEST_CALIBRATION); the calibration record."""
    return build_int8(tiny_export, TEST_CALIBRATION)


def test_calibration_is_the_projects_own_and_recorded(tiny_int8: dict, tiny_export: Path) -> None:
    # The toy's learned instructions calibrate it; the photos its fidelity gate measures
    # on do not.
    assert set(CHECKS) <= set(CALIBRATION_PROMPTS)
    assert set(Calibration().photos) <= set(TRAINING_PHOTOS)
    assert not set(Calibration().photos) & set(HELD_OUT_PHOTOS)
    record = json.loads((int8_dir(tiny_export) / CALIBRATION_FILE).read_text())
    assert record == tiny_int8
    settings = record["calibration"]
    assert settings["subset_size"] == 8 and settings["steps"] == 4 and settings["seed"] == 0
    assert settings["smooth_quant_matmul"] == 0.95 and settings["model_type"] == "transformer"
    assert settings["photos"] and settings["prompts"]
    assert record["sizing"] == {"subset_size": 8, "steps": 4, "image_side": 64}
    assert set(record["versions"]) >= {"nncf", "openvino"}
    manifest = json.loads((tiny_export / MANIFEST).read_text())
    for name in QUANTIZED_COMPONENTS:
        entry = record["components"][name]
        assert entry["samples"] == 8
        source = f"{name}/{MODEL_FILE}"
        assert entry["source"][source] == manifest["components"][name]["files"][source]["sha256"]


def test_the_unets_compute_in_int8(tiny_int8: dict, tiny_export: Path) -> None:
    import openvino as ov

    for name in QUANTIZED_COMPONENTS:
        model = ov.Core().read_model(str(int8_dir(tiny_export) / name / IR_FILE))
        types = {op.get_type_name() for op in model.get_ops()}
        weights = [
            op
            for op in model.get_ops()
            if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8
        ]
        assert "FakeQuantize" in types, name
        assert len(weights) > 10, f"{name}: {len(weights)} int8 weight tensors"


def test_a_current_build_is_kept_and_a_changed_setting_rebuilds(
    tiny_int8: dict, tiny_export: Path
) -> None:
    assert int8_is_current(tiny_export, TEST_CALIBRATION)
    assert not int8_is_current(tiny_export, replace(TEST_CALIBRATION, subset_size=9))
    assert not int8_is_current(tiny_export, replace(TEST_CALIBRATION, smooth_quant_matmul=0.5))
    # What the chain asks for: the project's settings, sized as the build was (its
    # subset size, steps and side are the builder's choice of time against coverage).
    assert int8_is_current(tiny_export)
    assert not int8_is_current(tiny_export, Calibration())
    weights = int8_dir(tiny_export) / QUANTIZED_COMPONENTS[0] / IR_WEIGHTS_FILE
    written = weights.stat().st_mtime_ns
    kept = ensure_int8(tiny_export, TEST_CALIBRATION)
    assert kept == json.loads((int8_dir(tiny_export) / CALIBRATION_FILE).read_text())
    assert weights.stat().st_mtime_ns == written


def test_a_stale_build_is_rebuilt_as_it_was_sized(
    tiny_int8: dict, tiny_export: Path, tmp_path: Path
) -> None:
    """A build by another NNCF (its record says so) is rebuilt by what serving asks for,
    with the subset size, steps and side the builder chose, not the defaults' hour."""
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export, symlinks=True)
    record_file = int8_dir(export) / CALIBRATION_FILE
    record = json.loads(record_file.read_text())
    record["versions"]["nncf"] = "0.0"
    record_file.write_text(json.dumps(record))
    assert not int8_is_current(export)

    rebuilt = ensure_int8(export)
    assert rebuilt["versions"] == tiny_int8["versions"]
    assert rebuilt["calibration"] == tiny_int8["calibration"]
    assert int8_is_current(export, TEST_CALIBRATION)


@pytest.mark.parametrize("cut_short", ["killed", "damaged record"])
def test_a_build_cut_short_is_not_served_and_is_built_again_as_sized(
    tiny_int8: dict, tiny_export: Path, tmp_path: Path, monkeypatch, cut_short: str
) -> None:
    """Killed while capturing (its record names no UNet yet), or its record half-written:
    not current; serving builds it again, sized as the build that was cut short where its
    record says so."""
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export, symlinks=True)
    record_file = int8_dir(export) / CALIBRATION_FILE
    if cut_short == "killed":

        def killed(*_: object) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(int8, "capture_unet_inputs", killed)
        with pytest.raises(KeyboardInterrupt):
            build_int8(export, TEST_CALIBRATION)
        assert json.loads(record_file.read_text())["components"] == {}
    else:
        record_file.write_text(record_file.read_text()[:40])
    assert not int8_is_current(export)
    assert not int8_is_current(export, TEST_CALIBRATION)

    built: list[Calibration] = []
    monkeypatch.setattr(int8, "build_int8", lambda _, calibration: built.append(calibration))
    ensure_int8(export)
    expected = TEST_CALIBRATION if cut_short == "killed" else Calibration()
    sizing = [{name: getattr(c, name) for name in int8.SIZING} for c in (built[0], expected)]
    assert sizing[0] == sizing[1]


def test_a_rebuild_for_another_checkpoint_derives_its_side_anew(
    tiny_export: Path, tmp_path: Path, monkeypatch
) -> None:
    """A build asked for the checkpoint's own side (image_side 0) records it made concrete
    (512 for an SD 1.5 checkpoint). Rebuilt after another checkpoint is exported into the
    same folder, it calibrates at that checkpoint's side, not the one before's; a side the
    builder chose is kept."""
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export, symlinks=True)
    record_file = int8_dir(export) / CALIBRATION_FILE
    record = json.loads(record_file.read_text())
    sizing = {"subset_size": 8, "steps": 4}
    built: list[Calibration] = []
    monkeypatch.setattr(int8, "build_int8", lambda _, calibration: built.append(calibration))
    for asked_side in (0, 96):
        made = {**record["calibration"], **sizing, "image_side": 512}
        stale = {**record, "calibration": made, "sizing": {**sizing, "image_side": asked_side}}
        record_file.write_text(json.dumps(stale))
        assert not int8_is_current(export)
        ensure_int8(export)
        assert (built[-1].subset_size, built[-1].steps) == (8, 4)
        assert built[-1].image_side == asked_side
    dims = json.loads((export / MANIFEST).read_text())["dimensions"]
    own_side = dims["unet_sample_size"] * dims["vae_scale_factor"]
    assert own_side != 512
    assert built[0].for_export(json.loads((export / MANIFEST).read_text())).image_side == own_side


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--subset-size", "0"], "subset_size=0: allowed >= 1"),
        (
            # img2img calibrates at strength 0.8: one step of 1 rounds down to none.
            ["--steps", "1", "--image-side", "100"],
            "steps=1: allowed >= 2; image_side=100: allowed 0 (the trained side) "
            "or a multiple of 8 up to 1024",
        ),
    ],
)
def test_the_command_names_a_bad_setting(
    arguments: list[str], message: str, tmp_path: Path, capsys
) -> None:
    assert int8_main([str(tmp_path), *arguments]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("flavour", [f for f in FLAVOURS if f not in OPENVINO_FLAVOURS])
def test_int8_outside_the_openvino_flavours_is_refused(flavour: str) -> None:
    with pytest.raises(ValueError) as refused:
        RepositoryOptions(flavour=flavour, precision="int8").check()
    message = str(refused.value)
    assert message == (
        f"precision=int8 with flavour={flavour}: only the openvino flavours "
        "(python-openvino, openvino) compute in int8"
    )


def test_an_export_without_int8_is_refused(tiny_export: Path, tmp_path: Path) -> None:
    """The same export's files, without its int8 folder."""
    export = tmp_path / "export"
    export.mkdir()
    for entry in tiny_export.iterdir():
        if entry.name != int8_dir(tiny_export).name:
            (export / entry.name).symlink_to(entry)
    options = RepositoryOptions(flavour="python-openvino", precision="int8")
    with pytest.raises(
        ValueError, match=r"no int8 UNets quantized from this export; .*export\.int8"
    ):
        build_repository(export, tmp_path / "repository", options)


def test_the_build_is_reproducible_into_the_cache_of_a_read_only_export(
    tiny_int8: dict, tiny_export: Path, read_only_copy, tmp_path: Path, monkeypatch
) -> None:
    """A read-only export (a mounted volume) keeps the int8 build beside it; a build asked
    for again goes to the cache, is read from there after, and equals the first byte for
    byte."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = {
        name: [(int8_dir(tiny_export) / name / f).read_bytes() for f in (IR_FILE, IR_WEIGHTS_FILE)]
        for name in QUANTIZED_COMPONENTS
    }
    with_int8 = read_only_copy(tiny_export)
    assert int8_dir(with_int8) == with_int8 / int8_dir(tiny_export).name
    assert int8_is_current(with_int8, TEST_CALIBRATION)

    again = build_int8(with_int8, TEST_CALIBRATION)
    assert int8_dir(with_int8).is_relative_to(tmp_path / "cache" / "pix2pix")
    assert int8_is_current(with_int8, TEST_CALIBRATION)
    for name in QUANTIZED_COMPONENTS:
        assert again["components"][name]["files"] == tiny_int8["components"][name]["files"]
        for file, before in zip((IR_FILE, IR_WEIGHTS_FILE), first[name], strict=True):
            assert (int8_dir(with_int8) / name / file).read_bytes() == before, file
    options = RepositoryOptions(flavour="python-openvino", precision="int8")
    build_repository(with_int8, tmp_path / "repository", options)
    name = QUANTIZED_COMPONENTS[0]
    served = tmp_path / "repository" / name / "1" / IR_WEIGHTS_FILE
    assert served.read_bytes() == first[name][1]


def test_a_read_only_export_with_nowhere_to_write_its_int8_is_refused(
    tiny_export: Path, read_only_copy, monkeypatch
) -> None:
    """One line naming the folder and the way out."""
    without = read_only_copy(tiny_export, leave_out=(int8_dir(tiny_export).name,))
    monkeypatch.setenv("XDG_CACHE_HOME", str(without / "cache"))
    with pytest.raises(ValueError, match=r"cannot write its int8 UNets to .*XDG_CACHE_HOME"):
        ensure_int8(without, TEST_CALIBRATION)


def test_an_int8_build_of_another_export_is_refused(
    tiny_int8: dict, tiny_export: Path, tmp_path: Path
) -> None:
    """The int8 folder copied beside an export whose UNet files differ."""
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export, symlinks=True)
    manifest = json.loads((export / MANIFEST).read_text())
    files = manifest["components"][QUANTIZED_COMPONENTS[0]]["files"]
    next(iter(files.values()))["sha256"] = "0" * 64
    (export / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="no int8 UNets quantized from this export"):
        build_repository(
            export, tmp_path / "repository", RepositoryOptions(flavour="openvino", precision="int8")
        )


def _config(repository: Path, model: str) -> mc.ModelConfig:
    return text_format.Parse((repository / model / "config.pbtxt").read_text(), mc.ModelConfig())


def test_both_openvino_flavours_read_the_int8_unets(
    tiny_int8: dict, tiny_export: Path, tmp_path: Path
) -> None:
    for flavour in OPENVINO_FLAVOURS:
        repository = tmp_path / flavour
        build_repository(
            tiny_export, repository, RepositoryOptions(flavour=flavour, precision="int8")
        )
        for name in ("text_encoder", "vae_decoder", *QUANTIZED_COMPONENTS):
            config = _config(repository, name)
            if flavour == "openvino":
                assert config.default_model_filename == IR_FILE
            else:
                assert config.parameters["model_file"].string_value == IR_FILE
                assert config.parameters["precision"].string_value == "int8"
            # The UNets quantized; the rest, as at bf16, with its weights stored in fp16.
            source = int8_dir if name in QUANTIZED_COMPONENTS else fp16_weights_dir
            served = repository / name / "1" / IR_WEIGHTS_FILE
            assert served.samefile(source(tiny_export) / name / IR_WEIGHTS_FILE), name
        if flavour == "python-openvino":
            unet = QUANTIZED_COMPONENTS[0]
            shallow = repository / unet / "1" / SHALLOW_DIR / IR_WEIGHTS_FILE
            assert shallow.samefile(
                fp16_weights_dir(tiny_export) / shallow_unet(unet) / IR_WEIGHTS_FILE
            )


@pytest.fixture(scope="module")
def int8_client(tiny_int8: dict, tiny_repository_with, start_server):
    """A real tritonserver of the tiny preset in python-openvino int8, unary edits only."""
    repository = tiny_repository_with(
        flavour="python-openvino", precision="int8", streaming_models=False, edit_instances=1
    )
    client = grpcclient.InferenceServerClient(start_server(repository).grpc_url)
    yield client
    client.close()


SERVED_CASES = [c for c in CASES if c.name in ("pix2pix-euler_a-guided", "img2img-temperature-0.5")]


@pytest.mark.parametrize("case", SERVED_CASES, ids=lambda case: case.name)
def test_a_served_int8_edit(int8_client, reference_pipelines, summary, case) -> None:
    encoded = png_bytes(photo(*case.size))
    request = {"image": encoded, "prompt": PROMPT, "num_inference_steps": case.steps, "seed": SEED}
    served = edit(int8_client, case.model, **request, **case.arguments).pixels
    expected = reference_image(reference_pipelines[case.model], case, decode_image(encoded))
    quality = psnr(served, expected)
    summary(
        "served int8 (python-openvino) vs diffusers fp32, tiny preset",
        f"{case.name:<26} PSNR {quality:5.1f} dB  max |difference| "
        f"{np.abs(served.astype(np.int16) - expected.astype(np.int16)).max()}",
    )
    assert served.shape == expected.shape
    # Quantized: not the fp32 image (which equals diffusers' within 2 grey levels) ...
    assert np.abs(served.astype(np.int16) - expected.astype(np.int16)).max() > 2
    # ... but close to it.
    assert quality >= MIN_SERVED_PSNR_DB
    assert np.array_equal(edit(int8_client, case.model, **request, **case.arguments).pixels, served)


def test_int8_with_reused_unet_work_is_served(int8_client, summary) -> None:
    """The fast setting: the int8 UNet's full passes, its ONNX shallow pass between
    (python-openvino hosts both in the UNet's model)."""
    request = {"image": png_bytes(photo(96, 64)), "prompt": PROMPT, "seed": SEED}
    every_step = edit(int8_client, "instruct_pix2pix", **request, num_inference_steps=9)
    reused = edit(
        int8_client, "instruct_pix2pix", **request, num_inference_steps=9, cache_interval=3
    )
    quality = psnr(reused.pixels, every_step.pixels)
    summary(
        "served int8 (python-openvino) with reused UNet work, tiny preset",
        f"cache_interval 3 against 1: PSNR {quality:5.1f} dB",
    )
    assert reused.png != every_step.png
    assert quality >= MIN_SERVED_PSNR_DB
