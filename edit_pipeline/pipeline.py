"""One edit from request to PNG: the method the served edit models run, top to bottom.

    check inputs -> decode the image -> tokenize -> encode prompts and image -> denoise
    -> decode latents -> encode PNG -> give the heap's freed pages back

Plain Python around four component calls (`Components`): the Triton edit models reach
the exported components through BLS, the bare onnxruntime baseline calls sessions in
this process. `prepare` does everything that can fail on bad input, so a request is
refused before any component runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from edit_pipeline.page_release import release_free_heap
from edit_pipeline.postprocess import encode_png, tensor_to_image
from edit_pipeline.preprocess import (
    EditRequest,
    PromptTokenizer,
    decode_image,
    image_to_tensor,
    resolve_request,
)
from edit_pipeline.sampler import ReusedUNet, Sampler, SamplerInputs, StepCallback
from edit_pipeline.settings import SCHEDULER_FILE, SETTINGS_FILE, TOKENIZER_DIR, PipelineSettings
from pix2pix_client.contract import InvalidArgumentError


class Components(Protocol):
    """The exported components one edit calls, whatever runs them."""

    def encode_prompts(self, input_ids: np.ndarray) -> torch.Tensor:
        """[2, length] token ids (prompt, negative prompt) -> [2, length, width] embeddings."""
        ...

    def encode_image(self, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """[1, 3, H, W] pixels in [-1, 1] -> the latent distribution's mean and std."""
        ...

    def predict_noise(
        self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor
    ) -> torch.Tensor:
        """One UNet call."""
        ...

    def predict_noise_keeping(
        self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One full UNet pass that also returns its deep features (reused UNet work)."""
        ...

    def predict_noise_shallow(
        self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor, deep: torch.Tensor
    ) -> torch.Tensor:
        """One shallow UNet pass on kept deep features."""
        ...

    def decode_latents(self, latent: torch.Tensor) -> np.ndarray:
        """[1, C, h, w] unscaled latents -> [1, 3, H, W] pixels in [-1, 1]."""
        ...


@dataclass(frozen=True)
class PreparedEdit:
    """A request that passed every check: its settings and the decoded image."""

    request: EditRequest
    pixels: np.ndarray  # [1, 3, H, W] float32 in [-1, 1]


@dataclass(frozen=True)
class EditOutput:
    png: bytes
    seed: int


class EditPipeline:
    """Runs edits of one pipeline (instruct_pix2pix or img2img) on given components."""

    def __init__(
        self,
        settings: PipelineSettings,
        scheduler_config: dict[str, Any],
        tokenizer: PromptTokenizer,
        components: Components,
        device: torch.device | str = "cpu",
    ) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.components = components
        reused_unet = (
            ReusedUNet(components.predict_noise_keeping, components.predict_noise_shallow)
            if settings.reuses_unet_work
            else None
        )
        self.sampler = Sampler(
            settings.pipeline,
            scheduler_config,
            settings.vae_scaling_factor,
            components.predict_noise,
            device,
            reused_unet,
        )

    @classmethod
    def from_folder(
        cls,
        folder: Path,
        make_components: Callable[[PipelineSettings], Components],
        device: torch.device | str = "cpu",
    ) -> EditPipeline:
        """The pipeline an edit model's version folder describes, on the given components."""
        settings = PipelineSettings.from_json(json.loads((folder / SETTINGS_FILE).read_text()))
        return cls(
            settings,
            json.loads((folder / SCHEDULER_FILE).read_text()),
            PromptTokenizer(folder / TOKENIZER_DIR),
            make_components(settings),
            device,
        )

    def prepare(self, inputs: dict[str, Any], streaming: bool = False) -> PreparedEdit:
        """Validates the inputs (a streaming model's too) and decodes the image; raises
        InvalidArgumentError."""
        request = resolve_request(self.settings.pipeline, inputs, streaming)
        if request.cache_interval > 1 and not self.settings.reuses_unet_work:
            raise InvalidArgumentError(
                "cache_interval",
                f"cache_interval={request.cache_interval}: this model's UNet cannot reuse its "
                "work (the export says why): allowed 1",
            )
        self.sampler.check_schedule(request.scheduler, request.num_inference_steps)
        image = decode_image(inputs["image"], self.settings.limits)
        return PreparedEdit(request, image_to_tensor(image))

    def preview(self, edit: PreparedEdit, latents: torch.Tensor) -> bytes:
        """A PNG of the sampler's current (scaled) latents, without the VAE decoder."""
        height, width = edit.pixels.shape[2:]
        unscaled = latents / self.settings.vae_scaling_factor
        return self.settings.latent_preview.png(unscaled, (width, height))

    def run(self, edit: PreparedEdit, on_step: StepCallback | None = None) -> EditOutput:
        """Encodes, denoises and decodes one prepared edit, then gives the heap pages its
        tensors freed back (at SD 1.5 size and 512x512 about 20 MB a process kept)."""
        try:
            png = self._edited_png(edit, on_step)
        finally:  # a failed or cancelled edit's tensors too
            release_free_heap()
        return EditOutput(png=png, seed=edit.request.seed)

    def _edited_png(self, edit: PreparedEdit, on_step: StepCallback | None) -> bytes:
        request = edit.request
        input_ids = self.tokenizer([request.prompt, request.negative_prompt])
        embeds = self.components.encode_prompts(input_ids)
        mean, std = self.components.encode_image(edit.pixels)
        latent = self.sampler(
            SamplerInputs.for_request(request, embeds, mean, std), on_step=on_step
        )
        return encode_png(tensor_to_image(self.components.decode_latents(latent)))
