"""The exported components as BLS calls to their Triton models (inside tritonserver only).

Tensors cross into and out of Triton through DLPack, never through NumPy: on a GPU
instance every call asks for its output in GPU memory (`preferred_memory`), so the
denoising loop's tensors never leave the GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack

from edit_pipeline.runtime_status import InstanceStatus
from edit_pipeline.settings import PipelineSettings
from edit_pipeline.triton.triton_io import raise_for_component


def _to_triton(name: str, tensor: torch.Tensor | np.ndarray) -> Any:
    if isinstance(tensor, np.ndarray):
        return pb_utils.Tensor(name, np.ascontiguousarray(tensor))
    # Handed over as the tensor itself (`__dlpack__`), not a capsule: for GPU memory the
    # Python backend then waits for the torch stream that wrote it before reading it.
    return pb_utils.Tensor.from_dlpack(name, tensor.contiguous())


def _to_torch(tensor: Any) -> torch.Tensor:
    return from_dlpack(tensor.to_dlpack())


class TritonComponents:
    """The exported components as BLS calls to their Triton models."""

    def __init__(self, settings: PipelineSettings, memory: Any, status: InstanceStatus) -> None:
        self.calls = settings.components
        self.memory = memory
        self.status = status

    def _call(self, role: str, *values: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
        call = self.calls[role]
        request = pb_utils.InferenceRequest(
            model_name=call["model"],
            requested_output_names=call["outputs"],
            inputs=[_to_triton(n, v) for n, v in zip(call["inputs"], values, strict=True)],
            preferred_memory=self.memory,
        )
        with self.status.waiting():
            response = request.exec()
        if response.has_error():
            raise_for_component(call["model"], response.error())
        return [_to_torch(pb_utils.get_output_tensor_by_name(response, n)) for n in call["outputs"]]

    def encode_prompts(self, input_ids: np.ndarray) -> torch.Tensor:
        (embeds,) = self._call("text_encoder", input_ids)
        return embeds

    def encode_image(self, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self._call("vae_encoder", pixels)
        return mean, std

    def predict_noise(
        self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor
    ) -> torch.Tensor:
        # [batch] travels as [batch, 1]: dims [1] reshaped to [] in the UNet config.
        (noise_pred,) = self._call("unet", sample, timestep.reshape(-1, 1), embeds)
        return noise_pred

    def decode_latents(self, latent: torch.Tensor) -> np.ndarray:
        (decoded,) = self._call("vae_decoder", latent)
        return decoded.cpu().numpy()
