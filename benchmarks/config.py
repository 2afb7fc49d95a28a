"""What one benchmark run measures: model, request, load levels and serving settings."""

from __future__ import annotations

import functools
import os
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

from pix2pix_client.contract import ADMIN_KEY_VARIABLE, IMG2IMG, INSTRUCT_PIX2PIX

DEFAULT_PROMPT = "turn him into a snowman"


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. The request is the same for every system measured."""

    preset: str = "small"
    pipeline: str = INSTRUCT_PIX2PIX
    size: int = 256  # the photo is resized to size x size before encoding
    steps: int = 20
    scheduler: str | None = None  # None: the checkpoint's own (Euler ancestral for pix2pix)
    prompt: str = DEFAULT_PROMPT
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    temperature: float = 1.0
    seed: int = 1234
    concurrency: tuple[int, ...] = (1, 2, 4)
    # Every system is measured in `rounds` interleaved rounds (each level, each baseline),
    # so drift on a shared machine hits all alike. Per round: this many edits per system
    # at concurrency 1, times the level for the others.
    rounds: int = 5
    requests_per_round: int = 2
    flavour: str = "python-onnxruntime"
    precision: str = "fp32"  # fp16: GPU exports and engines
    optimize: bool = True  # onnxruntime fusions in the export (not for tensorrt)
    intra_op_threads: int = 0  # per onnxruntime session; 0: all cores
    allow_spinning: bool = True  # onnxruntime pool threads spin while idle
    cpu_rate_limit: bool = True  # one component session computes at a time
    # Merged UNet calls run side by side, one thread each (loads a UNet copy per core;
    # off by default in RepositoryOptions for that reason, on for the CPU benchmark).
    unet_split_threads: bool = True
    edit_instances: int = 2
    unet_queue_delay_us: int = 2000
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pipeline not in (INSTRUCT_PIX2PIX, IMG2IMG):
            raise ValueError(f"pipeline={self.pipeline!r}: allowed {INSTRUCT_PIX2PIX}, {IMG2IMG}")
        if self.size % 8 or self.size < 8:
            raise ValueError(f"size={self.size}: allowed a multiple of 8, at least 8")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency={self.concurrency}: allowed levels of at least 1")
        if self.rounds < 1 or self.requests_per_round < 1:
            raise ValueError(
                f"rounds={self.rounds}, requests_per_round={self.requests_per_round}: "
                "allowed at least 1 each"
            )
        if self.precision not in ("fp32", "fp16"):
            raise ValueError(f"precision={self.precision!r}: allowed fp32, fp16")
        if self.flavour == "tensorrt" and self.optimize:
            raise ValueError(
                "the tensorrt flavour builds engines from a plain export: optimize=False"
            )

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance is on (diffusers' rule for each pipeline)."""
        if self.pipeline == INSTRUCT_PIX2PIX:
            return self.guidance_scale > 1.0 and self.image_guidance_scale >= 1.0
        return self.guidance_scale > 1.0

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
        return values

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["concurrency"] = list(self.concurrency)
        return data


@functools.cache
def admin_key() -> str:
    """The key of the servers' restricted APIs (statistics, model configs), which the
    harness reads: $IMAGE_EDIT_ADMIN_KEY for a server given with --url, else one made for
    this run and handed to the servers it starts."""
    return os.environ.get(ADMIN_KEY_VARIABLE) or secrets.token_urlsafe(24)
