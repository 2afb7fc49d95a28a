"""Served images equal diffusers' reference pipelines on the same weights and seed.

A real tritonserver (tiny preset; python-onnxruntime flavour, then python-openvino in fp32)
answers gRPC requests; the reference is diffusers' StableDiffusionInstructPix2PixPipeline /
Img2ImgPipeline in PyTorch with a CPU torch.Generator seeded alike, fed the same
preprocessed image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler, PNDMScheduler

from edit_pipeline.preprocess import decode_image
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


# The flavours whose served images are held to diffusers': onnxruntime and OpenVINO (fp32)
# components under the same edit models.
FLAVOURS = ("python-onnxruntime", "python-openvino")


@pytest.fixture(scope="module", params=FLAVOURS)
def served_client(request, tiny_repository_with, start_server):
    """A gRPC client of a tiny-preset server of the flavour: the session's python-onnxruntime
    server, or one of this module's own."""
    import tritonclient.grpc as grpcclient

    if request.param == "python-onnxruntime":
        server = request.getfixturevalue("tiny_server")
    else:
        # Unary edits only, one at a time: all the parity cases need.
        repository = tiny_repository_with(
            flavour=request.param, streaming_models=False, edit_instances=1
        )
        server = start_server(repository)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield request.param, client
    client.close()


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
    served_client, reference_pipelines, summary, case: Case
) -> None:
    flavour, client = served_client
    encoded = png_bytes(photo(*case.size))
    served = edit(
        client,
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
        f"served ({flavour}) vs diffusers, uint8 |difference| (tiny preset)",
        f"{case.name:<34} max {difference.max()}  mean {difference.mean():.4f}",
    )
    assert difference.max() <= MAX_ABS_DIFFERENCE
    # Random weights still give an image that depends on the input, not a constant.
    assert actual.std() > 1.0
