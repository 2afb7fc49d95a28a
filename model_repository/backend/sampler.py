"""Triton model: the denoising loop, calling the UNet model through BLS every step.

Tensors cross into and out of Triton through DLPack, never through NumPy: on a GPU
instance (the tensorrt flavour) the inputs arrive in GPU memory, every UNet call asks for
its output in GPU memory (`preferred_memory`), and the final latent goes to the VAE decoder
without leaving the GPU. On a CPU instance the same calls hand over CPU memory, zero-copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack

from model_repository.backend.triton_io import as_numpy, config_parameters, internal_error
from model_repository.sampler import Sampler, SamplerInputs, instance_device


def _to_triton(name: str, tensor: torch.Tensor) -> object:
    # Handed over as the tensor itself (`__dlpack__`), not a capsule: for GPU memory the
    # Python backend then waits for the torch stream that wrote it before reading it.
    return pb_utils.Tensor.from_dlpack(name, tensor.contiguous())


def _to_torch(tensor: object) -> torch.Tensor:
    return from_dlpack(tensor.to_dlpack())  # type: ignore[attr-defined]


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        parameters = config_parameters(args)
        self.unet_model = parameters["unet_model"]
        self.device = instance_device(args["model_instance_kind"], args["model_instance_device_id"])
        if self.device.type == "cuda":
            memory = pb_utils.TRITONSERVER_MEMORY_GPU
            torch.cuda.set_device(self.device)
        else:
            memory = pb_utils.TRITONSERVER_MEMORY_CPU
        self.unet_memory = pb_utils.PreferredMemory(memory, self.device.index or 0)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        scheduler_config = json.loads((version_dir / "scheduler_config.json").read_text())
        self.sampler = Sampler(
            parameters["pipeline"],
            scheduler_config,
            float(parameters["vae_scaling_factor"]),
            self._unet,
            self.device,
        )

    def _unet(
        self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor
    ) -> torch.Tensor:
        request = pb_utils.InferenceRequest(
            model_name=self.unet_model,
            requested_output_names=["noise_pred"],
            inputs=[
                _to_triton("sample", sample),
                # [batch] travels as [batch, 1]: dims [1] reshaped to [] in the UNet config
                _to_triton("timestep", timestep.reshape(-1, 1)),
                _to_triton("encoder_hidden_states", embeds),
            ],
            preferred_memory=self.unet_memory,
        )
        response = request.exec()
        if response.has_error():
            raise pb_utils.TritonModelException(f"{self.unet_model}: {response.error().message()}")
        return _to_torch(pb_utils.get_output_tensor_by_name(response, "noise_pred"))

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:

            def tensor(name: str, request: object = request) -> torch.Tensor:
                return _to_torch(pb_utils.get_input_tensor_by_name(request, name))

            parameters = json.loads(
                as_numpy(pb_utils.get_input_tensor_by_name(request, "parameters")).reshape(-1)[0]
            )
            inputs = SamplerInputs(
                prompt_embeds=tensor("prompt_embeds"),
                latent_mean=tensor("latent_mean"),
                latent_std=tensor("latent_std"),
                num_inference_steps=parameters["num_inference_steps"],
                guidance_scale=parameters["guidance_scale"],
                image_guidance_scale=parameters["image_guidance_scale"],
                temperature=parameters["temperature"],
                seed=parameters["seed"],
                scheduler=parameters["scheduler"],
            )
            try:
                latent = self.sampler(inputs)
            except pb_utils.TritonModelException as error:
                responses.append(internal_error(str(error)))
                continue
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[_to_triton("latent", latent)])
            )
        return responses
