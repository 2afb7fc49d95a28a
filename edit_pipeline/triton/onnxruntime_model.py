"""Triton model: one exported component in onnxruntime (the python-onnxruntime flavour)."""

from __future__ import annotations

from pathlib import Path

from edit_pipeline.cpu_graph import load_graph
from edit_pipeline.onnxruntime_component import OnnxComponent
from edit_pipeline.triton.component_model import ComponentModel, with_shallow_pass
from edit_pipeline.triton.triton_io import config_parameters


class TritonPythonModel(ComponentModel):
    def initialize(self, args: dict[str, str]) -> None:
        parameters = config_parameters(args)
        version_dir = Path(args["model_repository"]) / args["model_version"]

        def component(graph: Path) -> OnnxComponent:
            return OnnxComponent(
                graph,
                intra_op_threads=int(parameters["intra_op_threads"]),
                allow_spinning=parameters.get("allow_spinning", "1") != "0",
                split_threads=parameters.get("split_threads", "0") == "1",
                release_activations=parameters.get("release_activations", "0") == "1",
            )

        def load(folder: Path) -> OnnxComponent:
            return load_graph(folder, component)

        self.serve(args, with_shallow_pass(version_dir, load(version_dir), load))
