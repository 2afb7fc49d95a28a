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

    def _named(self, role: str, *values: torch.Tensor | np.ndarray) -> dict[str, Any]:
        """Values in the order of the role's inputs, by their names."""
        return dict(zip(self.calls[role]["inputs"], values, strict=True))

    def _call(self, role: str, values: dict[str, Any], outputs: int = 1) -> list[torch.Tensor]:
        """One component call: the role's inputs taken from `values` by name (a pass that
        does not read one has none), its first `outputs` outputs returned."""
        call = self.calls[role]
        wanted = call["outputs"][:outputs]
        request = pb_utils.InferenceRequest(
            model_name=call["model"],
            requested_output_names=wanted,
            inputs=[_to_triton(name, values[name]) for name in call["inputs"]],
            preferred_memory=self.memory,
        )
        with self.status.waiting():
            response = request.exec()
        if response.has_error():
            raise_for_component(call["model"], response.error())
        return [_to_torch(pb_utils.get_output_tensor_by_name(response, n)) for n in wanted]

    def encode_prompts(self, input_ids: np.ndarray) -> torch.Tensor:
        (embeds,) = self._call("text_encoder", self._named("text_encoder", input_ids))
        return embeds

    def encode_image(self, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self._call("vae_encoder", self._named("vae_encoder", pixels), outputs=2)
        return mean, std

    def _unet_inputs(
        self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor
    ) -> dict[str, Any]:
        # [batch] travels as [batch, 1]: dims [1] reshaped to [] in the UNet config.
        return self._named("unet", sample, timestep.reshape(-1, 1), embeds)

    def predict_noise(
        self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor
    ) -> torch.Tensor:
        (noise_pred,) = self._call("unet", self._unet_inputs(sample, timestep, embeds))
        return noise_pred

    def predict_noise_keeping(
        self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The full pass's outputs: the prediction, then the deep features.
        noise_pred, deep = self._call("unet", self._unet_inputs(sample, timestep, embeds), 2)
        return noise_pred, deep

    def predict_noise_shallow(
        self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor, deep: torch.Tensor
    ) -> torch.Tensor:
        # The shallow pass takes the deep features last.
        deep_name = self.calls["unet_shallow"]["inputs"][-1]
        values = {**self._unet_inputs(sample, timestep, embeds), deep_name: deep}
        (noise_pred,) = self._call("unet_shallow", values)
        return noise_pred

    def decode_latents(self, latent: torch.Tensor) -> np.ndarray:
        (decoded,) = self._call("vae_decoder", self._named("vae_decoder", latent))
        return decoded.cpu().numpy()
