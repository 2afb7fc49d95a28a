"""What every component's Triton model does once its component is loaded: run the
requests the dynamic batcher hands over together as one call, report the instance busy
meanwhile, answer each request with the outputs it asked for, and release the component
at unload. The flavours' model.py files differ only in how they load it (`initialize`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from edit_pipeline.batching import Component
from edit_pipeline.runtime_status import InstanceStatus
from edit_pipeline.triton.triton_io import as_numpy, error_response
from edit_pipeline.unet_passes import SHALLOW_DIR, UNetPasses


def with_shallow_pass(
    version_dir: Path, full: Component, load: Callable[[Path], Component]
) -> Component:
    """The component, or, where its version folder also holds a UNet's shallow pass, both
    passes behind one component (edit_pipeline/unet_passes.py)."""
    shallow_dir = version_dir / SHALLOW_DIR
    if not shallow_dir.is_dir():
        return full
    return UNetPasses(full, lambda: load(shallow_dir))


class ComponentModel:
    """Base of a component's TritonPythonModel; `initialize` sets the three fields."""

    model_name: str
    component: Component
    status: InstanceStatus

    def execute(self, requests: list) -> list:
        feeds = [self._feed(request) for request in requests]
        self.status.busy()
        try:
            results = self.component.run_merged(feeds)
        except Exception as error:
            return [error_response(error, self.model_name) for _ in requests]
        finally:
            self.status.idle()
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(name, outputs[name])
                    for name in request.requested_output_names()
                ]
            )
            for request, outputs in zip(requests, results, strict=True)
        ]

    def _feed(self, request: Any) -> dict[str, Any]:
        """The request's inputs by name; an optional one it does not carry is absent."""
        feed = {}
        for name in self.component.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                feed[name] = as_numpy(tensor)
        return feed

    def finalize(self) -> None:
        self.status.close()
        self.component.close()
