"""Triton model: one exported component in OpenVINO (the python-openvino flavour)."""

from __future__ import annotations

from pathlib import Path

import triton_python_backend_utils as pb_utils

from model_repository.backend.triton_io import as_numpy, config_parameters, error_response
from model_repository.openvino_component import OpenVinoComponent
from model_repository.runtime import InstanceStatus


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        parameters = config_parameters(args)
        self.model_name = args["model_name"]
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.component = OpenVinoComponent(
            version_dir / parameters["model_file"],
            precision=parameters["precision"],
            threads=int(parameters["threads"]),
            streams=int(parameters["streams"]),
        )
        if self.component.fallback_reason:
            pb_utils.Logger.log_warn(
                f"{self.model_name}: bf16 asked for, but {self.component.fallback_reason}: "
                "computing in fp32"
            )
        self.status = InstanceStatus(args["model_instance_name"])

    def execute(self, requests: list) -> list:
        # The dynamic batcher hands over concurrent requests together: run them as one.
        feeds = [
            {
                name: as_numpy(pb_utils.get_input_tensor_by_name(request, name))
                for name in self.component.input_names
            }
            for request in requests
        ]
        self.status.busy()
        try:
            results = self.component.run_merged(feeds)
        except Exception as error:
            return [error_response(error, self.model_name) for _ in requests]
        finally:
            self.status.idle()
        return [
            pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()]
            )
            for outputs in results
        ]

    def finalize(self) -> None:
        self.component.close()
        self.status.close()
