"""The systems Triton is measured against, run in this process on the same request.

- `DiffusersEager`: diffusers' StableDiffusionInstructPix2PixPipeline (or Img2Img) in
  eager PyTorch, loaded once, in fp32 and on a CPU also in bf16: what users run today;
  and the fp32 pipeline with the DeepCache package's helper (`DiffusersDeepCache`), the
  published way to reuse UNet work.
- `BareLoop`: the served pipeline code (edit_pipeline/pipeline.py) on the same ONNX
  files in onnxruntime sessions (or OpenVINO compiled models, for the openvino flavours)
  built as the served models build theirs, with plain function calls instead of Triton:
  the gap to it is serving overhead.
- `ServedEdit`: another served configuration (`--served FLAVOUR:PRECISION`), through the
  client library, one edit at a time.

All take the uploaded PNG bytes and return PNG bytes, as the edit model does, so every
system does the same work: decode and resize, tokenize, encode, denoise, decode, PNG.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.bare_loop import InProcessComponents
from benchmarks.settings import BenchConfig
from edit_pipeline.batching import Runnable
from edit_pipeline.onnxruntime_component import OnnxComponent
from edit_pipeline.openvino_component import OpenVinoComponent, bf16_unsupported_reason
from edit_pipeline.pipeline import EditPipeline
from edit_pipeline.postprocess import encode_png
from edit_pipeline.preprocess import PromptTokenizer, decode_image
from edit_pipeline.sampler import make_scheduler
from export.checkpoint import inspect_folder, load_pipeline
from export.onnx_export import load_manifest
from export.presets import IMG2IMG_FOLDER, PIX2PIX_FOLDER
from model_repository.builder import (
    pipeline_settings,
    prepare_openvino_export,
    served_model_file,
)
from model_repository.chain import BuiltModel
from model_repository.configs import OPENVINO_FLAVOURS
from pix2pix_client import EditClient
from pix2pix_client.contract import INSTRUCT_PIX2PIX

PIPELINE_FOLDER = {INSTRUCT_PIX2PIX: PIX2PIX_FOLDER, "img2img": IMG2IMG_FOLDER}
DIFFUSERS_FP32 = "diffusers_eager"
DEEPCACHE_PREFIX = f"{DIFFUSERS_FP32}_deepcache"
Baseline = Callable[[bytes], bytes]


class ProviderUnavailable(RuntimeError):
    """onnxruntime lists an execution provider that a session then could not load."""


class DiffusersEager:
    """diffusers' reference pipeline in eager PyTorch, loaded once."""

    def __init__(
        self, preset_root: Path, config: BenchConfig, device: str = "cpu", dtype: Any = None
    ) -> None:
        if config.pipeline == INSTRUCT_PIX2PIX and config.temperature != 1.0:
            raise ValueError("diffusers has no temperature below 1.0 for InstructPix2Pix")
        dtype = dtype or (torch.float16 if config.options.precision == "fp16" else torch.float32)
        self.name = f"{DIFFUSERS_FP32}_bf16" if dtype == torch.bfloat16 else DIFFUSERS_FP32
        self.config = config
        folder = inspect_folder(preset_root / PIPELINE_FOLDER[config.pipeline])
        self.pipeline = load_pipeline(folder, dtype).to(device)
        if config.scheduler is not None:
            self.pipeline.scheduler = make_scheduler(
                config.scheduler, dict(self.pipeline.scheduler.config)
            )

    def __call__(self, image: bytes) -> bytes:
        request = self.config.request()
        arguments = {
            "num_inference_steps": request["num_inference_steps"],
            "guidance_scale": request["guidance_scale"],
            "negative_prompt": request["negative_prompt"] or None,
            "generator": torch.Generator("cpu").manual_seed(request["seed"]),
        }
        if self.config.pipeline == INSTRUCT_PIX2PIX:
            arguments["image_guidance_scale"] = request["image_guidance_scale"]
        else:
            arguments["strength"] = request["temperature"]
        # The same decoding and resizing as the served edit model.
        result = self.pipeline(request["prompt"], image=decode_image(image), **arguments)
        return encode_png(result.images[0])


class DiffusersDeepCache:
    """An eager pipeline with DeepCache's `DeepCacheSDHelper` around its UNet for each of
    this system's edits (a full pass every `cache_interval` steps): the same weights as
    the plain system, not a second copy (at SD 1.5 size, 4 GB in fp32)."""

    def __init__(self, eager: DiffusersEager, cache_interval: int) -> None:
        from DeepCache import DeepCacheSDHelper

        self.name = f"{DEEPCACHE_PREFIX}{cache_interval}"
        self.eager = eager
        self.helper = DeepCacheSDHelper(pipe=eager.pipeline)
        # Branch 0, uniform: the package's defaults, as its README runs SD 1.5.
        self.helper.set_params(cache_interval=cache_interval, cache_branch_id=0)

    def __call__(self, image: bytes) -> bytes:
        self.helper.enable()
        try:
            return self.eager(image)
        finally:
            self.helper.disable()


