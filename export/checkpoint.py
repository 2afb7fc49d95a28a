"""Recognises and loads the diffusers folders we serve, real checkpoints and presets alike.

A supported folder is a Stable Diffusion pipeline (1.x, 2.x or any other sizes of that
family) in diffusers layout, with weights in safetensors, whose UNet takes twice the VAE's
latent channels (InstructPix2Pix: noise and image latents; 8 for SD) or as many
(img2img), and cross-attends to the text encoder's hidden states. A preset root holding
`instruct-pix2pix/` and `img2img/` is accepted as both pipelines at once. Anything else
fails with one line naming what is wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from export.components import ModelDimensions
from export.sample_inputs import CheckpointInputs

PIX2PIX = "instruct_pix2pix"
IMG2IMG = "img2img"
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")
# Defaults of diffusers' UNet2DConditionModel and AutoencoderKL for keys a config may omit.
DEFAULT_CHANNELS = 4
DEFAULT_CROSS_ATTENTION_DIM = 1280
SD_TRAINED_IMAGE_SIDE = 512
# The classes diffusers' Stable Diffusion pipelines are built from (model_index.json);
# others export something else (a tiny VAE's encoder gives no distribution, a text
# encoder with a projection one pooled vector per prompt).
COMPONENT_CLASSES = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
}
# UNet blocks that upsample to twice the input instead of to the skip's size: at an odd
# latent side (an image side that is an odd multiple of the VAE factor) they fail, in
# diffusers too.
ODD_SIDE_BLOCKS = (
    "ResnetDownsampleBlock2D",
    "SimpleCrossAttnDownBlock2D",
    "ResnetUpsampleBlock2D",
    "SimpleCrossAttnUpBlock2D",
)
# A weights file: name[.variant][-00001-of-00002].safetensors
WEIGHTS_FILE = re.compile(r"^[^.]+(?:\.(?P<variant>[^.-]+))?(?:-\d+-of-\d+)?\.safetensors$")


class UnsupportedCheckpointError(ValueError):
    """The folder is not a pipeline this project can export; the message says why."""


@dataclass(frozen=True)
class PipelineFolder:
    """A diffusers folder recognised as one of the served pipelines."""

    path: Path
    pipeline: str  # PIX2PIX or IMG2IMG
    # The weights' variant ("fp16": diffusion_pytorch_model.fp16.safetensors) where a
    # component has only those files, as diffusers' variant downloads have.
    variant: str | None = None

    def config(self, component: str) -> dict[str, Any]:
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        return json.loads((self.path / component / name).read_text())

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
            "supported: Stable Diffusion 1.x/2.x-style InstructPix2Pix and img2img"
        )
    for component in REQUIRED_COMPONENTS:
        if not (path / component).is_dir():
            raise UnsupportedCheckpointError(f"{path}: component '{component}' is missing")
    for component, expected in COMPONENT_CLASSES.items():
        entry = index.get(component)
        if isinstance(entry, list) and len(entry) == 2 and entry[1] not in (expected, None):
            raise UnsupportedCheckpointError(
                f"{path}: {component} is {entry[1]}; supported: {expected}"
            )
    variant = _weights_variant(path)
    unet = json.loads((path / "unet" / "config.json").read_text())
    if unet.get("cross_attention_dim") == 2048:
        raise UnsupportedCheckpointError(
            f"{path}: unet is conditioned like SDXL; supported: Stable Diffusion 1.x/2.x-style"
        )
    pipeline = _pipeline_of_unet(path, unet)
    _check_unet_inputs(path, unet, pipeline)
    _check_cross_attention(path, unet)
    text_encoder = json.loads((path / "text_encoder" / "config.json").read_text())
    if text_encoder.get("use_attention_mask"):
        raise UnsupportedCheckpointError(
            f"{path}: text_encoder masks the prompt's padding (use_attention_mask true); "
            "supported: a text encoder that attends to every token, as Stable Diffusion's"
        )
    return PipelineFolder(path=path, pipeline=pipeline, variant=variant)


def _weights_variant(path: Path) -> str | None:
    """The variant diffusers must be told to load (None: the plain files), checking that
    every weighted component has safetensors weights."""
    # The variants of each component that has no plain weights file.
    only: dict[str, set[str]] = {}
    for component in WEIGHTED_COMPONENTS:
        folder = path / component
        names = sorted(p.name for p in folder.glob("*.safetensors"))
        if not names:
            pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
                p.name for p in folder.glob("*.ckpt")
            )
            found = f"found only {', '.join(pickles)}" if pickles else "no weight file"
            raise UnsupportedCheckpointError(
                f"{path}: {component} weights load from safetensors only ({found})"
            )
        kinds = {match["variant"] for name in names if (match := WEIGHTS_FILE.match(name))}
        if kinds and None not in kinds:
            only[component] = kinds
    if not only:
        return None
    # diffusers loads the one variant it is given for every component that has it.
    common = set.intersection(*only.values())
    if not common:
        found = "; ".join(f"{c}: {', '.join(sorted(v))}" for c, v in only.items())
        raise UnsupportedCheckpointError(
            f"{path}: no weights variant common to the components without plain weights "
            f"({found}); supported: plain weights, or one variant every such component has"
        )
    return "fp16" if "fp16" in common else min(common)


def _check_unet_inputs(path: Path, unet: dict[str, Any], pipeline: str) -> None:
    """The UNet takes what the served pipelines give it: latents, a timestep and the
    prompt's hidden states, at any latent side."""
    if unet.get("addition_embed_type"):
        raise UnsupportedCheckpointError(
            f"{path}: unet takes added embeddings (addition_embed_type "
            f"{unet['addition_embed_type']!r}), which Stable Diffusion 1.x/2.x pipelines do "
            "not give"
        )
    if unet.get("class_embed_type") or unet.get("num_class_embeds"):
        raise UnsupportedCheckpointError(
            f"{path}: unet takes class labels (class_embed_type / num_class_embeds), which "
            "the InstructPix2Pix and img2img pipelines do not give"
        )
    if unet.get("time_cond_proj_dim") and pipeline == IMG2IMG:
        # diffusers' img2img then embeds the guidance scale in place of guiding.
        raise UnsupportedCheckpointError(
            f"{path}: unet takes a guidance embedding (time_cond_proj_dim, as LCM-distilled "
            "UNets do); supported: classifier-free guidance"
        )
    blocks = [*unet.get("down_block_types", ()), *unet.get("up_block_types", ())]
    if odd := sorted({block for block in blocks if block in ODD_SIDE_BLOCKS}):
        raise UnsupportedCheckpointError(
            f"{path}: unet has {', '.join(odd)} blocks, which fail at odd latent sides "
            "(in diffusers too); supported: Stable Diffusion's Down/Up blocks"
        )


