"""Randomly initialised presets of the real architectures, written as diffusers folders.

No weights can be downloaded on build machines, so tests and benchmarks run on models
built here from a seed. A preset is a folder holding two diffusers pipelines that share
one text encoder, tokenizer and VAE, as the real checkpoints do:

    <output>/instruct-pix2pix/   UNet with 8 input channels, Euler-ancestral scheduler
    <output>/img2img/            UNet with 4 input channels, SD 1.5's PNDM scheduler

Usage: python -m export.presets {tiny,small,sd15} --output DIR [--seed N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.folders import make_empty, read_record
from export.tokenizer import END_OF_TEXT, VOCAB_SIZE, save_clip_tokenizer

PIX2PIX_FOLDER = "instruct-pix2pix"
IMG2IMG_FOLDER = "img2img"
# Written last into a preset's root: which preset, its seed and its weights' digests.
PRESET_RECORD = "preset.json"
# torch.manual_seed takes a signed 64-bit seed.
MAX_SEED = 2**63 - 1

# timbrooks/instruct-pix2pix's scheduler/scheduler_config.json
PIX2PIX_SCHEDULER = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "trained_betas": None,
}

# Stable Diffusion 1.5's scheduler/scheduler_config.json
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


@dataclass(frozen=True)
class Preset:
    """Component configurations of one preset.

    The UNets' channels follow the VAE's latent channels: twice as many in for
    InstructPix2Pix (noise and image latents), as many in for img2img, as many out for both.
    The tokenizer's vocabulary size is the text encoder's.
    """

    name: str
    description: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    tokenizer_max_length: int = 77
    pad_token: str = END_OF_TEXT


_SD_BLOCKS = {
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}
_VAE_BLOCKS = {
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "in_channels": 3,
    "out_channels": 3,
    "scaling_factor": 0.18215,
}
# CLIP ViT-L/14's text tower as Stable Diffusion 1.5 ships it (legacy special token ids).
_CLIP_TEXT = {
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "layer_norm_eps": 1e-5,
}

# The real width and depth: CLIP ViT-L/14's text tower.
_VIT_L14_TEXT = {
    **_CLIP_TEXT,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        description="diffusers' pipeline-test sizes: builds and runs in seconds",
        unet={
            "block_out_channels": [32, 64],
            "layers_per_block": 2,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
            "sample_size": 32,
        },
        # Four blocks keep the real downsampling factor of 8 at a tiny width.
        vae={**_VAE_BLOCKS, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1},
        text_encoder={
            **_CLIP_TEXT,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 5,
            "projection_dim": 32,
        },
    ),
    "small": Preset(
        name="small",
        description="CPU benchmark size: ~150M UNet parameters, CLIP width 768",
        unet={
            **_SD_BLOCKS,
            "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "sample_size": 32,
        },
        vae={**_VAE_BLOCKS, "block_out_channels": [64, 128, 256, 256], "layers_per_block": 2},
        text_encoder=_VIT_L14_TEXT,
    ),
    "sd15": Preset(
        name="sd15",
        description="the true Stable Diffusion 1.5 component shapes (UNet 860M parameters)",
        unet={
            **_SD_BLOCKS,
            "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "sample_size": 64,
        },
        vae={
            **_VAE_BLOCKS,
            "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2,
            "sample_size": 512,
        },
        text_encoder=_VIT_L14_TEXT,
    ),
}


def build_preset(name: str, output: Path, seed: int = 0) -> dict[str, str]:
    """Writes the named preset's two pipelines under `output`; returns a weights hash each.

    The same name and seed always give byte-identical weight files.
    """
    return write_pipelines(PRESETS[name], output, seed)


def write_pipelines(preset: Preset, output: Path, seed: int = 0) -> dict[str, str]:
    """Writes a preset's two pipelines and `preset.json` under `output`; returns weight hashes."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerAncestralDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInstructPix2PixPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    del DDIMScheduler  # imported so a missing diffusers fails here, not mid-build
    torch.manual_seed(seed)
    # Components are created in a fixed order from one seeded generator stream.
    text_encoder = CLIPTextModel(CLIPTextConfig(**preset.text_encoder)).eval()
    vae = AutoencoderKL(**preset.vae).eval()
    latent = vae.config.latent_channels
    unet_pix2pix = UNet2DConditionModel(**preset.unet, in_channels=2 * latent, out_channels=latent)
    unet_img2img = UNet2DConditionModel(**preset.unet, in_channels=latent, out_channels=latent)

    make_empty(output, "a preset", PRESET_RECORD)
    tokenizer_dir = output / "_tokenizer"
    save_clip_tokenizer(
        tokenizer_dir,
        vocab_size=text_encoder.config.vocab_size,
        model_max_length=preset.tokenizer_max_length,
        pad_token=preset.pad_token,
    )
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)

    pipelines = {
        PIX2PIX_FOLDER: StableDiffusionInstructPix2PixPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet_pix2pix,
            scheduler=EulerAncestralDiscreteScheduler.from_config(PIX2PIX_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ),
        IMG2IMG_FOLDER: StableDiffusionImg2ImgPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet_img2img,
            scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ),
    }
    hashes = {}
    for folder, pipeline in pipelines.items():
        target = output / folder
        pipeline.save_pretrained(target, safe_serialization=True)
        hashes[folder] = weights_hash(target)
    shutil.rmtree(tokenizer_dir)
    (output / PRESET_RECORD).write_text(
        json.dumps({"preset": preset.name, "seed": seed, "weights_sha256": hashes}, indent=2) + "\n"
    )
    return hashes


def weights_hash(pipeline_dir: Path) -> str:
    """sha256 over every safetensors file of a diffusers folder, in path order."""
    digest = hashlib.sha256()
    for path in sorted(pipeline_dir.rglob("*.safetensors")):
        digest.update(path.relative_to(pipeline_dir).as_posix().encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def preset_record(output: Path) -> dict[str, Any] | None:
    """The preset record in `output`; None where there is none or it cannot be read."""
    return read_record(output / PRESET_RECORD)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", choices=sorted(PRESETS), help="which architecture sizes")
    parser.add_argument("--output", type=Path, required=True, help="folder to write")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if the folder holds this preset"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.seed <= MAX_SEED:
        parser.error(f"--seed {args.seed}: allowed 0..{MAX_SEED}")

    recorded = preset_record(args.output) or {}
    current = recorded.get("preset") == args.preset and recorded.get("seed") == args.seed
    if current and not args.force:
        for folder, digest in recorded.get("weights_sha256", {}).items():
            print(f"{args.preset} preset up to date: {args.output / folder}  sha256 {digest}")
        return 0
    started = time.perf_counter()
    try:
        hashes = build_preset(args.preset, args.output, args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    for folder, digest in hashes.items():
        print(f"{args.preset} preset (seed {args.seed}): {args.output / folder}  sha256 {digest}")
    print(f"built in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
