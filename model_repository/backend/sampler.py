"""Triton model: the denoising loop, calling the UNet model through BLS every step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from model_repository.backend.triton_io import as_numpy, config_parameters, internal_error
from model_repository.sampler import Sampler, SamplerInputs


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        parameters = config_parameters(args)
        self.unet_model = parameters["unet_model"]
        version_dir = Path(args["model_repository"]) / args["model_version"]
        scheduler_config = json.loads((version_dir / "scheduler_config.json").read_text())
        self.sampler = Sampler(
            parameters["pipeline"],
            scheduler_config,
            float(parameters["vae_scaling_factor"]),
            self._unet,
        )

    def _unet(self, sample: np.ndarray, timestep: np.ndarray, embeds: np.ndarray) -> np.ndarray:
        request = pb_utils.InferenceRequest(
            model_name=self.unet_model,
            requested_output_names=["noise_pred"],
            inputs=[
                pb_utils.Tensor("sample", sample),
                # [batch] travels as [batch, 1]: dims [1] reshaped to [] in the UNet config
                pb_utils.Tensor("timestep", timestep.reshape(-1, 1)),
                pb_utils.Tensor("encoder_hidden_states", embeds),
            ],
        )
        response = request.exec()
        if response.has_error():
            raise pb_utils.TritonModelException(f"{self.unet_model}: {response.error().message()}")
        return as_numpy(pb_utils.get_output_tensor_by_name(response, "noise_pred"))

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:

            def tensor(name: str, request: object = request) -> np.ndarray:
                return as_numpy(pb_utils.get_input_tensor_by_name(request, name))

            parameters = json.loads(tensor("parameters").reshape(-1)[0])
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
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("latent", latent)])
            )
        return responses
