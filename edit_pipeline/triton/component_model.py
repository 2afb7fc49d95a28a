"""What every component's Triton model does once its component is loaded: run the
requests the dynamic batcher hands over together as one call, report the instance busy
meanwhile, and release the component at unload. The flavours' model.py files differ
only in how they load it (`initialize`)."""

from __future__ import annotations

from typing import Any, Protocol

import triton_python_backend_utils as pb_utils

from edit_pipeline.runtime_status import InstanceStatus
from edit_pipeline.triton.triton_io import as_numpy, error_response


class Component(Protocol):
    input_names: list[str]

    def run_merged(self, feeds: list[dict[str, Any]]) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class ComponentModel:
    """Base of a component's TritonPythonModel; `initialize` sets the three fields."""

    model_name: str
    component: Component
    status: InstanceStatus

    def execute(self, requests: list) -> list:
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
