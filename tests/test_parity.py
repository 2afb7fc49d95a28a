"""Served images equal diffusers' reference pipelines on the same weights and seed.

A real tritonserver (python-onnxruntime flavour, tiny preset) answers gRPC requests; the
reference is diffusers' StableDiffusionInstructPix2PixPipeline / Img2ImgPipeline in
PyTorch with a CPU torch.Generator seeded alike, fed the same preprocessed image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler, PNDMScheduler

from export.checkpoint import inspect_folder, load_pipeline
from export.presets import IMG2IMG_FOLDER, PIX2PIX_FOLDER
from model_repository.preprocess import decode_image
from tests.serving import edit, photo, png_bytes

REFERENCE_SCHEDULERS = {
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "pndm": PNDMScheduler,
}
# uint8 outputs may differ by rounding of onnxruntime-vs-PyTorch float differences.
MAX_ABS_DIFFERENCE = 2


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    size: tuple[int, int] = (64, 64)
    steps: int = 6
    arguments: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("pix2pix-euler_a-guided", "instruct_pix2pix", arguments={"scheduler": "euler_a"}),
    Case(
        "pix2pix-euler_a-negative",
        "instruct_pix2pix",
        arguments={"scheduler": "euler_a", "negative_prompt": "blurry, low quality"},
    ),
    Case(
        "pix2pix-ddim-non-square",
        "instruct_pix2pix",
        size=(96, 64),
        arguments={"scheduler": "ddim", "guidance_scale": 5.0, "image_guidance_scale": 1.2},
    ),
    Case(
        "pix2pix-ddpm-negative",
        "instruct_pix2pix",
        arguments={"scheduler": "ddpm", "negative_prompt": "dark"},
    ),
    Case(
        "pix2pix-text-guidance-off",
        "instruct_pix2pix",
        arguments={"scheduler": "euler_a", "guidance_scale": 1.0},
    ),
    Case(
        "pix2pix-image-guidance-off",
        "instruct_pix2pix",
        size=(64, 96),
        arguments={"scheduler": "ddim", "image_guidance_scale": 0.5},
    ),
    Case("img2img-temperature-0.5", "img2img", arguments={"temperature": 0.5}),
    Case(
        "img2img-temperature-1.0-negative",
        "img2img",
        size=(96, 64),
        arguments={"temperature": 1.0, "negative_prompt": "dark", "scheduler": "ddim"},
    ),
    Case("img2img-guidance-off", "img2img", arguments={"temperature": 0.8, "guidance_scale": 1.0}),
]

PROMPT = "make it snowy"
SEED = 1234


@pytest.fixture(scope="module")
def reference_pipelines(tiny_preset: Path) -> dict[str, Any]:
    return {
        "instruct_pix2pix": load_pipeline(inspect_folder(tiny_preset / PIX2PIX_FOLDER)),
        "img2img": load_pipeline(inspect_folder(tiny_preset / IMG2IMG_FOLDER)),
    }


def reference_image(pipeline: Any, case: Case, image: Any) -> np.ndarray:
    arguments = dict(case.arguments)
    original_scheduler = pipeline.scheduler
    name = arguments.pop("scheduler", None)
    if name is not None:
        pipeline.scheduler = REFERENCE_SCHEDULERS[name].from_config(original_scheduler.config)
    if case.model == "img2img":
        arguments["strength"] = arguments.pop("temperature")
    try:
        result = pipeline(
            PROMPT,
            image=image,
            num_inference_steps=case.steps,
            generator=torch.Generator("cpu").manual_seed(SEED),
            **arguments,
        ).images[0]
    finally:
        pipeline.scheduler = original_scheduler
    return np.asarray(result)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_served_image_equals_diffusers(
    grpc_client, reference_pipelines, summary, case: Case
) -> None:
    encoded = png_bytes(photo(*case.size))
    served = edit(
        grpc_client,
        case.model,
        image=encoded,
        prompt=PROMPT,
        num_inference_steps=case.steps,
        seed=SEED,
        **case.arguments,
    )
    assert served.seed == SEED
    # The reference gets exactly what the server's preprocess made of the upload.
    expected = reference_image(reference_pipelines[case.model], case, decode_image(encoded))
    actual = served.pixels
    assert actual.shape == expected.shape == (case.size[1], case.size[0], 3)
    difference = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    summary(
        "served vs diffusers, uint8 |difference| (tiny preset)",
        f"{case.name:<34} max {difference.max()}  mean {difference.mean():.4f}",
    )
    assert difference.max() <= MAX_ABS_DIFFERENCE
    # Random weights still give an image that depends on the input, not a constant.
    assert actual.std() > 1.0
