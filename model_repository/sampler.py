"""The denoising loop of InstructPix2Pix and img2img, around any UNet callable.

This is the sampler the Triton `sampler_*` models run, with the UNet reached through BLS;
tests and the bare onnxruntime baseline pass an onnxruntime session instead. It follows
diffusers' `StableDiffusionInstructPix2PixPipeline` and `StableDiffusionImg2ImgPipeline`
step for step (same scheduler objects, same order of random draws from a CPU
`torch.Generator`), so a seeded request reproduces the reference pipeline's image.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pix2pix_client.contract import IMG2IMG, INSTRUCT_PIX2PIX, SCHEDULERS

# (sample, timestep per batch row, encoder_hidden_states) -> noise prediction
UNetFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

SCHEDULER_CLASSES = {
    "euler_a": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "pndm": "PNDMScheduler",
}
assert tuple(SCHEDULER_CLASSES) == SCHEDULERS


def make_scheduler(name: str | None, checkpoint_config: dict[str, Any]) -> Any:
    """A fresh diffusers scheduler: `name`'s class, or the checkpoint's own when None."""
    import diffusers

    class_name = checkpoint_config["_class_name"] if name is None else SCHEDULER_CLASSES[name]
    scheduler_class = getattr(diffusers, class_name)
    return scheduler_class.from_config(checkpoint_config)


def _step_kwargs(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    # As diffusers' prepare_extra_step_kwargs: only schedulers that take them get them.
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


def first_step(num_inference_steps: int, temperature: float) -> int:
    """Index of the first timestep run: `N - int(N * temperature)`, keeping at least one."""
    denoised = min(int(num_inference_steps * temperature), num_inference_steps)
    return num_inference_steps - max(denoised, 1)


@dataclass(frozen=True)
class SamplerInputs:
    """What the ensemble hands the sampler for one request."""

    prompt_embeds: np.ndarray  # [2, 77, hidden]: prompt, negative prompt
    latent_mean: np.ndarray  # [1, 4, h, w] unscaled VAE latent mean of the input image
    latent_std: np.ndarray  # [1, 4, h, w]
    num_inference_steps: int
    guidance_scale: float
    image_guidance_scale: float
    temperature: float
    seed: int
    scheduler: str | None


@dataclass
class SamplerTrace:
    """What a run did, for tests and logs."""

    timesteps: list[float]
    unet_batch: int
    initial_latents: np.ndarray | None = None


class Sampler:
    """Runs one pipeline's denoising loop; returns latents ready for the VAE decoder."""

    def __init__(
        self,
        pipeline: str,
        scheduler_config: dict[str, Any],
        vae_scaling_factor: float,
        unet: UNetFn,
    ) -> None:
        if pipeline not in (INSTRUCT_PIX2PIX, IMG2IMG):
            raise ValueError(f"unknown pipeline {pipeline!r}")
        self.pipeline = pipeline
        self.scheduler_config = dict(scheduler_config)
        self.vae_scaling_factor = vae_scaling_factor
        self.unet = unet

    def __call__(self, inputs: SamplerInputs, trace: SamplerTrace | None = None) -> np.ndarray:
        if self.pipeline == INSTRUCT_PIX2PIX:
            latents = self._instruct_pix2pix(inputs, trace)
        else:
            latents = self._img2img(inputs, trace)
        return (latents / self.vae_scaling_factor).numpy()

    def _predict(
        self, model_input: torch.Tensor, t: torch.Tensor, prompt_embeds: np.ndarray
    ) -> torch.Tensor:
        timesteps = np.full((model_input.shape[0],), float(t), dtype=np.float32)
        sample = model_input.numpy()
        if sample.dtype != np.float32:
            sample = sample.astype(np.float32)
        return torch.from_numpy(self.unet(sample, timesteps, prompt_embeds))

    def _instruct_pix2pix(self, inputs: SamplerInputs, trace: SamplerTrace | None) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(inputs.seed)
        scheduler = make_scheduler(inputs.scheduler, self.scheduler_config)
        scheduler.set_timesteps(inputs.num_inference_steps)
        timesteps = scheduler.timesteps
        # diffusers turns guidance off unless both scales ask for it.
        guided = inputs.guidance_scale > 1.0 and inputs.image_guidance_scale >= 1.0
        text, negative = inputs.prompt_embeds[0:1], inputs.prompt_embeds[1:2]
        image_latents = torch.from_numpy(inputs.latent_mean)
        if guided:
            prompt_embeds = np.ascontiguousarray(np.concatenate([text, negative, negative]))
            image_latents = torch.cat(
                [image_latents, image_latents, torch.zeros_like(image_latents)]
            )
        else:
            prompt_embeds = np.ascontiguousarray(text)

        shape = inputs.latent_mean.shape
        start = first_step(inputs.num_inference_steps, inputs.temperature)
        if start == 0:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
            latents = latents * scheduler.init_noise_sigma
        else:
            # Temperature below 1: start part-way, from the image latents noised to there.
            timesteps = timesteps[start * scheduler.order :]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start * scheduler.order)
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)
            scaled = torch.from_numpy(inputs.latent_mean) * self.vae_scaling_factor
            latents = scheduler.add_noise(scaled, noise, timesteps[:1])
        if trace is not None:
            trace.timesteps = [float(t) for t in timesteps]
            trace.unet_batch = 3 if guided else 1
            trace.initial_latents = latents.numpy().copy()

        step_kwargs = _step_kwargs(scheduler, generator)
        for t in timesteps:
            model_input = torch.cat([latents] * 3) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            model_input = torch.cat([model_input, image_latents], dim=1)
            noise_pred = self._predict(model_input, t, prompt_embeds)
            if guided:
                text_pred, image_pred, uncond_pred = noise_pred.chunk(3)
                noise_pred = (
                    uncond_pred
                    + inputs.guidance_scale * (text_pred - image_pred)
                    + inputs.image_guidance_scale * (image_pred - uncond_pred)
                )
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
        return latents

    def _img2img(self, inputs: SamplerInputs, trace: SamplerTrace | None) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(inputs.seed)
        scheduler = make_scheduler(inputs.scheduler, self.scheduler_config)
        guided = inputs.guidance_scale > 1.0
        text, negative = inputs.prompt_embeds[0:1], inputs.prompt_embeds[1:2]
        prompt_embeds = np.ascontiguousarray(np.concatenate([negative, text]) if guided else text)

        scheduler.set_timesteps(inputs.num_inference_steps)
        start = first_step(inputs.num_inference_steps, inputs.temperature)
        timesteps = scheduler.timesteps[start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)

        # The VAE latent is sampled from its distribution first, then the noise is drawn:
        # the same order of draws as diffusers, so the same seed gives the same image.
        mean = torch.from_numpy(inputs.latent_mean)
        std = torch.from_numpy(inputs.latent_std)
        sample = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
        init_latents = (mean + std * sample) * self.vae_scaling_factor
        noise = torch.randn(init_latents.shape, generator=generator, dtype=torch.float32)
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1])
        if trace is not None:
            trace.timesteps = [float(t) for t in timesteps]
            trace.unet_batch = 2 if guided else 1
            trace.initial_latents = latents.numpy().copy()

        step_kwargs = _step_kwargs(scheduler, generator)
        for t in timesteps:
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise_pred = self._predict(model_input, t, prompt_embeds)
            if guided:
                uncond_pred, text_pred = noise_pred.chunk(2)
                noise_pred = uncond_pred + inputs.guidance_scale * (text_pred - uncond_pred)
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
        return latents
