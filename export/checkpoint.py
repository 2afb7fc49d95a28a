"""Recognises and loads the diffusers folders we serve, real checkpoints and presets alike.

A supported folder is a Stable Diffusion 1.x pipeline in diffusers layout whose UNet takes
8 input channels (InstructPix2Pix) or 4 (img2img), with weights in safetensors. A preset
root holding `instruct-pix2pix/` and `img2img/` is accepted as both pipelines at once.
Anything else fails with one line naming what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.components import ModelDimensions

PIX2PIX = "instruct_pix2pix"
IMG2IMG = "img2img"
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")
UNET_CHANNELS = {8: PIX2PIX, 4: IMG2IMG}


class UnsupportedCheckpointError(ValueError):
    """The folder is not a pipeline this project can export; the message says why."""


@dataclass(frozen=True)
class PipelineFolder:
    """A diffusers folder recognised as one of the served pipelines."""

    path: Path
    pipeline: str  # PIX2PIX or IMG2IMG

    def config(self, component: str) -> dict[str, Any]:
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        return json.loads((self.path / component / name).read_text())

    def dimensions(self) -> ModelDimensions:
        text = self.config("text_encoder")
        vae = self.config("vae")
        return ModelDimensions(
            text_hidden_size=int(text["hidden_size"]),
            text_max_length=int(text.get("max_position_embeddings", 77)),
            latent_channels=int(vae.get("latent_channels", 4)),
            vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
        )

    def vae_scaling_factor(self) -> float:
        return float(self.config("vae").get("scaling_factor", 0.18215))


def inspect_folder(path: Path) -> PipelineFolder:
    """Checks one diffusers folder; raises UnsupportedCheckpointError with the reason."""
    path = Path(path)
    if not path.is_dir():
        raise UnsupportedCheckpointError(f"{path}: no such folder")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UnsupportedCheckpointError(
            f"{path}: not a diffusers pipeline folder (no model_index.json)"
        )
    index = json.loads(index_file.read_text())
    class_name = str(index.get("_class_name", ""))
    if "XL" in class_name or "text_encoder_2" in index or (path / "text_encoder_2").exists():
        raise UnsupportedCheckpointError(
            f"{path}: {class_name or 'this checkpoint'} is an SDXL pipeline; "
            "supported: Stable Diffusion 1.x InstructPix2Pix and img2img"
        )
    for component in REQUIRED_COMPONENTS:
        if not (path / component).is_dir():
            raise UnsupportedCheckpointError(f"{path}: component '{component}' is missing")
    for component in WEIGHTED_COMPONENTS:
        folder = path / component
        if not any(folder.glob("*.safetensors")):
            pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
                p.name for p in folder.glob("*.ckpt")
            )
            found = f"found only {', '.join(pickles)}" if pickles else "no weight file"
            raise UnsupportedCheckpointError(
                f"{path}: {component} weights load from safetensors only ({found})"
            )
    unet = json.loads((path / "unet" / "config.json").read_text())
    channels = int(unet.get("in_channels", -1))
    if channels not in UNET_CHANNELS:
        raise UnsupportedCheckpointError(
            f"{path}: unet has {channels} input channels; supported: "
            "8 (InstructPix2Pix) or 4 (img2img)"
        )
    if unet.get("addition_embed_type") or unet.get("cross_attention_dim") == 2048:
        raise UnsupportedCheckpointError(
            f"{path}: unet is conditioned like SDXL; supported: Stable Diffusion 1.x"
        )
    return PipelineFolder(path=path, pipeline=UNET_CHANNELS[channels])


def discover_pipelines(paths: list[Path]) -> dict[str, PipelineFolder]:
    """Maps each served pipeline to its folder; a preset root yields both pipelines."""
    folders: list[PipelineFolder] = []
    for path in paths:
        path = Path(path)
        if not (path / "model_index.json").exists() and path.is_dir():
            children = sorted(p for p in path.iterdir() if (p / "model_index.json").is_file())
            if children:
                folders.extend(inspect_folder(child) for child in children)
                continue
        folders.append(inspect_folder(path))
    found: dict[str, PipelineFolder] = {}
    for folder in folders:
        if folder.pipeline in found:
            raise UnsupportedCheckpointError(
                f"two {folder.pipeline} pipelines given: {found[folder.pipeline].path} "
                f"and {folder.path}"
            )
        found[folder.pipeline] = folder
    return found


def load_pipeline(folder: PipelineFolder, dtype: Any = None) -> Any:
    """Loads the diffusers reference pipeline of a folder (safetensors only), on CPU."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInstructPix2PixPipeline

    cls = (
        StableDiffusionInstructPix2PixPipeline
        if folder.pipeline == PIX2PIX
        else StableDiffusionImg2ImgPipeline
    )
    pipeline = cls.from_pretrained(
        folder.path,
        torch_dtype=dtype or torch.float32,
        use_safetensors=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
