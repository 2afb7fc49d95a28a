"""The denoising loop of InstructPix2Pix and img2img, around any UNet callable.

The edit models run it with the UNet reached through BLS; tests and the benchmarks' bare
loop pass a UNet of their own. It follows diffusers' `StableDiffusionInstructPix2PixPipeline`
and `StableDiffusionImg2ImgPipeline` step for step (same scheduler objects, same order of
random draws from a CPU `torch.Generator`), so a seeded request reproduces the reference
pipeline's image.

It runs on one torch device. On a GPU the latents, the scheduler's arithmetic and every
UNet input and output stay in GPU memory for the whole loop; only the random draws are
made on the CPU (with the CPU generator, as diffusers does) and moved over, so a seed gives
the same noise on any device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pix2pix_client.contract import (
    IMG2IMG,
    INSTRUCT_PIX2PIX,
    PARAMETERS_BY_NAME,
    SCHEDULERS,
    InvalidArgumentError,
    guidance_on,
)

if TYPE_CHECKING:
    from edit_pipeline.preprocess import EditRequest

# (sample, timestep per batch row, encoder_hidden_states) -> noise prediction: float32
# tensors on the sampler's device, contiguous; the prediction comes back on any device.
UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Array = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class ReusedUNet:
    """A UNet that can reuse its work across steps (DeepCache; export/unet_reuse.py)."""

    # As UNetFn, also returning the deep features to keep.
    full: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    # As UNetFn, with the kept deep features last.
    shallow: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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


def instance_device(kind: str, device_id: str | int) -> torch.device:
    """The torch device of a Triton model instance (`model_instance_kind` and `_device_id`)."""
    if kind == "GPU":
        return torch.device("cuda", int(device_id))
    if kind == "CPU":
        return torch.device("cpu")
    raise ValueError(f"model_instance_kind={kind!r}: allowed CPU, GPU")


def first_step(num_inference_steps: int, temperature: float) -> int:
    """Index of the first timestep run: `N - int(N * temperature)`, keeping at least one."""
    denoised = min(int(num_inference_steps * temperature), num_inference_steps)
    return num_inference_steps - max(denoised, 1)


@dataclass(frozen=True)
class SamplerInputs:
    """What the sampler needs of one request: the encoded prompts and image, the settings."""

    prompt_embeds: Array  # [2, 77, hidden]: prompt, negative prompt
    latent_mean: Array  # [1, 4, h, w] unscaled VAE latent mean of the input image
    latent_std: Array  # [1, 4, h, w]
    num_inference_steps: int
    guidance_scale: float
    image_guidance_scale: float
    temperature: float
    seed: int
    scheduler: str | None
    cache_interval: int = 1  # a full UNet pass every this many steps, shallow ones between

    @classmethod
    def for_request(
        cls, request: EditRequest, prompt_embeds: Array, latent_mean: Array, latent_std: Array
    ) -> SamplerInputs:
        """The encoded tensors with a validated request's settings."""
        return cls(
            prompt_embeds=prompt_embeds,
            latent_mean=latent_mean,
            latent_std=latent_std,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            image_guidance_scale=request.image_guidance_scale,
            temperature=request.temperature,
            seed=request.seed,
            scheduler=request.scheduler,
            cache_interval=request.cache_interval,
        )


