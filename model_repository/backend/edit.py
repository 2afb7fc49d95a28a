"""Triton model: one edit from request to PNG, the model clients call.

The pipeline itself is plain Python (model_repository/pipeline.py); this file turns
Triton requests into its inputs and its outputs into responses, and reaches the exported
components through BLS (model_repository/backend/bls.py). Each instance runs one edit at
a time inside `execute`: when its process dies, the Python backend answers the edit in
flight with an error instead of leaving the caller waiting, and Triton's queue policy
bounds how many edits wait.

After every denoising step the edit checks whether its caller is still there
(`request.is_cancelled()`: a cancelled call, a passed deadline, a closed connection) and
stops if not, so abandoned work ends within one UNet step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from model_repository.backend.bls import TritonComponents
from model_repository.backend.triton_io import Cancelled, Unavailable, as_numpy, error_response
from model_repository.pipeline import EditPipeline
from model_repository.runtime import InstanceStatus, draining
from model_repository.sampler import instance_device
from pix2pix_client.contract import OUTPUT_IMAGE, OUTPUT_SEED, parameters_for


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.model_name = args["model_name"]
        device = instance_device(args["model_instance_kind"], args["model_instance_device_id"])
        if device.type == "cuda":
            memory = pb_utils.TRITONSERVER_MEMORY_GPU
            torch.cuda.set_device(device)
        else:
            memory = pb_utils.TRITONSERVER_MEMORY_CPU
        preferred = pb_utils.PreferredMemory(memory, device.index or 0)
        self.pipeline = EditPipeline.from_folder(
            Path(args["model_repository"]) / args["model_version"],
            lambda settings: TritonComponents(settings, preferred),
            device,
        )
        self.input_names = [p.name for p in parameters_for(self.pipeline.settings.pipeline)]
        self.status = InstanceStatus(args["model_instance_name"])

    def execute(self, requests: list) -> list:
        return [self._respond(request) for request in requests]

    def _respond(self, request: Any) -> Any:
        try:
            png, seed = self._edit(request)
        except Exception as error:
            return error_response(error, self.model_name)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(OUTPUT_IMAGE, np.array([png], dtype=np.object_)),
                pb_utils.Tensor(OUTPUT_SEED, np.array([seed], dtype=np.int64)),
            ]
        )

    def _edit(self, request: Any) -> tuple[bytes, int]:
        if draining():
            raise Unavailable("the server is shutting down: send the edit to another replica")
        values = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                values[name] = as_numpy(tensor).reshape(-1)[0]
        prepared = self.pipeline.prepare(values)

        def on_step(step: int, steps: int, latents: torch.Tensor) -> None:
            self.status.busy()
            if request.is_cancelled():
                raise Cancelled(f"the edit was cancelled by its caller after step {step + 1}")

        self.status.busy()
        try:
            if request.is_cancelled():
                raise Cancelled("the edit was cancelled by its caller before it started")
            output = self.pipeline.run(prepared, on_step=on_step)
        finally:
            self.status.idle()
        return output.png, output.seed

    def finalize(self) -> None:
        self.status.close()
