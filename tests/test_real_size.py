"""The SD 1.5 size that real checkpoints have, served as `make serve` serves it.

`make test-slow` only: the sd15 preset (860 M-parameter UNets, random weights) is built
and exported into the project's build folder once (`build/`, as `make bench-footprint`
does; a few minutes and, for the fused export, a peak of 8.6 GB), then
a real `serve --repository` process tree edits 512x512 photos. Asserted:

- the served image equals diffusers' on the same weights within 2 grey levels;
- after 10 edits, both pipelines in turn, the PSS of the whole tree is within the budget
  (1.25 x the served weights' bytes + 1.5 GB);
- 4 edits sent at once each complete or are refused at once with UNAVAILABLE, and the
  server serves the next edit.
"""

from __future__ import annotations

import io
import multiprocessing
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.footprint import (
    ALLOWANCE_BYTES,
    WEIGHT_FACTOR,
    run_concurrent,
    run_edits,
    served_pipelines,
    served_weight_bytes,
    serving,
    tree_pss,
    wait_ready,
)
from benchmarks.photo import photo_png
from benchmarks.settings import BenchConfig
from model_repository.chain import DEFAULT_BUILD_DIR, Source, ensure_preset, prepare_in_child
from model_repository.configs import RepositoryOptions
from pix2pix_client import EditClient

pytestmark = pytest.mark.slow

PRESET = "sd15"
SIZE = 512
# The exact-parity mode; what `make serve` serves on a CPU without native bf16.
FP32 = RepositoryOptions(flavour="python-onnxruntime", precision="fp32")


@pytest.fixture(scope="module")
def sd15_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str, Path]]:
    repository = DEFAULT_BUILD_DIR / "bench" / "real-size" / "python-onnxruntime-fp32"
    prepare_in_child(Source(preset=PRESET), FP32, DEFAULT_BUILD_DIR, repository=repository)
    log_file = tmp_path_factory.mktemp("logs") / "sd15.log"
    with serving(["--repository", str(repository)], log_file) as (process, url):
        wait_ready(process, url)
        yield process.pid, url, repository


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _diffusers_edit(weights: str, config: BenchConfig, image: bytes) -> bytes:
    from benchmarks.systems import DiffusersEager

    return DiffusersEager(Path(weights), config)(image)


SECTION = "sd15 at 512, python-onnxruntime fp32, served by `serve --repository`"


def test_a_512_edit_equals_diffusers_and_the_tree_stays_in_its_budget(sd15_server, summary) -> None:
    pid, url, repository = sd15_server
    config = BenchConfig(preset=PRESET, size=SIZE, steps=2, options=FP32)
    image = photo_png(SIZE)
    request = config.request()
    with EditClient(url, timeout_s=1800) as client:
        served = client.edit(image, request.pop("prompt"), model=config.pipeline, **request).png
    weights = ensure_preset(PRESET, DEFAULT_BUILD_DIR)
    # diffusers in a process of its own: its 5 GB are the machine's again afterwards.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        expected = pool.apply(_diffusers_edit, (str(weights), config, image))
    difference = np.abs(_pixels(served) - _pixels(expected))
    summary(SECTION, f"served vs diffusers fp32: max {difference.max()} grey levels (gate 2)")
    assert difference.max() <= 2, f"max difference {difference.max()} grey levels"

    every = [replace(config, pipeline=p) for p in served_pipelines(repository)]
    run_edits(url, every, image, edits=10, steps=2)
    pss = sum(tree_pss(pid).values())
    budget = WEIGHT_FACTOR * served_weight_bytes(repository, "fp32") + ALLOWANCE_BYTES
    summary(SECTION, f"PSS after 10 edits: {pss / 1e9:.2f} GB (budget {budget / 1e9:.2f})")
    assert pss <= budget, f"PSS {pss / 1e9:.2f} GB over the budget {budget / 1e9:.2f} GB"


def test_four_edits_at_once_complete_or_are_refused_never_killed(sd15_server, summary) -> None:
    _, url, repository = sd15_server
    config = BenchConfig(preset=PRESET, size=SIZE, steps=2, options=FP32)
    image = photo_png(SIZE)
    every = [replace(config, pipeline=p) for p in served_pipelines(repository)]
    outcomes = run_concurrent(url, every, image, edits=4, steps=2)
    summary(SECTION, f"4 edits sent at once: {outcomes}")
    assert outcomes["failed"] == 0, outcomes
    assert outcomes["completed"] + outcomes["refused"] == 4
    # Nothing was killed: the server takes the next edit.
    assert run_edits(url, every[:1], image, edits=1, steps=2)[0] > 0
