"""The bf16 fidelity gate: served bf16 images against served fp32 ones, small preset.

Two real tritonservers of the python-openvino flavour, fp32 and bf16, on the small preset
(random weights of the real architectures, fresh in a temporary build folder): the same
edit, 256x256 and 20 steps, for both pipelines and three schedulers. The PSNR of each pair
is printed after the run; the gate is 40 dB (README: "Choosing a flavour and precision").
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from model_repository.configs import RepositoryOptions
from model_repository.openvino_component import bf16_unsupported_reason
from model_repository.serve import prepare
from tests.serving import edit, photo, png_bytes
from tests.test_openvino import psnr

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bf16_unsupported_reason() is not None, reason="no native bf16 here"),
]

MIN_PSNR_DB = 40.0
SCHEDULERS = ("euler_a", "ddim", "dpmpp_2m")
PIPELINES = {"instruct_pix2pix": "turn him into a snowman", "img2img": "a snowman, winter"}


@pytest.fixture(scope="module")
def clients(tmp_path_factory, start_server) -> dict[str, grpcclient.InferenceServerClient]:
    build_dir = tmp_path_factory.mktemp("build")
    clients = {}
    for precision in ("fp32", "bf16"):
        options = RepositoryOptions(flavour="python-openvino", precision=precision)
        built = prepare(preset="small", build_dir=build_dir, options=options)
        clients[precision] = grpcclient.InferenceServerClient(
            start_server(built.repository).grpc_url
        )
    yield clients
    for client in clients.values():
        client.close()


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_bf16_images_match_fp32_ones(clients, summary, pipeline: str, scheduler: str) -> None:
    request = {
        "image": png_bytes(photo(256, 256)),
        "prompt": PIPELINES[pipeline],
        "num_inference_steps": 20,
        "seed": 1234,
        "scheduler": scheduler,
    }
    images = {
        precision: edit(client, pipeline, **request).pixels for precision, client in clients.items()
    }
    quality = psnr(images["bf16"], images["fp32"])
    difference = np.abs(images["bf16"].astype(np.int16) - images["fp32"].astype(np.int16))
    summary(
        "served bf16 vs served fp32 (python-openvino, small preset, 256x256, 20 steps)",
        f"{pipeline:<17} {scheduler:<9} PSNR {quality:5.1f} dB  max {difference.max():3d}  "
        f"mean {difference.mean():.3f}",
    )
    assert quality >= MIN_PSNR_DB
