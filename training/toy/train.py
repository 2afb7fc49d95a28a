"""Trains the toy InstructPix2Pix: the VAE on photo crops, then the UNet on edit triples.

Stage 1 (VAE): random crops of the training photos, half of them edited by a random
instruction (the VAE must also reconstruct what the UNet will be asked to produce),
reconstructed through a sampled latent; L1 loss plus a small KL term.

Stage 2 (UNet): a fixed bank of crops is encoded once, as (input latent mean, the latent
mean of every edit of it). Each step draws (crop, instruction) pairs and trains the UNet
as InstructPix2Pix does: noise the scaled target latent with the DDPM schedule of
`PIX2PIX_SCHEDULER`, concatenate the unscaled input latent mean on the channel axis,
cross-attend to the frozen text embedding of the instruction, predict the noise. The
text and/or the image condition is dropped for 5% of examples each (and both for 5%), so
classifier-free guidance on text and image works.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from export.presets import PIX2PIX_SCHEDULER
from training.toy.edits import INSTRUCTIONS
from training.toy.photos import (
    HELD_OUT_PHOTOS,
    TRAINING_PHOTOS,
    CropSettings,
    load_photo,
    photo_pyramid,
    random_crops,
    to_tensor,
)


@dataclass(frozen=True)
class VaeSettings:
    """Stage 1: the VAE."""

    steps: int = 2500
    batch: int = 32
    crop: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    # Per image pixel, on the summed KL: small, as Stable Diffusion's VAE (a near-AE).
    kl_weight: float = 1e-4
    # Fraction of crops shown edited by a random instruction.
    edited_fraction: float = 0.5
    # The encoder starts with a narrow posterior (std e^-3): with std 1 the sampled
    # latent drowns the colour information and training stalls for thousands of steps.
    initial_log_variance: float = -6.0


@dataclass(frozen=True)
class UnetSettings:
    """Stage 2: the UNet."""

    steps: int = 5000
    batch: int = 32
    crop: int = 64
    bank_crops: int = 4096
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    # Min-SNR-gamma loss weighting (Hang et al. 2023): same optimum, faster convergence.
    snr_gamma: float = 5.0
    # InstructPix2Pix's conditioning dropout: text only, image only, both.
    drop_text: float = 0.05
    drop_image: float = 0.05
    drop_both: float = 0.05
    ema_decay: float = 0.999


@dataclass(frozen=True)
class TrainingSettings:
    """Everything a run depends on besides the library versions and the thread count."""

    seed: int = 0
    vae: VaeSettings = field(default_factory=VaeSettings)
    unet: UnetSettings = field(default_factory=UnetSettings)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def learning_rate_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then a cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class LossLog:
    """Loss values of a stage: a running mean every `every` steps, and the final mean."""

    every: int
    points: list[dict[str, float]] = field(default_factory=list)
    _sums: dict[str, float] = field(default_factory=dict)
    _count: int = 0

    def add(self, step: int, **values: float) -> dict[str, float] | None:
        for name, value in values.items():
            self._sums[name] = self._sums.get(name, 0.0) + value
        self._count += 1
        if self._count < self.every:
            return None
        point = {"step": step + 1, **{k: v / self._count for k, v in self._sums.items()}}
        self.points.append(point)
        self._sums, self._count = {}, 0
        return point

    def final(self) -> dict[str, float]:
        """Mean of the last logged window."""
        return {k: v for k, v in self.points[-1].items() if k != "step"} if self.points else {}


def edited_crops(crops: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """`crops` with each one replaced, with probability `fraction`, by a random edit of it."""
    picks = torch.randint(0, len(INSTRUCTIONS), (len(crops),), generator=generator)
    chosen = torch.rand(len(crops), generator=generator) < fraction
    result = crops.clone()
    for index in torch.nonzero(chosen).flatten().tolist():
        result[index] = INSTRUCTIONS[int(picks[index])].edit(crops[index])
    return result


def held_out_psnr(vae: Any, side: int = 128) -> dict[str, float]:
    """Reconstruction PSNR (dB) of the VAE on the held-out photos, resized to `side`."""
    scores = {}
    with torch.no_grad():
        for name in HELD_OUT_PHOTOS:
            photo = to_tensor(load_photo(name))[None]
            photo = torch.nn.functional.interpolate(
                photo, size=[side, side], mode="bilinear", antialias=True
            ).clamp(0, 1)
            latent = vae.encode(photo * 2 - 1).latent_dist.mode()
            decoded = (vae.decode(latent).sample.clamp(-1, 1) + 1) / 2
            mse = ((decoded - photo) ** 2).mean().item()
            scores[name] = round(10 * math.log10(1.0 / mse), 2)
    return scores


Progress = Callable[[str], None]


def train_vae(
    vae: Any, settings: VaeSettings, generator: torch.Generator, progress: Progress
) -> dict[str, Any]:
    """Stage 1; trains `vae` in place and returns its loss log and held-out PSNR."""
    crop_settings = CropSettings(size=settings.crop)
    levels = photo_pyramid(TRAINING_PHOTOS, crop_settings)
    latent_channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.bias[latent_channels:] = settings.initial_log_variance
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    log = LossLog(every=100)
    vae.train()
    started = time.perf_counter()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(
                step, settings.steps, settings.learning_rate, settings.warmup_steps
            )
        crops = random_crops(levels, settings.batch, crop_settings, generator)
        images = edited_crops(crops, settings.edited_fraction, generator) * 2 - 1
        posterior = vae.encode(images).latent_dist
        decoded = vae.decode(posterior.sample(generator=generator)).sample
        reconstruction = (decoded - images).abs().mean()
        kl = posterior.kl().mean() / images[0].numel()
        loss = reconstruction + settings.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        point = log.add(step, l1=reconstruction.item(), kl_per_pixel=kl.item())
        if point and point["step"] % 250 == 0:
            progress(
                f"  vae step {point['step']:>5}/{settings.steps}  l1 {point['l1']:.4f}  "
                f"kl/pixel {point['kl_per_pixel']:.3f}  {time.perf_counter() - started:.0f} s"
            )
    vae.eval()
    return {"losses": log.points, "final": log.final(), "held_out_psnr_db": held_out_psnr(vae)}


def encode_bank(
    vae: Any, settings: UnetSettings, generator: torch.Generator, batch: int = 8
) -> torch.Tensor:
    """Latent means of `bank_crops` crops and of each instruction's edit of them.

    Shape [crops, 1 + instructions, latent channels, crop / f, crop / f]; index 0 along
    the second axis is the unedited crop.
    """
    crop_settings = CropSettings(size=settings.crop)
    levels = photo_pyramid(TRAINING_PHOTOS, crop_settings)
    crops = random_crops(levels, settings.bank_crops, crop_settings, generator)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(crops), batch):
            originals = crops[start : start + batch]
            variants = [originals] + [instruction.edit(originals) for instruction in INSTRUCTIONS]
            stacked = torch.stack(variants, dim=1)  # [b, 1 + E, 3, H, W]
            flat = stacked.flatten(0, 1) * 2 - 1
            means = vae.encode(flat).latent_dist.mode()
            chunks.append(means.unflatten(0, stacked.shape[:2]))
    return torch.cat(chunks)


class ExponentialAverage:
    """An exponential moving average of a module's weights (what gets saved)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.average = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        # Shorter memory early on, so the average is not stuck at the initial weights.
        decay = min(self.decay, (1 + step) / (10 + step))
        for averaged, current in zip(self.average.parameters(), module.parameters(), strict=True):
            averaged.lerp_(current, 1.0 - decay)