# Called after every denoising step with (step index, steps run, latents after the step);
# raising from it stops the loop (a cancelled edit).
StepCallback = Callable[[int, int, torch.Tensor], None]


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
        device: torch.device | str = "cpu",
        reused_unet: ReusedUNet | None = None,
    ) -> None:
        if pipeline not in (INSTRUCT_PIX2PIX, IMG2IMG):
            raise ValueError(f"unknown pipeline {pipeline!r}")
        self.pipeline = pipeline
        self.scheduler_config = dict(scheduler_config)
        self.vae_scaling_factor = vae_scaling_factor
        self.unet = unet
        self.reused_unet = reused_unet
        self.device = torch.device(device)
        # diffusers imports its scheduler classes lazily, seconds of work: done here, at
        # model load, instead of in the first edit.
        make_scheduler(None, self.scheduler_config)

    def __call__(
        self,
        inputs: SamplerInputs,
        trace: SamplerTrace | None = None,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        """The final latents, unscaled for the VAE decoder: float32 on the sampler's device."""
        if self.pipeline == INSTRUCT_PIX2PIX:
            latents = self._instruct_pix2pix(inputs, trace, on_step)
        else:
            latents = self._img2img(inputs, trace, on_step)
        return (latents / self.vae_scaling_factor).contiguous()

    def check_schedule(self, scheduler: str | None, num_inference_steps: int) -> None:
        """Raises InvalidArgumentError where `scheduler` (None: the checkpoint's own), made
        from this checkpoint's config, cannot plan that many steps: PNDM with its
        Runge-Kutta warm-up (where the checkpoint's own scheduler is another) needs 4."""
        if self._plans(scheduler, num_inference_steps):
            return
        most = int(PARAMETERS_BY_NAME["num_inference_steps"].maximum or num_inference_steps)
        least = next(
            (n for n in range(num_inference_steps + 1, most + 1) if self._plans(scheduler, n)),
            None,
        )
        made = self.scheduler_config["_class_name"] if scheduler is None else scheduler
        raise InvalidArgumentError(
            "num_inference_steps",
            f"num_inference_steps={num_inference_steps}: the scheduler {made}, with this "
            "checkpoint's settings, cannot plan so few steps: allowed "
            + ("none" if least is None else f"{least}..{most}"),
        )

    def _plans(self, scheduler: str | None, num_inference_steps: int) -> bool:
        try:
            make_scheduler(scheduler, self.scheduler_config).set_timesteps(num_inference_steps)
        except (ValueError, IndexError):
            return False
        return True

    def _tensor(self, array: Array) -> torch.Tensor:
        # Zero-copy for a NumPy array or a tensor already on the device.
        return torch.as_tensor(array, device=self.device, dtype=torch.float32)

    def _randn(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        # Drawn on the CPU and moved, as diffusers' randn_tensor does with a CPU generator.
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    def _scheduler(self, inputs: SamplerInputs) -> Any:
        scheduler = make_scheduler(inputs.scheduler, self.scheduler_config)
        scheduler.set_timesteps(inputs.num_inference_steps, device=self.device)
        return scheduler

    def _predictor(self, cache_interval: int) -> Callable[..., torch.Tensor]:
        """The UNet call of each step (index, model input, t, prompt embeddings): a full
        pass every step, or with reuse a full pass every `cache_interval` steps, keeping its
        deep features, and shallow passes on them between."""
        if cache_interval > 1 and self.reused_unet is None:
            raise ValueError("cache_interval above 1 needs a UNet that reuses its work")
        kept: list[torch.Tensor] = []

        def predict(
            index: int, model_input: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor
        ) -> torch.Tensor:
            batch = model_input.shape[0]
            timestep = t.to(self.device, torch.float32).reshape(1).repeat(batch)
            sample = model_input.to(torch.float32).contiguous()
            if cache_interval == 1:
                noise_pred = self.unet(sample, timestep, prompt_embeds)
            elif index % cache_interval == 0:
                noise_pred, deep = self.reused_unet.full(sample, timestep, prompt_embeds)
                kept[:] = [deep]
            else:
                noise_pred = self.reused_unet.shallow(sample, timestep, prompt_embeds, kept[0])
            return noise_pred.to(self.device)

        return predict

    def _instruct_pix2pix(
        self, inputs: SamplerInputs, trace: SamplerTrace | None, on_step: StepCallback | None
    ) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(inputs.seed)
        scheduler = self._scheduler(inputs)
        timesteps = scheduler.timesteps
        guided = guidance_on(self.pipeline, inputs.guidance_scale, inputs.image_guidance_scale)
        embeds = self._tensor(inputs.prompt_embeds)
        text, negative = embeds[0:1], embeds[1:2]
        latent_mean = self._tensor(inputs.latent_mean)
        image_latents = latent_mean
        if guided:
            prompt_embeds = torch.cat([text, negative, negative])
            image_latents = torch.cat(
                [image_latents, image_latents, torch.zeros_like(image_latents)]
            )
        else:
            prompt_embeds = text.contiguous()

        shape = latent_mean.shape
        start = first_step(inputs.num_inference_steps, inputs.temperature)
        if start == 0:
            latents = self._randn(shape, generator) * scheduler.init_noise_sigma
        else:
            # Temperature below 1: start part-way, from the image latents noised to there.
            timesteps = timesteps[start * scheduler.order :]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start * scheduler.order)
            noise = self._randn(shape, generator)
            scaled = latent_mean * self.vae_scaling_factor
            latents = scheduler.add_noise(scaled, noise, timesteps[:1])
        if trace is not None:
            trace.timesteps = [float(t) for t in timesteps]
            trace.unet_batch = 3 if guided else 1
            trace.initial_latents = latents.cpu().numpy().copy()

        step_kwargs = _step_kwargs(scheduler, generator)
        predict = self._predictor(inputs.cache_interval)
        for index, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 3) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            model_input = torch.cat([model_input, image_latents], dim=1)
            noise_pred = predict(index, model_input, t, prompt_embeds)
            if guided:
                text_pred, image_pred, uncond_pred = noise_pred.chunk(3)
                noise_pred = (
                    uncond_pred
                    + inputs.guidance_scale * (text_pred - image_pred)
                    + inputs.image_guidance_scale * (image_pred - uncond_pred)
                )
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            if on_step is not None:
                on_step(index, len(timesteps), latents)
        return latents

    def _img2img(
        self, inputs: SamplerInputs, trace: SamplerTrace | None, on_step: StepCallback | None
    ) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(inputs.seed)
        scheduler = self._scheduler(inputs)
        guided = guidance_on(self.pipeline, inputs.guidance_scale)
        embeds = self._tensor(inputs.prompt_embeds)
        text, negative = embeds[0:1], embeds[1:2]
        prompt_embeds = torch.cat([negative, text]) if guided else text.contiguous()

        start = first_step(inputs.num_inference_steps, inputs.temperature)
        timesteps = scheduler.timesteps[start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)

        # The VAE latent is sampled from its distribution first, then the noise is drawn:
        # the same order of draws as diffusers, so the same seed gives the same image.
        mean = self._tensor(inputs.latent_mean)
        std = self._tensor(inputs.latent_std)
        sample = self._randn(mean.shape, generator)
        init_latents = (mean + std * sample) * self.vae_scaling_factor
        noise = self._randn(init_latents.shape, generator)
        latents = scheduler.add_noise(init_latents, noise, timesteps[:1])
        if trace is not None:
            trace.timesteps = [float(t) for t in timesteps]
            trace.unet_batch = 2 if guided else 1
            trace.initial_latents = latents.cpu().numpy().copy()

        step_kwargs = _step_kwargs(scheduler, generator)
        predict = self._predictor(inputs.cache_interval)
        for index, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise_pred = predict(index, model_input, t, prompt_embeds)
            if guided:
                uncond_pred, text_pred = noise_pred.chunk(2)
                noise_pred = uncond_pred + inputs.guidance_scale * (text_pred - uncond_pred)
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            if on_step is not None:
                on_step(index, len(timesteps), latents)
        return latents
