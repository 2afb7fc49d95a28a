"""Triton model: one exported component in OpenVINO (the python-openvino flavour)."""

from __future__ import annotations

from pathlib import Path

import triton_python_backend_utils as pb_utils

from edit_pipeline.openvino_component import OpenVinoComponent
from edit_pipeline.triton.component_model import ComponentModel, with_shallow_pass
from edit_pipeline.triton.triton_io import config_parameters
from export.onnx_export import MODEL_FILE
from export.openvino_ir import IR_FILE


class TritonPythonModel(ComponentModel):
    def initialize(self, args: dict[str, str]) -> None:
        parameters = config_parameters(args)
        version_dir = Path(args["model_repository"]) / args["model_version"]

        def load(
            folder: Path, model_file: str, release_activations: str, after_idle_s: float = 0.0
        ) -> OpenVinoComponent:
            return OpenVinoComponent(
                folder / model_file,
                precision=parameters["precision"],
                threads=int(parameters["threads"]),
                streams=int(parameters["streams"]),
                release_activations=parameters.get(release_activations, "0") == "1",
                release_after_idle_s=after_idle_s,
            )

        # The shallow pass of a UNet, never quantized: IR with fp16-stored weights at bf16 and
        # int8 (a repository built before: its ONNX export at int8), the ONNX export at fp32.
        def load_shallow(folder: Path) -> OpenVinoComponent:
            model_file = IR_FILE if (folder / IR_FILE).is_file() else MODEL_FILE
            return load(folder, model_file, "release_shallow_activations")

        # A repository built before the idle release has no parameter: the UNet keeps it.
        after_idle_s = float(parameters.get("release_after_idle_s", 0))
        full = load(version_dir, parameters["model_file"], "release_activations", after_idle_s)
        self.serve(args, with_shallow_pass(version_dir, full, load_shallow))
        if full.fallback_reason:
            pb_utils.Logger.log_warn(
                f"{self.model_name}: bf16 asked for, but {full.fallback_reason}: computing in fp32"
            )