def _pipeline_of_unet(path: Path, unet: dict[str, Any]) -> str:
    """Which served pipeline a UNet belongs to, from its channels and the VAE's."""
    vae = json.loads((path / "vae" / "config.json").read_text())
    latent = int(vae.get("latent_channels", DEFAULT_CHANNELS))
    in_channels = int(unet.get("in_channels", DEFAULT_CHANNELS))
    out_channels = int(unet.get("out_channels", DEFAULT_CHANNELS))
    pipelines = {2 * latent: PIX2PIX, latent: IMG2IMG}
    if in_channels not in pipelines:
        raise UnsupportedCheckpointError(
            f"{path}: unet has {in_channels} input channels; supported: {2 * latent} "
            f"(InstructPix2Pix) or {latent} (img2img) with a VAE of {latent} latent channels"
        )
    if out_channels != latent:
        raise UnsupportedCheckpointError(
            f"{path}: unet predicts {out_channels} channels but the VAE has {latent} "
            "latent channels; they must agree"
        )
    return pipelines[in_channels]


def _check_cross_attention(path: Path, unet: dict[str, Any]) -> None:
    """The UNet attends to the text encoder's hidden states: their widths must agree."""
    text_width = int(json.loads((path / "text_encoder" / "config.json").read_text())["hidden_size"])
    # diffusers allows one width per block, and a projection from `encoder_hid_dim` first.
    width = unet.get("encoder_hid_dim") or unet.get(
        "cross_attention_dim", DEFAULT_CROSS_ATTENTION_DIM
    )
    widths = set(width) if isinstance(width, list) else {width}
    if widths != {text_width}:
        shown = ", ".join(str(width) for width in sorted(widths))
        raise UnsupportedCheckpointError(
            f"{path}: unet cross-attention width {shown} differs from the text encoder's "
            f"hidden size {text_width}; they must agree"
        )


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


