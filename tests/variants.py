"""Randomly configured Stable Diffusion family checkpoints, built as diffusers folders.

A seed draws every size a checkpoint of the family may choose: UNet block count and types,
attention heads (one number or one per block), layers per block, transformer depth, VAE
depth (so scale factors 4, 8 and 16), latent channels and scaling factor, text encoder
width, depth, heads and activation, vocabulary size, prompt length, special token ids and
the padding token. The UNets cross-attend at the text encoder's width. Each variant is
written like a preset (export/presets.py): an `instruct-pix2pix/` and an `img2img/`
pipeline sharing one text encoder, tokenizer and VAE. The tokenizer is CLIP's BPE cut to
the drawn vocabulary size, loadable with transformers' CLIPTokenizer as the server loads
it. Sizes stay tiny: a variant builds and exports in seconds.

    variant = build_and_export(seed, workdir)   # variant.root, variant.export_dir
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.onnx_export import export_checkpoint
from export.presets import Preset, write_pipelines
from export.tokenizer import END_OF_TEXT, MIN_VOCAB_SIZE, VOCAB_SIZE
from export.validation import ValidationRow

# Seeds whose draws together cover the family (checked by test_export_variants).
VARIANT_SEEDS = (2, 5, 9, 21, 27)

TEXT_WIDTHS = (16, 24, 32, 48, 64)
VOCAB_SIZES = (MIN_VOCAB_SIZE + 86, 1000, 4000, 20000, VOCAB_SIZE)
POSITIONS = (77, 64, 40)
VAE_CHANNELS = (8, 16, 24, 32)
UNET_CHANNELS = (16, 24, 32, 48)
# SD 1.x/2.x, SDXL's VAE, and no scaling.
VAE_SCALING_FACTORS = (0.18215, 0.13025, 1.0)
SD2_PAD_TOKEN = "!"


def _text_encoder(rng: random.Random) -> tuple[dict[str, Any], str]:
    """A CLIPTextConfig's arguments and the tokenizer's padding token."""
    width = rng.choice(TEXT_WIDTHS)
    vocab_size = rng.choice(VOCAB_SIZES)
    pad_token = rng.choice((END_OF_TEXT, SD2_PAD_TOKEN))
    if rng.random() < 0.5:
        # The ids SD 1.5's text encoder config carries, which its tokenizer does not use.
        special = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    else:
        end = vocab_size - 1
        special = {
            "bos_token_id": vocab_size - 2,
            "eos_token_id": end,
            "pad_token_id": 0 if pad_token == SD2_PAD_TOKEN else end,
        }
    config = {
        "vocab_size": vocab_size,
        "hidden_size": width,
        # Sometimes no multiple of the width, like diffusers' test-sized CLIP (37 for 32).
        "intermediate_size": width * rng.choice((2, 3, 4)) + rng.choice((0, 5)),
        "num_attention_heads": rng.choice([h for h in (1, 2, 4, 8) if width % h == 0]),
        "num_hidden_layers": rng.randint(1, 3),
        "max_position_embeddings": rng.choice(POSITIONS),
        "hidden_act": rng.choice(("quick_gelu", "gelu")),
        "projection_dim": width,
        "layer_norm_eps": 1e-5,
        **special,
    }
    return config, pad_token


def _vae(rng: random.Random) -> dict[str, Any]:
    depth = rng.choice((3, 4, 5))
    return {
        "block_out_channels": sorted(rng.choice(VAE_CHANNELS) for _ in range(depth)),
        "down_block_types": ["DownEncoderBlock2D"] * depth,
        "up_block_types": ["UpDecoderBlock2D"] * depth,
        "layers_per_block": rng.randint(1, 2),
        "norm_num_groups": rng.choice((4, 8)),
        "latent_channels": rng.choice((4, 4, 8, 16)),  # SD's 4 twice as often
        "mid_block_add_attention": rng.random() < 0.7,
        "scaling_factor": rng.choice(VAE_SCALING_FACTORS),
        "in_channels": 3,
        "out_channels": 3,
    }


def _unet(rng: random.Random, text_width: int) -> dict[str, Any]:
    """UNet2DConditionModel arguments; the pipeline sets in and out channels."""
    blocks = rng.randint(2, 4)
    channels = sorted(rng.choice(UNET_CHANNELS) for _ in range(blocks))
    with_attention = [rng.random() < 0.7 for _ in range(blocks)]
    with_attention[rng.randrange(blocks)] = True
    # diffusers reads `attention_head_dim` as the number of heads; it must divide the width.
    heads = [rng.choice([h for h in (2, 4, 8) if width % h == 0]) for width in channels]
    shared_heads = [h for h in (2, 4, 8) if all(width % h == 0 for width in channels)]
    return {
        "block_out_channels": channels,
        "down_block_types": [
            "CrossAttnDownBlock2D" if attention else "DownBlock2D" for attention in with_attention
        ],
        "up_block_types": [
            "CrossAttnUpBlock2D" if attention else "UpBlock2D"
            for attention in reversed(with_attention)
        ],
        "layers_per_block": rng.randint(1, 2),
        "transformer_layers_per_block": rng.randint(1, 2),
        "attention_head_dim": heads if rng.random() < 0.5 else rng.choice(shared_heads),
        "cross_attention_dim": text_width if rng.random() < 0.7 else [text_width] * blocks,
        "norm_num_groups": 8,
        # SD 2.x: linear projections in and out of the transformers, fp32 attention.
        "use_linear_projection": rng.random() < 0.5,
        "upcast_attention": rng.random() < 0.5,
        "sample_size": rng.choice((8, 16, 32, 64)),
    }


def draw_variant(seed: int) -> Preset:
    """The configuration of one randomly sized checkpoint of the family."""
    rng = random.Random(seed)
    text_encoder, pad_token = _text_encoder(rng)
    vae = _vae(rng)
    unet = _unet(rng, text_encoder["hidden_size"])
    positions = text_encoder["max_position_embeddings"]
    # A tokenizer may pad to fewer tokens than the text encoder has positions.
    prompt_length = positions if rng.random() < 0.7 else rng.randrange(16, positions)
    return Preset(
        name=f"variant-{seed}",
        description=f"randomly configured Stable Diffusion family checkpoint (seed {seed})",
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer_max_length=prompt_length,
        pad_token=pad_token,
    )


def vae_scale_factor(preset: Preset) -> int:
    """2 ** (VAE blocks - 1), as diffusers computes it."""
    return 2 ** (len(preset.vae["block_out_channels"]) - 1)


def describe(preset: Preset) -> str:
    """One line naming the sizes that set a variant apart."""
    text = preset.text_encoder
    unet = preset.unet
    return (
        f"unet {unet['block_out_channels']} heads {unet['attention_head_dim']} "
        f"layers {unet['layers_per_block']}/{unet['transformer_layers_per_block']}; "
        f"vae {preset.vae['block_out_channels']} (x{vae_scale_factor(preset)}, "
        f"{preset.vae['latent_channels']} latent channels); text width {text['hidden_size']} "
        f"depth {text['num_hidden_layers']} heads {text['num_attention_heads']} "
        f"vocab {text['vocab_size']} prompt {preset.tokenizer_max_length}/"
        f"{text['max_position_embeddings']} pad {preset.pad_token!r}"
    )


@dataclass(frozen=True)
class ExportedVariant:
    """A variant's diffusers folders and its validated ONNX export."""

    seed: int
    preset: Preset
    root: Path  # holds instruct-pix2pix/ and img2img/, like a preset root
    export_dir: Path  # holds manifest.json
    manifest: dict[str, Any]
    rows: list[ValidationRow]
    build_seconds: float
    export_seconds: float


def build_and_export(seed: int, workdir: Path, preset: Preset | None = None) -> ExportedVariant:
    """Builds the variant of `seed` (or `preset`, weights from `seed`) and exports it."""
    preset = preset or draw_variant(seed)
    started = time.perf_counter()
    root = workdir / preset.name
    write_pipelines(preset, root, seed)
    built = time.perf_counter()
    export_dir = workdir / f"{preset.name}-onnx"
    manifest, rows = export_checkpoint([root], export_dir)
    return ExportedVariant(
        seed=seed,
        preset=preset,
        root=root,
        export_dir=export_dir,
        manifest=manifest,
        rows=rows,
        build_seconds=built - started,
        export_seconds=time.perf_counter() - built,
    )
