"""The toy InstructPix2Pix: the real diffusers / transformers classes at a size CPUs train.

Same component classes as timbrooks/instruct-pix2pix (a `UNet2DConditionModel` with 8
input channels, an `AutoencoderKL`, a `CLIPTextModel` with Stable Diffusion's CLIP
tokenizer), with these choices for a model trained in minutes on two CPU cores:

- VAE scale factor 4 (three blocks) instead of 8: a small VAE reconstructs photos far
  better at 12x compression than at 48x, and the serving side handles any power of two.
  No attention in the VAE's mid block: its cost grows with the square of the latent area
  (16384 positions at 512x512), and reconstruction is local.
- UNet with three levels; self- and cross-attention only at the two lower ones, where a
  512x512 input has 64x64 and 32x32 positions. The full-resolution level is convolutional.
- The CLIP text tower is narrow (width 32): its token table (49408 x 32) is the largest
  tensor of the model. It trains with the UNet (see `train.train_unet` for why).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.tokenizer import VOCAB_SIZE, save_clip_tokenizer

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 77,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    # Stable Diffusion 1.5's legacy special token ids.
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "mid_block_add_attention": False,
    "sample_size": 64,
    # Replaced after training by 1 / std of the training latents, as Stable Diffusion did.
    "scaling_factor": 1.0,
}

UNET_CONFIG: dict[str, Any] = {
    "in_channels": 8,
    "out_channels": 4,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": TEXT_ENCODER_CONFIG["hidden_size"],
    # diffusers reads this legacy name as the number of heads: 2 heads of width 32.
    "attention_head_dim": 2,
    "norm_num_groups": 16,
    "sample_size": 16,
}

# Latent side / image side, from the VAE's number of blocks.
VAE_SCALE_FACTOR = 2 ** (len(VAE_CONFIG["block_out_channels"]) - 1)


@dataclass
class ToyComponents:
    """The four parts of the pipeline, freshly initialised."""

    text_encoder: Any
    tokenizer: Any
    vae: Any
    unet: Any


def build_components(seed: int) -> ToyComponents:
    """Initialises the text encoder, VAE and UNet from `seed`, in that fixed order."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    with tempfile.TemporaryDirectory() as directory:
        save_clip_tokenizer(Path(directory))
        tokenizer = CLIPTokenizer.from_pretrained(directory)
    return ToyComponents(text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, unet=unet)


def parameter_count(module: Any) -> int:
    """Number of parameters of a torch module."""
    return sum(parameter.numel() for parameter in module.parameters())
