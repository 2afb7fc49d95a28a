"""Triton model: validates a request, decodes its image and tokenizes its prompts."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from model_repository.backend.triton_io import config_parameters, invalid_argument
from model_repository.preprocess import (
    ImageLimits,
    PromptTokenizer,
    decode_image,
    image_to_tensor,
    resolve_request,
)
from pix2pix_client.contract import InvalidArgumentError, parameters_for


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        parameters = config_parameters(args)
        self.pipeline = parameters["pipeline"]
        self.limits = ImageLimits(
            max_side=int(parameters["max_image_side"]),
            max_pixels=int(parameters["max_image_pixels"]),
            min_side=int(parameters["min_image_side"]),
        )
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = PromptTokenizer(version_dir / "tokenizer")
        self.input_names = [p.name for p in parameters_for(self.pipeline)]

    def execute(self, requests: list) -> list:
        return [self._preprocess(request) for request in requests]

    def _preprocess(self, request: object) -> object:
        values = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                values[name] = tensor.as_numpy().reshape(-1)[0]
        try:
            edit = resolve_request(self.pipeline, values)
            image = decode_image(values["image"], self.limits)
        except InvalidArgumentError as error:
            return invalid_argument(str(error))
        input_ids = self.tokenizer([edit.prompt, edit.negative_prompt])
        parameters = json.dumps(asdict(edit)).encode()
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("input_ids", input_ids),
                pb_utils.Tensor("pixels", image_to_tensor(image)),
                pb_utils.Tensor("parameters", np.array([parameters], dtype=np.object_)),
                pb_utils.Tensor("seed_used", np.array([edit.seed], dtype=np.int64)),
            ]
        )
