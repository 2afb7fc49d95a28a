"""Triton model: a pipeline's unary model where its streaming model is served too.

It runs no pipeline of its own. Each edit goes to the streaming model (a BLS call that
streams back) and its last response is this model's answer: the image and the seed, or
the edit's failure with its code. So each pipeline has one process that imports torch and
diffusers and holds an edit's working memory, instead of one per model; this one imports
NumPy and the Python backend's utilities only.

Triton 2.51's BLS cannot cancel a call it made, does not end it when the process running
it dies, and a response sent to a caller whose process died waits for ever. So the two
models share a folder per edit (`runtime_status.ForwardedEdit`, in the supervisor's
runtime directory, or under a plain tritonserver in a private folder of the temporary
directory): this model marks the edit cancelled when its caller goes away (a cancelled
call, a passed deadline, a closed connection), and the edit model stops at its next step
as for its own caller; each model names its process there, and ends its own if the
other's dies (`triton_io.end_with_partner`).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from edit_pipeline.runtime_status import (
    CANCEL_TOKEN_INPUT,
    FAILURE_OUTPUT,
    ForwardedEdit,
    InstanceStatus,
    forget_forwarded_edits,
)
from edit_pipeline.triton.triton_io import (
    Unavailable,
    config_parameters,
    end_with_partner,
    error_response,
    first_line,
    forwarded_error_response,
)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.model_name = args["model_name"]
        self.target = config_parameters(args)["streaming_model"]
        self.output_names = [o["name"] for o in json.loads(args["model_config"])["output"]]
        self.status = InstanceStatus(args["model_instance_name"])

    def execute(self, requests: list) -> list:
        return [self._forward(request) for request in requests]

    def finalize(self) -> None:
        self.status.close()
        forget_forwarded_edits()

    def _forward(self, request: Any) -> Any:
        token = secrets.token_hex(8)
        edit = ForwardedEdit.of(token)
        self.status.busy()
        try:
            with _watched(request, edit):
                return self._relay(request, token)
        except Exception as error:
            return error_response(error, self.model_name)
        finally:
            if edit is not None:
                edit.remove()
            self.status.idle()

    def _relay(self, request: Any, token: str) -> Any:
        """The streaming model's last response to this request, as this model's answer."""
        token_tensor = pb_utils.Tensor(CANCEL_TOKEN_INPUT, np.array([token], dtype=np.object_))
        call = pb_utils.InferenceRequest(
            model_name=self.target,
            inputs=[*request.inputs(), token_tensor],
            requested_output_names=[*self.output_names, FAILURE_OUTPUT],
        )
        result = None
        with self.status.waiting():
            try:
                responses = call.exec(decoupled=True)
            except pb_utils.TritonModelException as error:
                message = f"{self.target} cannot take the edit now, retry: {error}"
                raise Unavailable(message) from None
            for response in responses:
                if response.has_error():
                    # Triton's own error (the edit model fails with an output): the edit
                    # could not run there now (full queue, process died, reloading).
                    reason = first_line(response.error().message())
                    raise Unavailable(f"{self.target} could not take the edit, retry: {reason}")
                failure = pb_utils.get_output_tensor_by_name(response, FAILURE_OUTPUT)
                if failure is not None:
                    return forwarded_error_response(failure)
                outputs = [
                    pb_utils.get_output_tensor_by_name(response, name) for name in self.output_names
                ]
                if all(tensor is not None for tensor in outputs):
                    result = pb_utils.InferenceResponse(output_tensors=outputs)
        if result is None:
            raise Unavailable(f"{self.target} ended the edit without a result, retry")
        return result


@contextmanager
def _watched(request: Any, edit: ForwardedEdit | None) -> Iterator[None]:
    """While the edit runs, a thread marks it cancelled as soon as its caller goes away
    (the edit model reads the mark at its next step). If the process running the edit
    dies, Triton 2.51 never ends this model's wait for it: the thread ends this process,
    whose edit the Python backend then fails as retryable, and the supervisor replaces it
    like any dead model process."""
    if edit is None:
        yield
        return
    edit.open(os.getpid())

    def mark_cancelled() -> None:
        if request.is_cancelled() and not edit.cancelled():
            edit.cancel()

    stop_watching = end_with_partner(
        edit, edit.runner, "the process running a forwarded edit", each_round=mark_cancelled
    )
    try:
        yield
    finally:
        stop_watching()
