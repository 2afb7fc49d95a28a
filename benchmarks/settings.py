"""What one benchmark run measures: the request, the load levels, and what is served.

The serving settings are `RepositoryOptions`, the same type and defaults as `make serve`:
the benchmark measures what users serve unless a flag says otherwise, and the results
record the settings.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from export.presets import PRESETS
from model_repository.arguments import option
from model_repository.configs import PYTHON_FLAVOURS, RepositoryOptions
from pix2pix_client.contract import (
    ADMIN_KEY_VARIABLE,
    INSTRUCT_PIX2PIX,
    PIPELINES,
    SCHEDULERS,
    guidance_on,
)
from pix2pix_client.request import validate_parameters
from serving.admin import new_admin_key


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. The request is the same for every system measured."""

    preset: str = option("small", "the preset served", choices=sorted(PRESETS))
    pipeline: str = option(INSTRUCT_PIX2PIX, "the pipeline measured", choices=PIPELINES)
    size: int = option(256, "the photo is resized to SIZE x SIZE before encoding")
    steps: int = option(20, "denoising steps")
    scheduler: str | None = option(
        None, "the scheduler; the checkpoint's own when not given", choices=SCHEDULERS
    )
    prompt: str = option("turn him into a snowman", "the instruction")
    guidance_scale: float = option(7.5, "text guidance")
    image_guidance_scale: float = option(1.5, "image guidance (instruct_pix2pix)")
    temperature: float = option(1.0, "temperature (img2img: strength)")
    seed: int = option(1234, "the seed every system uses")
    preview_every: int = option(5, "streamed edits: a latent preview every N steps")
    cache_interval: int = option(
        1, "reused UNet work: a full UNet pass every N steps, shallow ones between (1: off)"
    )
    deepcache_interval: int = option(
        3, "diffusers with the DeepCache package's helper at this cache interval (1: not run)"
    )
    concurrency: tuple[int, ...] = option((1, 2, 4), "perf_analyzer's concurrency levels")
    rounds: int = option(5, "interleaved rounds of every system")
    requests_per_round: int = option(
        2, "edits per system per round at concurrency 1 (times the level above it)"
    )
    served: tuple[str, ...] = option(
        (),
        "other served configurations timed in the same rounds (client, c=1), as "
        "FLAVOUR:PRECISION[:CACHE_INTERVAL] (python flavours), e.g. python-openvino:int8:3",
    )
    options: RepositoryOptions = field(default_factory=RepositoryOptions)

    def __post_init__(self) -> None:
        if self.size % 8 or self.size < 8:
            raise ValueError(f"size={self.size}: allowed a multiple of 8, at least 8")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency={self.concurrency}: allowed levels of at least 1")
        if self.rounds < 1 or self.requests_per_round < 1:
            raise ValueError(
                f"rounds={self.rounds}, requests_per_round={self.requests_per_round}: "
                "allowed at least 1 each"
            )
        if self.deepcache_interval < 1:
            raise ValueError(f"deepcache_interval={self.deepcache_interval}: allowed at least 1")
        # The request every system gets, in the contract's words (InvalidArgumentError is
        # a ValueError); served variants' intervals below.
        request = self.request() | {
            "cache_interval": self.cache_interval,
            "preview_every": self.preview_every,
        }
        validate_parameters(self.pipeline, request.pop("prompt"), streaming=True, **request)
        self.options.check()
        # What `make serve` would run on this machine, so results name a real flavour.
        object.__setattr__(self, "options", self.options.for_this_machine())
        for variant in self.served_variants():
            variant.options.check()

    def served_variants(self) -> list[BenchConfig]:
        """This run's request with each other served configuration's options (and cache
        interval)."""
        variants = []
        for entry in self.served:
            parts = entry.split(":")
            if len(parts) not in (2, 3) or parts[0] not in PYTHON_FLAVOURS or not parts[1]:
                raise ValueError(
                    f"served={entry!r}: allowed FLAVOUR:PRECISION[:CACHE_INTERVAL] with a "
                    f"flavour of {', '.join(PYTHON_FLAVOURS)} (the wheel's tritonserver "
                    "serves those)"
                )
            flavour, precision, *interval = parts
            if interval and not interval[0].isdigit():
                raise ValueError(f"served={entry!r}: CACHE_INTERVAL is a whole number")
            options = replace(self.options, flavour=flavour, precision=precision)
            cache_interval = int(interval[0]) if interval else self.cache_interval
            variants.append(
                replace(self, options=options, served=(), cache_interval=cache_interval)
            )
        return variants

    @property
    def name(self) -> str:
        """What is served, as a folder name: preset, flavour and precision."""
        return f"{self.preset}-{self.options.flavour}-{self.options.precision}"

    @property
    def served_name(self) -> str:
        """The served system's name in results: flavour, precision, reused UNet work."""
        reuse = f"_reuse{self.cache_interval}" if self.cache_interval > 1 else ""
        return f"triton_{self.options.flavour}_{self.options.precision}{reuse}"

    @property
    def guided(self) -> bool:
        return guidance_on(self.pipeline, self.guidance_scale, self.image_guidance_scale)

    @property
    def targets_apply(self) -> bool:
        """Whether this is the configuration the CPU targets are defined for."""
        return (self.preset, self.size, self.steps, self.pipeline, self.guided) == (
            "small",
            256,
            20,
            INSTRUCT_PIX2PIX,
            True,
        )

    def request(self) -> dict[str, Any]:
        """The explicit request parameters (everything but the image), by contract name."""
        values: dict[str, Any] = {
            "prompt": self.prompt,
            "negative_prompt": "",
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "temperature": self.temperature,
            "seed": self.seed,
        }
        if self.pipeline == INSTRUCT_PIX2PIX:
            values["image_guidance_scale"] = self.image_guidance_scale
        if self.scheduler is not None:
            values["scheduler"] = self.scheduler
        if self.cache_interval > 1:
            values["cache_interval"] = self.cache_interval
        return values

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"concurrency": list(self.concurrency), "served": list(self.served)}


@functools.cache
def admin_key() -> str:
    """The key of the servers' restricted APIs (statistics, model configs), which the
    harness reads: $IMAGE_EDIT_ADMIN_KEY for a server given with --url, else one made for
    this run and handed to the servers it starts."""
    return os.environ.get(ADMIN_KEY_VARIABLE) or new_admin_key()
