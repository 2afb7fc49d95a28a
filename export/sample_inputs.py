"""Random inputs for the exported components, shaped and ranged by the checkpoint itself.

The trace and the validation feed each component what the server will: token ids laid out
like a tokenized prompt and below the text encoder's vocabulary size, timesteps the
scheduler can produce, and latents and images whose sides the VAE scale factor relates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.components import ComponentSpec, ModelDimensions


@dataclass(frozen=True)
class CheckpointInputs:
    """What a checkpoint's components are fed: its dimensions, special token ids, timesteps."""

    dims: ModelDimensions
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    num_train_timesteps: int

    def prompt_ids(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        """[batch, text_max_length] int32 ids: start, random tokens, end, then padding."""
        length = self.dims.text_max_length
        ids = np.full((batch, length), self.pad_token_id, dtype=np.int32)
        for row in ids:
            # From an empty prompt to one truncated at the end-of-text token.
            words = int(rng.integers(0, length - 1))
            row[0] = self.bos_token_id
            row[1 : 1 + words] = rng.integers(0, self.dims.text_vocab_size, size=words)
            row[1 + words] = self.eos_token_id
        return ids


def axis_sizes(
    checkpoint: CheckpointInputs, batch: int, latent_size: tuple[int, int]
) -> dict[str, int]:
    """The size of each named axis of the specs at one batch and latent size."""
    latent_height, latent_width = latent_size
    return {
        "batch": batch,
        "height": checkpoint.dims.image_side(latent_height),
        "width": checkpoint.dims.image_side(latent_width),
        "latent_height": latent_height,
        "latent_width": latent_width,
    }


def sample_inputs(
    spec: ComponentSpec,
    checkpoint: CheckpointInputs,
    batch: int,
    latent_size: tuple[int, int],
    seed: int,
) -> dict[str, np.ndarray]:
    """Random inputs for a component at one batch and latent size, in the spec's dtypes."""
    rng = np.random.default_rng(seed)
    sizes = axis_sizes(checkpoint, batch, latent_size)
    arrays: dict[str, np.ndarray] = {}
    for tensor in spec.inputs:
        shape = tensor.shape_for(sizes)
        if tensor.name == "input_ids":
            arrays[tensor.name] = checkpoint.prompt_ids(rng, batch)
        elif tensor.name == "timestep":
            timesteps = rng.uniform(0, checkpoint.num_train_timesteps - 1, size=shape)
            arrays[tensor.name] = timesteps.astype(np.float32)
        elif tensor.name == "image":
            arrays[tensor.name] = rng.uniform(-1, 1, size=shape).astype(np.float32)
        else:
            arrays[tensor.name] = rng.standard_normal(size=shape).astype(np.float32)
    return arrays
