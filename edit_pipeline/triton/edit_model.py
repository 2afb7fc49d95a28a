"""Triton model: one edit from request to PNG, the model that runs a pipeline.

Triton requests become the inputs of edit_pipeline/pipeline.py, its outputs responses;
components are reached through BLS (bls.py). An instance runs one edit at a time; if its
process dies, the Python backend fails the edit in flight. It is the streaming model (a
response per step, previews, the result), which also runs the unary model's edits
(forward_model.py: result only), or without streaming models the unary one."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from edit_pipeline.pipeline import EditOutput, EditPipeline, PreparedEdit
from edit_pipeline.runtime_status import InstanceStatus, draining
from edit_pipeline.sampler import instance_device
from edit_pipeline.triton.bls import TritonComponents
from edit_pipeline.triton.triton_io import (
    Cancelled,
    Unavailable,
    as_numpy,
    error_response,
    forwarded_by_a_model,
    forwarded_failure,
    watch_caller,
)
from pix2pix_client.contract import (
    OUTPUT_IMAGE,
    OUTPUT_NUM_STEPS,
    OUTPUT_PREVIEW,
    OUTPUT_SEED,
    OUTPUT_STEP,
    parameters_for,
)

Progress = Callable[[PreparedEdit, int, int, torch.Tensor], None]


def _tensor(name: str, value: Any, dtype: Any) -> Any:
    return pb_utils.Tensor(name, np.array([value], dtype=dtype))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.model_name = args["model_name"]
        self.streaming = pb_utils.using_decoupled_model_transaction_policy(
            json.loads(args["model_config"])
        )
        device = instance_device(args["model_instance_kind"], args["model_instance_device_id"])
        if device.type == "cuda":
            memory = pb_utils.TRITONSERVER_MEMORY_GPU
            torch.cuda.set_device(device)
        else:
            memory = pb_utils.TRITONSERVER_MEMORY_CPU
        preferred = pb_utils.PreferredMemory(memory, device.index or 0)
        self.status = InstanceStatus(args["model_instance_name"])
        self.pipeline = EditPipeline.from_folder(
            Path(args["model_repository"]) / args["model_version"],
            lambda settings: TritonComponents(settings, preferred, self.status),
            device,
        )
        pipeline = self.pipeline.settings.pipeline
        self.input_names = [p.name for p in parameters_for(pipeline, self.streaming)]
        # What initialize made lives as long as the process: out of the garbage
        # collector's sight, neither edits nor the interpreter's teardown at unload (which
        # the server's stop and the supervisor's reloads wait for) walk it again.
        gc.freeze()

    def execute(self, requests: list) -> list | None:
        if not self.streaming:
            return [self._respond(request) for request in requests]
        for request in requests:
            self._stream(request)
        return None

    def _respond(self, request: Any) -> Any:
        try:
            output = self._edit(request)
        except Exception as error:
            return error_response(error, self.model_name)
        return self._result(output)

    def _stream(self, request: Any) -> None:
        sender = request.get_response_sender()

        def progress(edit: PreparedEdit, step: int, steps: int, latents: torch.Tensor) -> None:
            tensors = [
                _tensor(OUTPUT_STEP, step, np.int32),
                _tensor(OUTPUT_NUM_STEPS, steps, np.int32),
                _tensor(OUTPUT_SEED, edit.request.seed, np.int64),
            ]
            every = edit.request.preview_every
            if every and (step % every == 0 or step == steps):
                preview = self.pipeline.preview(edit, latents)
                tensors.append(_tensor(OUTPUT_PREVIEW, preview, np.object_))
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors))

        forwarded = False
        try:
            forwarded = forwarded_by_a_model(request, self.model_name)
            response = self._result(self._edit(request, None if forwarded else progress))
        except Exception as error:
            response = (forwarded_failure if forwarded else error_response)(error, self.model_name)
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    @staticmethod
    def _result(output: EditOutput) -> Any:
        return pb_utils.InferenceResponse(
            output_tensors=[
                _tensor(OUTPUT_IMAGE, output.png, np.object_),
                _tensor(OUTPUT_SEED, output.seed, np.int64),
            ]
        )

    def _edit(self, request: Any, progress: Progress | None = None) -> EditOutput:
        if draining():
            raise Unavailable("the server is shutting down: send the edit to another replica")
        values = {}
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                values[name] = as_numpy(tensor).reshape(-1)[0]
        prepared = self.pipeline.prepare(values, self.streaming)
        cancelled = watch_caller(request)

        def on_step(index: int, steps: int, latents: torch.Tensor) -> None:
            self.status.busy()
            if cancelled():
                raise Cancelled(f"the edit was cancelled by its caller after step {index + 1}")
            if progress is not None:
                progress(prepared, index + 1, steps, latents)

        self.status.busy()
        try:  # stops at the first step after its caller left
            if cancelled():
                raise Cancelled("the edit was cancelled by its caller before it started")
            return self.pipeline.run(prepared, on_step=on_step)
        finally:
            self.status.idle()

    def finalize(self) -> None:
        self.status.close()
