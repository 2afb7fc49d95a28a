"""The trained toy InstructPix2Pix (models/toy) follows its instructions, measured.

Every check edits a photo the model never saw in training (scikit-image's astronaut and
coffee: `training.toy.photos.HELD_OUT_PHOTOS`) and compares an effect size with a
threshold. The fast part runs diffusers' StableDiffusionInstructPix2PixPipeline on the
folder; the served part exports the folder to ONNX (validated against PyTorch), builds a
python-onnxruntime repository and edits through a real tritonserver. Thresholds sit well
inside the measured effects (printed in the summary) and well outside what an untrained
or unconditioned edit does; the README of the model folder lists the measured values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from edit_pipeline.preprocess import decode_image
from export.checkpoint import PIX2PIX, discover_pipelines, inspect_folder, load_pipeline
from tests.conftest import TEST_OPTIONS
from tests.serving import edit, png_bytes
from training.toy.evaluate import (
    channel_dominance,
    edit_with_pipeline,
    grey_ssim,
    mean_luminance,
    saturation,
    score_edit,
    sharpness,
)
from training.toy.photos import HELD_OUT_PHOTOS, load_photo

TOY_ROOT = Path(__file__).resolve().parents[1] / "models" / "toy"
TOY_FOLDER = TOY_ROOT / "instruct-pix2pix"
STEPS = 10
# The seed of the training's own measurement (training.toy.__main__.MEASURE_SEED).
SEED = 0
GUIDANCE_SCALE = 7.5
IMAGE_GUIDANCE_SCALE = 1.5
# Weights (float16) and tokenizer of the committed folder stay small.
MAX_FOLDER_MB = 16
# uint8 outputs may differ by rounding of onnxruntime-vs-PyTorch float differences.
MAX_ABS_DIFFERENCE = 2


def held_out_photo(name: str, width: int = 128, height: int = 128) -> Image.Image:
    return Image.fromarray(load_photo(name)).resize((width, height), Image.Resampling.LANCZOS)


PHOTOS = {
    "astronaut": held_out_photo("astronaut"),
    # Not square, and a different kind of scene (a cup of coffee on a table).
    "coffee": held_out_photo("coffee", 192, 128),
}
assert set(PHOTOS) <= set(HELD_OUT_PHOTOS)


@dataclass(frozen=True)
class Check:
    """One instruction and how to tell from (input, output) that it was followed."""

    prompt: str
    effect: str  # what the number means, for the summary
    measure: Callable[[np.ndarray, np.ndarray], float]
    threshold: float  # the effect must be larger


def _saturation_drop(source: np.ndarray, edited: np.ndarray) -> float:
    return saturation(source) - saturation(edited)


def _channel_gain(channel: int) -> Callable[[np.ndarray, np.ndarray], float]:
    def gain(source: np.ndarray, edited: np.ndarray) -> float:
        return channel_dominance(edited, channel) - channel_dominance(source, channel)

    return gain


def _luminance_gain(source: np.ndarray, edited: np.ndarray) -> float:
    return mean_luminance(edited) - mean_luminance(source)


def _closed(prompt: str) -> Callable[[np.ndarray, np.ndarray], float]:
    def closed(source: np.ndarray, edited: np.ndarray) -> float:
        return score_edit(source, edited, prompt).closed_fraction

    return closed


def _sharpness_loss(source: np.ndarray, edited: np.ndarray) -> float:
    return 1.0 - sharpness(edited) / sharpness(source)


# The instructions the model learned (models/toy/instruct-pix2pix/README.md: "make it sepia"
# and "make it darker" were trained but not learned). Each threshold sits under the
# smallest effect on the held-out photos over seeds 0-3 but one (that README's table), far
# above what an unrelated instruction does.
CHECKS = {
    check.prompt: check
    for check in (
        Check("make it black and white", "saturation drop", _saturation_drop, 0.1),
        Check(
            "invert the colors",
            "closed fraction to the negative",
            _closed("invert the colors"),
            0.5,
        ),
        Check("make it brighter", "mean luma gain", _luminance_gain, 0.15),
        Check("make it red", "red dominance gain", _channel_gain(0), 0.1),
        Check("make it green", "green dominance gain", _channel_gain(1), 0.2),
        Check("make it blue", "blue dominance gain", _channel_gain(2), 0.3),
        Check("blur it", "sharpness lost", _sharpness_loss, 0.3),
    )
}
# Black and white must keep the photo's structure: SSIM of the luma of input and output.
MIN_GREY_SSIM = 0.5
# Text guidance off (guidance_scale 1) leaves at most this share of the guided effect.
MAX_UNGUIDED_SHARE = 0.6


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The reference pipeline on one thread: threads of a toy-sized model on shared cores
    mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_pipeline() -> Any:
    return load_pipeline(inspect_folder(TOY_FOLDER))


def reference_edit(
    pipeline: Any, photo: Image.Image, prompt: str, steps: int = STEPS, **overrides: float
) -> np.ndarray:
    settings = {"guidance_scale": GUIDANCE_SCALE, "image_guidance_scale": IMAGE_GUIDANCE_SCALE}
    settings.update(overrides)
    return edit_with_pipeline(pipeline, photo, prompt, steps, SEED, **settings)


@contextmanager
def toy_server_client(
    tmp_path_factory: pytest.TempPathFactory, flavour: str, precision: str
) -> Iterator[Any]:
    """A gRPC client of a real tritonserver serving the toy model's instruct_pix2pix
    (built by the chain) in this flavour and precision, unary edits only."""
    import tritonclient.grpc as grpcclient

    from model_repository.chain import Source, prepare_in_child
    from model_repository.configs import RepositoryOptions
    from serving.tritonserver import TritonServer

    options = RepositoryOptions(
        **{
            **TEST_OPTIONS,
            "flavour": flavour,
            "precision": precision,
            "pipelines": ("instruct_pix2pix",),
            "streaming_models": False,
            "edit_instances": 1,
        }
    )
    built = prepare_in_child(Source(model=TOY_FOLDER), options, tmp_path_factory.mktemp("build"))
    log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    with TritonServer(built.repository, log_file=log) as server:
        server.wait_ready(timeout_s=300)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            yield client
        finally:
            client.close()


def served_and_reference_effects(
    client: Any, toy_pipeline: Any, prompt: str, steps: int = STEPS, **inputs: Any
) -> list[tuple[str, str, float, float]]:
    """For each held-out photo: (name, what is measured, the effect of diffusers' fp32
    edit, the effect of the served edit with these extra inputs), both in `steps` steps."""
    check = CHECKS[prompt]
    rows = []
    for name, photo in PHOTOS.items():
        encoded = png_bytes(photo)
        served = edit(
            client,
            "instruct_pix2pix",
            image=encoded,
            prompt=prompt,
            num_inference_steps=steps,
            seed=SEED,
            guidance_scale=GUIDANCE_SCALE,
            image_guidance_scale=IMAGE_GUIDANCE_SCALE,
            **inputs,
        ).pixels
        source = np.asarray(photo)
        reference = reference_edit(toy_pipeline, decode_image(encoded), prompt, steps)
        rows.append(
            (name, check.effect, check.measure(source, reference), check.measure(source, served))
        )
    return rows


def test_folder_loads_like_any_checkpoint(toy_pipeline: Any) -> None:
    folder = inspect_folder(TOY_FOLDER)
    assert folder.pipeline == PIX2PIX
    assert discover_pipelines([TOY_ROOT]) == {PIX2PIX: folder}
    assert toy_pipeline.vae_scale_factor == 4
    assert (TOY_FOLDER / "README.md").is_file()
    megabytes = sum(path.stat().st_size for path in TOY_FOLDER.rglob("*") if path.is_file()) / 2**20
    assert megabytes < MAX_FOLDER_MB


@pytest.mark.parametrize("prompt", list(CHECKS))
def test_reference_pipeline_follows_the_instruction(
    toy_pipeline: Any, summary: Callable[[str, str], None], prompt: str
) -> None:
    check = CHECKS[prompt]
    photo = PHOTOS["astronaut"]
    value = check.measure(np.asarray(photo), reference_edit(toy_pipeline, photo, prompt))
    summary(
        "toy model, diffusers on the held-out astronaut (effect > threshold)",
        f"{prompt:<24} {check.effect:<36} {value:+.3f} > {check.threshold}",
    )
    assert value > check.threshold, f"{prompt}: {check.effect} {value:.3f}"


# --------------------------------------------------------------------------- served


@pytest.fixture(scope="module")
def toy_export(
    tmp_path_factory: pytest.TempPathFactory, summary: Callable[[str, str], None]
) -> Path:
    """The toy folder exported to ONNX; the export validates it against PyTorch."""
    from export.onnx_export import export_checkpoint, format_table

    output = tmp_path_factory.mktemp("onnx") / "toy"
    manifest, rows = export_checkpoint([TOY_FOLDER], output)
    summary("ONNX export validated against PyTorch (toy model)", format_table(rows))
    assert manifest["validation"]["passed"], rows
    return output


@pytest.fixture(scope="module")
def toy_client(toy_export: Path, tmp_path_factory: pytest.TempPathFactory):
    """A gRPC client of a real tritonserver serving the toy model."""
    import tritonclient.grpc as grpcclient

    from model_repository.builder import RepositoryOptions, build_repository
    from serving.tritonserver import TritonServer

    repository = tmp_path_factory.mktemp("repository") / "toy"
    build_repository(toy_export, repository, RepositoryOptions(**TEST_OPTIONS))
    server = TritonServer(repository, log_file=tmp_path_factory.mktemp("logs") / "toy.log")
    server.start()
    try:
        server.wait_ready(timeout_s=300)
        client = grpcclient.InferenceServerClient(server.grpc_url)
        yield client
        client.close()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served_edit(toy_client: Any) -> Callable[..., np.ndarray]:
    """`served_edit(photo_name, prompt, guidance_scale=...)`: the served pixels, cached."""
    results: dict[tuple[str, str, float], np.ndarray] = {}

    def served(name: str, prompt: str, guidance_scale: float = GUIDANCE_SCALE) -> np.ndarray:
        key = (name, prompt, guidance_scale)
        if key not in results:
            results[key] = edit(
                toy_client,
                "instruct_pix2pix",
                image=png_bytes(PHOTOS[name]),
                prompt=prompt,
                num_inference_steps=STEPS,
                seed=SEED,
                guidance_scale=guidance_scale,
                image_guidance_scale=IMAGE_GUIDANCE_SCALE,
            ).pixels
        return results[key]

    return served


SERVED_CHECKS = ("make it black and white", "make it red", "make it brighter", "invert the colors")


@pytest.mark.parametrize("prompt", SERVED_CHECKS)
def test_served_edit_follows_the_instruction(
    served_edit: Callable[..., np.ndarray], summary: Callable[[str, str], None], prompt: str
) -> None:
    check = CHECKS[prompt]
    for name, photo in PHOTOS.items():
        source = np.asarray(photo)
        edited = served_edit(name, prompt)
        value = check.measure(source, edited)
        summary(
            "toy model served by tritonserver, held-out photos (effect > threshold)",
            f"{prompt:<24} {name:<9} {check.effect:<36} {value:+.3f} > {check.threshold}",
        )
        assert value > check.threshold, f"{prompt} on {name}: {check.effect} {value:.3f}"
        if prompt == "make it black and white":
            similarity = grey_ssim(source, edited)
            summary(
                "toy model served by tritonserver, held-out photos (effect > threshold)",
                f"{prompt:<24} {name:<9} {'SSIM of the grey images':<36} "
                f"{similarity:+.3f} > {MIN_GREY_SSIM}",
            )
            assert similarity > MIN_GREY_SSIM


# The tints: at guidance_scale 1 the prediction is still conditioned on the text, and the
# model inverts or greys a photo nearly as much there; only the tints need the guidance.
@pytest.mark.parametrize("prompt", ["make it red", "make it blue"])
def test_text_guidance_off_weakens_the_edit(
    served_edit: Callable[..., np.ndarray], summary: Callable[[str, str], None], prompt: str
) -> None:
    check = CHECKS[prompt]
    source = np.asarray(PHOTOS["astronaut"])
    guided = check.measure(source, served_edit("astronaut", prompt))
    unguided = check.measure(source, served_edit("astronaut", prompt, guidance_scale=1.0))
    summary(
        "toy model served: text guidance off (guidance_scale 1) against 7.5",
        f"{prompt:<24} {check.effect} {unguided:+.3f} at 1 against {guided:+.3f} at 7.5 "
        f"(share {unguided / guided:.2f} <= {MAX_UNGUIDED_SHARE})",
    )
    assert guided > check.threshold
    assert unguided < MAX_UNGUIDED_SHARE * guided


def test_served_image_equals_diffusers(
    served_edit: Callable[..., np.ndarray], toy_pipeline: Any, summary: Callable[[str, str], None]
) -> None:
    photo = PHOTOS["coffee"]
    prompt = "make it red"
    served = served_edit("coffee", prompt)
    # The reference gets exactly what the server's preprocess made of the upload.
    expected = reference_edit(toy_pipeline, decode_image(png_bytes(photo)), prompt)
    assert served.shape == expected.shape == (photo.height, photo.width, 3)
    difference = np.abs(served.astype(np.int16) - expected.astype(np.int16))
    summary(
        "toy model: served vs diffusers, uint8 |difference|",
        f"{prompt!r} coffee {photo.width}x{photo.height}, {STEPS} steps: "
        f"max {difference.max()}  mean {difference.mean():.4f}",
    )
    assert difference.max() <= MAX_ABS_DIFFERENCE
