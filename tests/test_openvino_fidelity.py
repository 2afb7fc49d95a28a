"""The bf16 fidelity gate: served bf16 images against served fp32 ones, small preset.

Real tritonservers of the python-openvino flavour, fp32 then bf16, on the small preset
(random weights of the real architectures, fresh in a temporary build folder): the same
edit, 256x256 and 20 steps, for both pipelines and three schedulers. The PSNR of each pair
is printed after the run; the gate is 40 dB (docs/flavours.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from benchmarks.fidelity import psnr
from edit_pipeline.openvino_component import bf16_unsupported_reason
from model_repository.chain import Source, prepare_in_child
from model_repository.configs import RepositoryOptions
from serving.tritonserver import TritonServer
from tests.serving import edit, photo, png_bytes

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bf16_unsupported_reason() is not None, reason="no native bf16 here"),
]

MIN_PSNR_DB = 40.0
SCHEDULERS = ("euler_a", "ddim", "dpmpp_2m")
PIPELINES = {"instruct_pix2pix": "turn him into a snowman", "img2img": "a snowman, winter"}


def request_for(pipeline: str, scheduler: str) -> dict[str, object]:
    return {
        "image": png_bytes(photo(256, 256)),
        "prompt": PIPELINES[pipeline],
        "num_inference_steps": 20,
        "seed": 1234,
        "scheduler": scheduler,
    }


@pytest.fixture(scope="module")
def served_images(tmp_path_factory) -> dict[tuple[str, str, str], np.ndarray]:
    """Every edit's image by (pipeline, scheduler, precision): one server at a time (two
    small-preset servers at once take more memory than these machines can spare)."""
    build_dir = tmp_path_factory.mktemp("build")
    images = {}
    for precision in ("fp32", "bf16"):
        options = RepositoryOptions(flavour="python-openvino", precision=precision)
        built = prepare_in_child(Source(preset="small"), options, build_dir)
        log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
        with TritonServer(built.repository, log_file=log) as server:
            server.wait_ready(timeout_s=600)
            client = grpcclient.InferenceServerClient(server.grpc_url)
            for pipeline in PIPELINES:
                for scheduler in SCHEDULERS:
                    served = edit(client, pipeline, **request_for(pipeline, scheduler))
                    images[(pipeline, scheduler, precision)] = served.pixels
            client.close()
    return images


# instruct_pix2pix with DDIM on these random weights amplifies any change of the UNet's
# output: fp32 with 1% noise on it lands as far from fp32 as bf16 does (docs/flavours.md);
# the gate cannot tell precision from that case's sensitivity.
ILL_CONDITIONED = pytest.mark.xfail(
    reason="DDIM InstructPix2Pix on the small preset's random weights: 1% UNet noise, 13.9 dB"
)


# Every pipeline with every scheduler, the ill-conditioned case marked: the gates' cases.
GATE_CASES = [
    pytest.param(p, s, marks=ILL_CONDITIONED if (p, s) == ("instruct_pix2pix", "ddim") else ())
    for p in PIPELINES
    for s in SCHEDULERS
]


@pytest.mark.parametrize("pipeline, scheduler", GATE_CASES)
def test_bf16_images_match_fp32_ones(served_images, summary, pipeline: str, scheduler: str) -> None:
    bf16, fp32 = (served_images[(pipeline, scheduler, p)] for p in ("bf16", "fp32"))
    quality = psnr(bf16, fp32)
    difference = np.abs(bf16.astype(np.int16) - fp32.astype(np.int16))
    summary(
        "served bf16 vs served fp32 (python-openvino, small preset, 256x256, 20 steps)",
        f"{pipeline:<17} {scheduler:<9} PSNR {quality:5.1f} dB  max {difference.max():3d}  "
        f"mean {difference.mean():.3f}",
    )
    assert quality >= MIN_PSNR_DB
