"""Triton model: decoded image tensor to PNG bytes."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from model_repository.backend.triton_io import as_numpy
from model_repository.postprocess import encode_png, tensor_to_image


class TritonPythonModel:
    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            decoded = as_numpy(pb_utils.get_input_tensor_by_name(request, "image"))
            png = encode_png(tensor_to_image(decoded))
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("edited_image", np.array([png], dtype=np.object_))
                    ]
                )
            )
        return responses
