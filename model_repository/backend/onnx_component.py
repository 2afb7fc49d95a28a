"""Triton model: one exported component in onnxruntime (the python-onnxruntime flavour)."""

from __future__ import annotations

from pathlib import Path

import triton_python_backend_utils as pb_utils

from model_repository.backend.triton_io import as_numpy, config_parameters
from model_repository.onnx_component import OnnxComponent


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        parameters = config_parameters(args)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.component = OnnxComponent(
            version_dir / "model.onnx",
            intra_op_threads=int(parameters["intra_op_threads"]),
            allow_spinning=parameters.get("allow_spinning", "1") != "0",
            split_threads=parameters.get("split_threads", "0") == "1",
        )

    def execute(self, requests: list) -> list:
        # The dynamic batcher hands over concurrent requests together: run them as one.
        feeds = [
            {
                name: as_numpy(pb_utils.get_input_tensor_by_name(request, name))
                for name in self.component.input_names
            }
            for request in requests
        ]
        return [
            pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()]
            )
            for outputs in self.component.run_merged(feeds)
        ]