def conditioning_drops(
    batch: int, settings: UnetSettings, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (text dropped, image dropped) for one batch."""
    draw = torch.rand(batch, generator=generator)
    text_only = draw < settings.drop_text
    image_only = (draw >= settings.drop_text) & (draw < settings.drop_text + settings.drop_image)
    both = (draw >= settings.drop_text + settings.drop_image) & (
        draw < settings.drop_text + settings.drop_image + settings.drop_both
    )
    return text_only | both, image_only | both


def _batches(
    bank: torch.Tensor, batch: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless (input latent, edited latent, instruction index) batches from the bank."""
    while True:
        crops = torch.randint(0, bank.shape[0], (batch,), generator=generator)
        instructions = torch.randint(0, len(INSTRUCTIONS), (batch,), generator=generator)
        yield bank[crops, 0], bank[crops, 1 + instructions], instructions


def prompt_token_ids(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """Token ids of prompts, padded to the tokenizer's length as the pipeline pads them."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def train_unet(
    unet: Any,
    text_encoder: Any,
    tokenizer: Any,
    bank: torch.Tensor,
    scaling_factor: float,
    settings: UnetSettings,
    generator: torch.Generator,
    progress: Progress,
) -> tuple[Any, Any, dict[str, Any]]:
    """Stage 2; returns the weight-averaged UNet and text encoder, and the loss log.

    The text encoder trains with the UNet: a random CLIP gives the instructions hidden
    states too alike (cosine 0.94..0.99, the padding positions dominate) for the UNet to
    tell them apart within the budget.
    """
    from diffusers import DDPMScheduler

    schedule = DDPMScheduler.from_config(PIX2PIX_SCHEDULER)
    alphas_cumprod = schedule.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    # Row 0: the empty prompt, the unconditional text of classifier-free guidance.
    token_ids = prompt_token_ids(tokenizer, ["", *(item.prompt for item in INSTRUCTIONS)])
    models = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    models.requires_grad_(True)
    optimizer = torch.optim.AdamW(models.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    average = ExponentialAverage(models, settings.ema_decay)
    log = LossLog(every=100)
    models.train()
    batches = _batches(bank, settings.batch, generator)
    timesteps_total = schedule.config.num_train_timesteps
    started = time.perf_counter()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(
                step, settings.steps, settings.learning_rate, settings.warmup_steps
            )
        image_latents, edited_latents, instructions = next(batches)
        target = edited_latents * scaling_factor
        noise = torch.randn(target.shape, generator=generator)
        timesteps = torch.randint(0, timesteps_total, (settings.batch,), generator=generator)
        noisy = schedule.add_noise(target, noise, timesteps)
        drop_text, drop_image = conditioning_drops(settings.batch, settings, generator)
        # All prompts in one text-encoder call; a dropped text reads the empty prompt.
        hidden_states = text_encoder(token_ids)[0]
        text = hidden_states[torch.where(drop_text, 0, 1 + instructions)]
        # Unscaled latent means, as the pipeline conditions on; zeros when dropped.
        image_latents = image_latents * (~drop_image).view(-1, 1, 1, 1)
        prediction = unet(torch.cat([noisy, image_latents], dim=1), timesteps, text).sample
        weights = snr[timesteps].clamp(max=settings.snr_gamma) / snr[timesteps]
        per_example = ((prediction - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (weights * per_example).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        optimizer.step()
        average.update(models, step)
        point = log.add(step, weighted_mse=loss.item(), mse=per_example.mean().item())
        if point and point["step"] % 250 == 0:
            progress(
                f"  unet step {point['step']:>5}/{settings.steps}  "
                f"weighted mse {point['weighted_mse']:.4f}  mse {point['mse']:.4f}  "
                f"{time.perf_counter() - started:.0f} s"
            )
    averaged = average.average
    return averaged["unet"], averaged["text_encoder"], {"losses": log.points, "final": log.final()}