class BareLoop:
    """The served pipeline as plain calls: same files, component settings and code."""

    def __init__(
        self,
        export_dir: Path,
        config: BenchConfig,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
    ) -> None:
        manifest = load_manifest(export_dir)
        options = config.options
        settings = pipeline_settings(manifest, config.pipeline, options)
        openvino = options.flavour in OPENVINO_FLAVOURS
        self.name = f"bare_openvino_{options.precision}" if openvino else "bare_onnxruntime"
        if openvino:
            prepare_openvino_export(export_dir, options)

        def session(component: str) -> Runnable:
            path = served_model_file(export_dir, component, options)
            if openvino:
                return OpenVinoComponent(
                    path, options.precision, options.intra_op_threads, options.openvino_streams
                )
            return OnnxComponent(
                path, options.intra_op_threads, options.allow_spinning, providers=providers
            )

        # With the CUDA provider the loop's tensors stay on the GPU, as in the served edit
        # model. What the session got, not what was asked: onnxruntime falls back to the
        # CPU, with a warning only, when the CUDA provider cannot load.
        unet = session(settings.components["unet"]["model"])
        on_gpu = not openvino and "CUDAExecutionProvider" in unet.session.get_providers()
        if "CUDAExecutionProvider" in providers and not on_gpu:
            raise ProviderUnavailable("onnxruntime could not load its CUDA provider")
        device = "cuda" if on_gpu else "cpu"
        self.components = InProcessComponents(settings.components, session, device)
        self.pipeline = EditPipeline(
            settings,
            json.loads((export_dir / manifest["schedulers"][config.pipeline]).read_text()),
            PromptTokenizer(export_dir / manifest["tokenizer"]),
            self.components,
            device,
        )
        self.config = config

    def __call__(self, image: bytes) -> bytes:
        edit = self.pipeline.prepare({"image": image, **self.config.request()})
        return self.pipeline.run(edit).png

    def preview_cost(self, image: bytes, repeats: int = 20) -> PreviewCost:
        """A latent preview against a UNet step, on this edit's latents, in this process."""
        self.components.unet_seconds.clear()
        edit = self.pipeline.prepare({"image": image, **self.config.request()})
        latents: list[torch.Tensor] = []
        self.pipeline.run(edit, on_step=lambda step, steps, current: latents.append(current))
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            self.pipeline.preview(edit, latents[-1])
            seconds.append(time.perf_counter() - started)
        return PreviewCost(
            preview_ms=statistics.median(seconds) * 1000,
            unet_step_ms=statistics.median(self.components.unet_seconds) * 1000,
        )


@dataclass(frozen=True)
class PreviewCost:
    preview_ms: float
    unet_step_ms: float

    @property
    def share(self) -> float:
        return self.preview_ms / self.unet_step_ms


class ServedEdit:
    """Another served configuration, timed through the client like the in-process ones."""

    def __init__(self, url: str, config: BenchConfig) -> None:
        self.name = config.served_name
        self.config = config
        self.client = EditClient(url, timeout_s=900)

    def __call__(self, image: bytes) -> bytes:
        options = self.config.request()
        prompt = options.pop("prompt")
        return self.client.edit(image, prompt, model=self.config.pipeline, **options).png


def load_baselines(config: BenchConfig, built: BuiltModel, notes: list[str]) -> dict[str, Baseline]:
    """The in-process systems, loaded once; notes say why one is missing."""
    systems: list[Baseline] = []
    gpu = config.options.flavour == "tensorrt" or config.options.precision == "fp16"
    providers = ("CUDAExecutionProvider",) if gpu else ("CPUExecutionProvider",)
    try:
        systems.append(BareLoop(built.export_dir, config, providers))
    except ProviderUnavailable as error:
        notes.append(f"The bare loop was skipped: {error}.")
    try:
        device = "cuda" if gpu else "cpu"
        eager = DiffusersEager(built.weights, config, device)
        systems.append(eager)
        if not gpu and (reason := bf16_unsupported_reason()) is None:
            systems.append(DiffusersEager(built.weights, config, device, torch.bfloat16))
        elif not gpu:
            # Emulated, PyTorch's bf16 is far slower than its fp32 (a small-preset UNet step
            # at 256x256 took 40 s on an AVX2 CPU, against 0.5 s): nobody would run it.
            notes.append(f"diffusers eager bf16 was left out: {reason}.")
        if config.deepcache_interval > 1:
            systems.append(DiffusersDeepCache(eager, config.deepcache_interval))
    except ValueError as error:
        notes.append(f"The diffusers baseline was skipped: {error}.")
    return {system.name: system for system in systems}  # type: ignore[attr-defined]
