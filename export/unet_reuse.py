"""Reused UNet work (DeepCache, Ma et al. 2023): a diffusers UNet cut into a full pass that
also returns its deep features, and a shallow pass that runs on features kept from it.

Between two denoising steps the UNet's deep features barely change; its shallowest
sub-blocks, next to the input and output, carry what does. The cut is DeepCache's
shallowest: the skip from the first down block's first sub-block.

    full:    conv_in -> every down block -> mid -> every up block -> conv_out
                                                 `- deep features: the hidden state that
                                                    enters the last up block's second-last
                                                    sub-block, before its skip is joined
    shallow: conv_in -> first down block, sub-block 0 -------------------.
                        deep features -> last up block, its last two sub-blocks -> conv_out

The two sub-blocks of the last up block take the skips of the first down block's first
sub-block and of conv_in, exactly as in the full pass. So a shallow pass fed the features of
a full pass on the same inputs returns that pass's prediction (tests/test_unet_reuse.py);
on the next steps' inputs it approximates it.
"""

from __future__ import annotations

from typing import Any

from export.components import ShallowPass

# The blocks whose sub-blocks the shallow pass runs as the block's own forward does: a
# resnet, then cross-attention to the prompt, attention to the picture itself, or nothing.
CROSS_ATTENTION_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D")
SELF_ATTENTION_BLOCKS = ("AttnDownBlock2D", "AttnUpBlock2D")
PLAIN_BLOCKS = ("DownBlock2D", "UpBlock2D")
SHALLOW_BLOCKS = (*CROSS_ATTENTION_BLOCKS, *SELF_ATTENTION_BLOCKS, *PLAIN_BLOCKS)


def _sub_blocks(block: Any) -> int:
    return len(block.resnets)


def _kind(block: Any) -> str:
    return type(block).__name__


def reuse_unsupported_reason(unet: Any) -> str | None:
    """Why this UNet cannot be cut so, or None when it can."""
    if len(unet.down_blocks) < 2 or len(unet.up_blocks) < 2:
        return "it has a single resolution level (nothing deep to keep)"
    if unet.config.get("class_embed_type") or unet.config.get("addition_embed_type"):
        return "it takes class or added embeddings"
    for where, block in (("first down", unet.down_blocks[0]), ("last up", unet.up_blocks[-1])):
        if _kind(block) not in SHALLOW_BLOCKS:
            return f"its {where} block is a {_kind(block)}, which the shallow pass does not run"
    if _sub_blocks(unet.up_blocks[-1]) != _sub_blocks(unet.down_blocks[0]) + 1:
        return "its last up block does not mirror its first down block"
    return None


def shallow_pass_inputs(unet: Any) -> ShallowPass:
    """The deep features' channels (what the last up block's second-last sub-block takes,
    less the skip it joins), and whether the shallow sub-blocks cross-attend."""
    up = unet.up_blocks[-1]
    joined = up.resnets[_sub_blocks(up) - 2].conv1.in_channels
    return ShallowPass(
        deep_channels=joined - unet.down_blocks[0].resnets[0].out_channels,
        cross_attends=any(
            _kind(block) in CROSS_ATTENTION_BLOCKS for block in (unet.down_blocks[0], up)
        ),
    )


def _time_embedding(unet: Any, sample: Any, timestep: Any) -> Any:
    # As the UNet's forward for the checkpoints reuse_unsupported_reason accepts.
    embedding = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    return embedding if unet.time_embed_act is None else unet.time_embed_act(embedding)


def _sub_block(block: Any, index: int, hidden: Any, emb: Any, context: Any) -> Any:
    hidden = block.resnets[index](hidden, emb)
    if _kind(block) in CROSS_ATTENTION_BLOCKS:
        attention = block.attentions[index]
        hidden = attention(hidden, encoder_hidden_states=context, return_dict=False)[0]
    elif _kind(block) in SELF_ATTENTION_BLOCKS:
        hidden = block.attentions[index](hidden)
    return hidden


def full_pass(unet: Any, sample: Any, timestep: Any, context: Any) -> tuple[Any, Any]:
    """The UNet's prediction, and its deep features."""
    up = unet.up_blocks[-1]
    kept: list[Any] = []
    skip_channels = unet.down_blocks[0].resnets[0].out_channels

    def keep(_: Any, args: tuple[Any, ...]) -> None:
        joined = args[0]
        kept.append(joined[:, : joined.shape[1] - skip_channels])

    hook = up.resnets[_sub_blocks(up) - 2].register_forward_pre_hook(keep)
    try:
        noise_pred = unet(sample, timestep, context, return_dict=False)[0]
    finally:
        hook.remove()
    return noise_pred, kept[0]


def shallow_pass(unet: Any, sample: Any, timestep: Any, context: Any, deep: Any) -> Any:
    """The prediction from the shallowest sub-blocks, on kept deep features."""
    import torch

    emb = _time_embedding(unet, sample, timestep)
    context = unet.process_encoder_hidden_states(
        encoder_hidden_states=context, added_cond_kwargs=None
    )
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    first = unet.conv_in(sample)
    second = _sub_block(unet.down_blocks[0], 0, first, emb, context)
    up = unet.up_blocks[-1]
    hidden = deep
    for index, skip in ((_sub_blocks(up) - 2, second), (_sub_blocks(up) - 1, first)):
        hidden = _sub_block(up, index, torch.cat([hidden, skip], dim=1), emb, context)
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)
