"""What every component's Triton model does once its component is loaded: run the
requests the dynamic batcher hands over together as one call, report the instance busy
meanwhile, answer each request with the outputs it asked for, and release the component
at unload. The flavours' model.py files differ only in how they load it (`initialize`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from edit_pipeline.batching import Component
from edit_pipeline.component_inputs import InputBounds
from edit_pipeline.runtime_status import InstanceStatus
from edit_pipeline.triton.triton_io import as_numpy, config_parameters, error_response
from edit_pipeline.unet_passes import SHALLOW_DIR, UNetPasses
from pix2pix_client.contract import InvalidArgumentError


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
    """Base of a component's TritonPythonModel; `initialize` loads the component and
    hands it to `serve`."""

    model_name: str
    component: Component
    status: InstanceStatus
    # The inputs edits send it (model_repository.configs.input_bounds; input_shapes in a
    # repository built before values were bounded); None in one built before components
    # knew them: nothing is refused.
    bounds: InputBounds | None

    def serve(self, args: dict[str, str], component: Component) -> None:
        self.model_name = args["model_name"]
        self.component = component
        self.status = InstanceStatus(args["model_instance_name"])
        parameters = config_parameters(args)
        bounds = parameters.get("input_bounds", parameters.get("input_shapes"))
        self.bounds = None if bounds is None else InputBounds.from_json(json.loads(bounds))

    def execute(self, requests: list) -> list:
        feeds, responses = {}, {}
        for index, request in enumerate(requests):
            try:
                feeds[index] = self._feed(request)
            except InvalidArgumentError as error:
                responses[index] = error_response(error, self.model_name)
        if feeds:
            responses |= self._run(requests, feeds)
        return [responses[index] for index in range(len(requests))]

    def _run(self, requests: list, feeds: dict[int, dict[str, Any]]) -> dict[int, Any]:
        """The responses of the requests whose inputs are `feeds`, run merged."""
        self.status.busy()
        try:
            results = self.component.run_merged(list(feeds.values()))
        except Exception as error:
            return {index: error_response(error, self.model_name) for index in feeds}
        finally:
            self.status.idle()
        # What the call computed of what each request asked for (a request that names no
        # output asks for every one: the shallow pass of a UNet computes no deep features).
        return {
            index: pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(name, outputs[name])
                    for name in requests[index].requested_output_names()
                    if name in outputs
                ]
            )
            for index, outputs in zip(feeds, results, strict=True)
        }

    def _feed(self, request: Any) -> dict[str, Any]:
        """The request's inputs by name, of shapes and values an edit sends; an optional one
        it does not carry is absent."""
        feed = {}
        for name in self.component.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                feed[name] = as_numpy(tensor)
        if self.bounds is not None:
            self.bounds.check(feed)
        return feed

    def finalize(self) -> None:
        self.status.close()
        self.component.close()
