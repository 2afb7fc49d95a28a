"""The two systems Triton is measured against, run in this process on the same request.

- `DiffusersEager`: diffusers' StableDiffusionInstructPix2PixPipeline (or Img2Img) in
  eager PyTorch, loaded once: what users run today.
- `BareOnnxLoop`: the served ONNX files in onnxruntime sessions built exactly as the
  served models build theirs (OnnxComponent), the same preprocessing and the same
  Sampler, with plain function calls instead of Triton: the gap to it is serving overhead.

Both take the uploaded PNG bytes and return PNG bytes, like the ensemble, so all three
do the same work: decode and resize, tokenize, encode, denoise, decode, encode PNG.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.config import BenchConfig
from export.components import TEXT_ENCODER, UNET_FOR_PIPELINE, VAE_DECODER, VAE_ENCODER
from export.onnx_export import load_manifest
from model_repository.onnx_component import OnnxComponent
from model_repository.postprocess import encode_png, tensor_to_image
from model_repository.preprocess import (
    PromptTokenizer,
    decode_image,
    image_to_tensor,
    resolve_request,
)
from model_repository.sampler import Sampler, SamplerInputs, make_scheduler
from pix2pix_client.contract import INSTRUCT_PIX2PIX

CPU = ("CPUExecutionProvider",)


class ProviderUnavailable(RuntimeError):
    """onnxruntime lists an execution provider that a session then could not load."""


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated runs of one system (after its warm-up)."""

    runs_s: tuple[float, ...]
    warmup_s: float

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.runs_s) * 1000

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.runs_s) * 1000

    @property
    def min_ms(self) -> float:
        return min(self.runs_s) * 1000

    def to_json(self) -> dict[str, Any]:
        return {
            "runs_ms": [round(s * 1000, 1) for s in self.runs_s],
            "warmup_ms": round(self.warmup_s * 1000, 1),
            "p50_ms": round(self.p50_ms, 1),
            "mean_ms": round(self.mean_ms, 1),
            "min_ms": round(self.min_ms, 1),
        }


# --------------------------------------------------------------------------- diffusers


class DiffusersEager:
    """diffusers' reference pipeline in eager PyTorch, loaded once."""

    def __init__(self, pipeline_dir: Path, config: BenchConfig, device: str = "cpu") -> None:
        from export.checkpoint import inspect_folder, load_pipeline

        if config.pipeline == INSTRUCT_PIX2PIX and config.temperature != 1.0:
            raise ValueError("diffusers has no temperature below 1.0 for InstructPix2Pix")
        dtype = torch.float16 if config.precision == "fp16" else torch.float32
        self.config = config
        self.pipeline = load_pipeline(inspect_folder(pipeline_dir), dtype).to(device)
        if config.scheduler is not None:
            self.pipeline.scheduler = make_scheduler(
                config.scheduler, dict(self.pipeline.scheduler.config)
            )

    def __call__(self, image: bytes) -> bytes:
        request = self.config.request()
        arguments: dict[str, Any] = {
            "num_inference_steps": request["num_inference_steps"],
            "guidance_scale": request["guidance_scale"],
            "negative_prompt": request["negative_prompt"] or None,
            "generator": torch.Generator("cpu").manual_seed(request["seed"]),
        }
        if self.config.pipeline == INSTRUCT_PIX2PIX:
            arguments["image_guidance_scale"] = request["image_guidance_scale"]
        else:
            arguments["strength"] = request["temperature"]
        # The same decoding and resizing as the served preprocess model.
        result = self.pipeline(request["prompt"], image=decode_image(image), **arguments)
        return encode_png(result.images[0])


# --------------------------------------------------------------------------- bare loop


class BareOnnxLoop:
    """The served pipeline as plain calls: same files, sessions, preprocessing and sampler."""

    def __init__(
        self, export_dir: Path, config: BenchConfig, providers: tuple[str, ...] = CPU
    ) -> None:
        manifest = load_manifest(export_dir)
        self.config = config
        unet_name = UNET_FOR_PIPELINE[config.pipeline]

        def component(name: str) -> OnnxComponent:
            # The same session settings as the served component models.
            return OnnxComponent(
                export_dir / manifest["components"][name]["model"],
                config.intra_op_threads,
                config.allow_spinning,
                providers=providers,
            )

        self.text_encoder = component(TEXT_ENCODER)
        self.vae_encoder = component(VAE_ENCODER)
        self.vae_decoder = component(VAE_DECODER)
        self.unet = component(unet_name)
        self.tokenizer = PromptTokenizer(export_dir / manifest["tokenizer"])
        scheduler_config = json.loads(
            (export_dir / manifest["schedulers"][config.pipeline]).read_text()
        )
        scaling = manifest["pipelines"][config.pipeline]["vae_scaling_factor"]
        # With the CUDA provider the loop's tensors stay on the GPU, as in the served sampler.
        # What the session got, not what was asked: onnxruntime falls back to the CPU, with
        # a warning only, when the CUDA provider cannot load.
        on_gpu = "CUDAExecutionProvider" in self.unet.session.get_providers()
        if "CUDAExecutionProvider" in providers and not on_gpu:
            raise ProviderUnavailable("onnxruntime could not load its CUDA provider")
        device = "cuda" if on_gpu else "cpu"
        self.sampler = Sampler(config.pipeline, scheduler_config, scaling, self._unet, device)
        (noise_pred,) = manifest["components"][unet_name]["spec"]["outputs"]
        self.latent_channels = int(noise_pred["dims"][1])

    def _unet(
        self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor
    ) -> torch.Tensor:
        noise_pred = torch.empty(
            (sample.shape[0], self.latent_channels, *sample.shape[2:]), device=sample.device
        )
        names = self.unet.input_names
        self.unet.run_bound(
            {names[0]: sample, names[1]: timestep, names[2]: embeds},
            {self.unet.output_names[0]: noise_pred},
        )
        return noise_pred

    def __call__(self, image: bytes) -> bytes:
        edit = resolve_request(self.config.pipeline, {"image": image, **self.config.request()})
        pixels = image_to_tensor(decode_image(image))
        input_ids = self.tokenizer([edit.prompt, edit.negative_prompt])
        (embeds,) = self.text_encoder.run({self.text_encoder.input_names[0]: input_ids}).values()
        mean, std = self.vae_encoder.run({self.vae_encoder.input_names[0]: pixels}).values()
        latent = self.sampler(
            SamplerInputs(
                prompt_embeds=embeds,
                latent_mean=mean,
                latent_std=std,
                num_inference_steps=edit.num_inference_steps,
                guidance_scale=edit.guidance_scale,
                image_guidance_scale=edit.image_guidance_scale,
                temperature=edit.temperature,
                seed=edit.seed,
                scheduler=edit.scheduler,
            )
        )
        (decoded,) = self.vae_decoder.run(
            {self.vae_decoder.input_names[0]: latent.cpu().numpy()}
        ).values()
        return encode_png(tensor_to_image(decoded))


def pixel_difference(a: bytes, b: bytes) -> dict[str, float]:
    """Max and mean absolute difference of two PNGs' uint8 pixels."""
    import io

    from PIL import Image

    first = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"), dtype=np.int16)
    second = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.int16)
    if first.shape != second.shape:
        return {"max_abs": float("nan"), "mean_abs": float("nan")}
    difference = np.abs(first - second)
    return {"max_abs": float(difference.max()), "mean_abs": float(difference.mean())}