def model_dimensions(folder: PipelineFolder, pipeline: Any) -> ModelDimensions:
    """The shapes of a loaded pipeline's components, from the configs diffusers loaded.

    The prompt length is the tokenizer's: diffusers pads and truncates every prompt to
    `tokenizer.model_max_length`, and a server must feed the text encoder the same tokens.
    It may be shorter than the text encoder's `max_position_embeddings`, never longer.
    """
    text = pipeline.text_encoder.config
    tokenizer = pipeline.tokenizer
    if len(tokenizer) > text.vocab_size:
        raise UnsupportedCheckpointError(
            f"{folder.path}: the tokenizer has {len(tokenizer)} tokens but the text encoder "
            f"embeds only {text.vocab_size}"
        )
    if tokenizer.model_max_length > text.max_position_embeddings:
        raise UnsupportedCheckpointError(
            f"{folder.path}: the tokenizer pads prompts to {tokenizer.model_max_length} tokens "
            f"but the text encoder has {text.max_position_embeddings} positions"
        )
    return ModelDimensions(
        text_vocab_size=int(text.vocab_size),
        text_hidden_size=int(text.hidden_size),
        text_max_length=int(tokenizer.model_max_length),
        latent_channels=int(pipeline.vae.config.latent_channels),
        # 2 ** (number of VAE blocks - 1)
        vae_scale_factor=int(pipeline.vae_scale_factor),
        unet_sample_size=_trained_latent_side(pipeline),
    )


def _trained_latent_side(pipeline: Any) -> int:
    """The UNet's `sample_size`: the latent side it was trained at."""
    side = pipeline.unet.config.sample_size
    if side is None:  # optional in diffusers; Stable Diffusion 1.x trained at 512 pixels
        return SD_TRAINED_IMAGE_SIDE // pipeline.vae_scale_factor
    return int(max(side) if isinstance(side, list | tuple) else side)


Shared = TypeVar("Shared")


def shared_from(by_pipeline: Mapping[str, Shared]) -> Shared:
    """Of one entry per pipeline (folder, diffusers pipeline), the one whose text encoder,
    tokenizer and VAE the export serves to both: InstructPix2Pix's where there is one."""
    return by_pipeline.get(PIX2PIX) or next(iter(by_pipeline.values()))


def checkpoint_inputs(
    folders: dict[str, PipelineFolder], pipelines: dict[str, Any]
) -> CheckpointInputs:
    """Dimensions, token ids and timesteps shared by the loaded pipelines of one export."""
    dims = {name: model_dimensions(folders[name], pipeline) for name, pipeline in pipelines.items()}
    first = next(iter(dims.values()))
    if any(other != first for other in dims.values()):
        raise UnsupportedCheckpointError(
            "the two pipelines have different component shapes: "
            + "; ".join(f"{name} {value}" for name, value in dims.items())
        )
    # The export ships this pipeline's tokenizer (export.onnx_export copies it).
    tokenizer = shared_from(pipelines).tokenizer
    return CheckpointInputs(
        dims=first,
        bos_token_id=int(tokenizer.bos_token_id),
        eos_token_id=int(tokenizer.eos_token_id),
        pad_token_id=int(tokenizer.pad_token_id),
        num_train_timesteps=min(
            int(pipeline.scheduler.config.num_train_timesteps) for pipeline in pipelines.values()
        ),
    )


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
        variant=folder.variant,
        use_safetensors=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
