"""The int8 fidelity gate: what quantizing the UNets (export/int8.py, the default
calibration) costs, printed after the run.

- Small preset (random weights of the real architectures, fresh in a temporary build
  folder): real tritonservers of the python-openvino flavour, fp32 then int8, the same
  edit at 256x256 and 20 steps for both pipelines and three schedulers; the PSNR of
  each pair.
- The toy InstructPix2Pix (models/toy): each learned instruction's effect size on the
  held-out photos, served in int8, against diffusers' fp32 pipeline (which the served
  fp32 image equals within 2 grey levels, tests/test_toy.py); int8 keeps at least 90%.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from benchmarks.fidelity import psnr
from model_repository.chain import Source, prepare_in_child
from model_repository.configs import RepositoryOptions
from serving.tritonserver import TritonServer
from tests.serving import edit
from tests.test_openvino_fidelity import GATE_CASES, PIPELINES, SCHEDULERS, request_for
from tests.test_toy import (
    CHECKS,
    TOY_FOLDER,
    served_and_reference_effects,
    toy_server_client,
)

pytestmark = pytest.mark.slow

# Served int8 against served fp32 on the small preset's random weights: a floor under
# the measured values (docs/flavours.md), not the bf16 gate's 40 dB.
MIN_PSNR_DB = 25.0
# The share of each learned edit's effect size int8 keeps on the toy model.
MIN_EFFECT_SHARE = 0.9


@pytest.fixture(scope="module")
def served_images(tmp_path_factory) -> dict[tuple[str, str, str], np.ndarray]:
    """Every edit's image by (pipeline, scheduler, precision): one server at a time."""
    build_dir = tmp_path_factory.mktemp("build")
    images = {}
    for precision in ("fp32", "int8"):
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


@pytest.mark.parametrize("pipeline, scheduler", GATE_CASES)
def test_int8_images_match_fp32_ones(served_images, summary, pipeline: str, scheduler: str) -> None:
    int8, fp32 = (served_images[(pipeline, scheduler, p)] for p in ("int8", "fp32"))
    quality = psnr(int8, fp32)
    difference = np.abs(int8.astype(np.int16) - fp32.astype(np.int16))
    summary(
        "served int8 vs served fp32 (python-openvino, small preset, 256x256, 20 steps)",
        f"{pipeline:<17} {scheduler:<9} PSNR {quality:5.1f} dB  max {difference.max():3d}  "
        f"mean {difference.mean():.3f}",
    )
    assert quality >= MIN_PSNR_DB


# --------------------------------------------------------------------------- toy


@pytest.fixture(scope="module")
def toy_int8_client(tmp_path_factory) -> Any:
    """A real tritonserver serving the toy model's int8 repository (built by the chain)."""
    with toy_server_client(tmp_path_factory, "python-openvino", "int8") as client:
        yield client


@pytest.fixture(scope="module")
def toy_pipeline() -> Any:
    from export.checkpoint import inspect_folder, load_pipeline

    return load_pipeline(inspect_folder(TOY_FOLDER))


@pytest.mark.parametrize("prompt", list(CHECKS))
def test_int8_keeps_the_toys_learned_edits(
    toy_int8_client: Any,
    toy_pipeline: Any,
    summary: Callable[[str, str], None],
    prompt: str,
) -> None:
    for name, effect, fp32, int8 in served_and_reference_effects(
        toy_int8_client, toy_pipeline, prompt
    ):
        summary(
            "toy model: int8 served against diffusers fp32, held-out photos (share >= 0.9)",
            f"{prompt:<24} {name:<9} {effect:<32} fp32 {fp32:+.3f}  int8 {int8:+.3f}  "
            f"share {int8 / fp32:.2f}",
        )
        assert int8 >= MIN_EFFECT_SHARE * fp32, f"{prompt} on {name}: {int8:.3f} vs {fp32:.3f}"
