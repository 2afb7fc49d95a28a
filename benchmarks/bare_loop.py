"""The bare loop the benchmarks compare Triton with: the served pipeline code on the same
exported files, with each component called in this process instead of through Triton."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from edit_pipeline.batching import Runnable


class InProcessComponents:
    """The four component calls of an edit (the pipeline's Components) on the exported
    files in this process. `make` opens one component by name: an OnnxComponent, or an
    OpenVinoComponent on the CPU."""

    def __init__(
        self,
        calls: dict[str, dict[str, Any]],
        make: Callable[[str], Runnable],
        device: str = "cpu",
    ) -> None:
        self.calls = calls
        self.device = device
        self.sessions = {role: make(call["component"]) for role, call in calls.items()}
        self.unet_seconds: list[float] = []

    def _run(self, role: str, *values: np.ndarray) -> list[np.ndarray]:
        call = self.calls[role]
        outputs = self.sessions[role].run(dict(zip(call["inputs"], values, strict=True)))
        return [outputs[name] for name in call["outputs"]]

    def _unet_arrays(self, *tensors: torch.Tensor) -> tuple[np.ndarray, ...]:
        return tuple(tensor.cpu().numpy() for tensor in tensors)

    def encode_prompts(self, input_ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self._run("text_encoder", input_ids)[0])

    def encode_image(self, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = self._run("vae_encoder", pixels)
        return torch.from_numpy(mean), torch.from_numpy(std)

    def predict_noise(
        self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor
    ) -> torch.Tensor:
        started = time.perf_counter()
        unet = self.sessions["unet"]
        if self.device == "cpu":
            arrays = (sample.numpy(), timestep.numpy(), embeds.numpy())
            noise_pred = torch.from_numpy(self._run("unet", *arrays)[0])
        else:
            # On a GPU the loop's tensors stay there: onnxruntime reads and writes them.
            noise_pred = torch.empty(
                (sample.shape[0], unet.output_channels, *sample.shape[2:]), device=sample.device
            )
            names = self.calls["unet"]["inputs"]
            unet.run_bound(
                dict(zip(names, (sample, timestep, embeds), strict=True)),
                {self.calls["unet"]["outputs"][0]: noise_pred},
            )
        self.unet_seconds.append(time.perf_counter() - started)
        return noise_pred

    def predict_noise_keeping(
        self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        noise_pred, deep = self._run("unet", *self._unet_arrays(sample, timestep, embeds))
        self.unet_seconds.append(time.perf_counter() - started)
        return torch.from_numpy(noise_pred), torch.from_numpy(deep)

    def predict_noise_shallow(
        self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor, deep: torch.Tensor
    ) -> torch.Tensor:
        started = time.perf_counter()
        # The shallow pass reads the prompt's embeddings only where it cross-attends.
        values = dict(zip(self.calls["unet"]["inputs"], (sample, timestep, embeds), strict=True))
        names = self.calls["unet_shallow"]["inputs"]
        arrays = self._unet_arrays(*(values[name] for name in names[:-1]), deep)
        (noise_pred,) = self._run("unet_shallow", *arrays)
        self.unet_seconds.append(time.perf_counter() - started)
        return torch.from_numpy(noise_pred)

    def decode_latents(self, latent: torch.Tensor) -> np.ndarray:
        return self._run("vae_decoder", latent.cpu().numpy())[0]
