"""What the Python backend models share (imported inside tritonserver only).

Errors: every failure a model answers with is one line with a Triton error code. Bad
input is INVALID_ARG naming the field; a component that is down or restarting, and a
server that is shutting down, are UNAVAILABLE (clients retry, elsewhere or later); a
cancelled edit is CANCELLED; anything else is INTERNAL with an incident id, and its
traceback goes to the server log only.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from edit_pipeline.runtime_status import (
    CANCEL_TOKEN_INPUT,
    FAILURE_OUTPUT,
    ForwardedEdit,
    process_ended,
)
from pix2pix_client.contract import InvalidArgumentError

# How often the two processes of a forwarded edit check on each other and on the unary
# caller: well within one UNet step (a check reads a file or asks tritonserver, tens of
# microseconds).
WATCH_EVERY_S = 0.01


def config_parameters(args: dict[str, str]) -> dict[str, str]:
    """The `parameters` block of the model's config.pbtxt as plain strings."""
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def as_numpy(tensor: Any) -> np.ndarray:
    """A tensor's data on the CPU, whether it arrived in CPU or GPU memory."""
    if tensor.is_cpu():
        return tensor.as_numpy()
    from torch.utils.dlpack import from_dlpack

    return from_dlpack(tensor.to_dlpack()).cpu().numpy()


def forwarding_token(request: Any) -> str | None:
    """The token a forwarding unary model sent with this edit; None for an edit a client
    sent itself."""
    tensor = pb_utils.get_input_tensor_by_name(request, CANCEL_TOKEN_INPUT)
    if tensor is None:
        return None
    return bytes(as_numpy(tensor).reshape(-1)[0]).decode("ascii", "replace")


def forwarded_by_a_model(request: Any, model: str) -> bool:
    """Whether a forwarding unary model sent this edit to `model`, its streaming model;
    a cancel_token a client sent itself is InvalidArgumentError."""
    token = forwarding_token(request)
    if token is None:
        return False
    if not ForwardedEdit.sent_by_a_forwarding_model(token):
        raise InvalidArgumentError(
            CANCEL_TOKEN_INPUT,
            f"{CANCEL_TOKEN_INPUT} is what a unary model forwards its edits to {model} with, "
            "not a client's input: allowed none",
        )
    return True


def watch_caller(request: Any) -> Callable[[], bool]:
    """Whether the caller of an edit has gone away (cancelled, past its deadline,
    disconnected), as a function to call at every step. For an edit a unary model
    forwarded, that model's mark is read too, and it learns which process runs the edit
    (its only way to know the edit died with that process); and this process ends if the
    forwarding model's dies first."""
    token = forwarding_token(request)
    forwarded = ForwardedEdit.of(token) if token else None
    if forwarded is not None and forwarded.run_by(os.getpid()):
        # The forwarding model removes the folder once it has the last response.
        end_with_partner(
            forwarded,
            forwarded.caller,
            "the process that forwarded this edit",
            watching=forwarded.folder.is_dir,
        )

    def gone() -> bool:
        return request.is_cancelled() or bool(forwarded and forwarded.cancelled())

    return gone


def end_with_partner(
    edit: ForwardedEdit,
    partner: Callable[[], int | None],
    role: str,
    watching: Callable[[], bool] = lambda: True,
    each_round: Callable[[], None] = lambda: None,
) -> Callable[[], None]:
    """Starts a thread that ends this process if the other process of a forwarded edit
    (its `role`, whose pid `partner` reads) dies while `watching()`, until the returned
    stop() is called. Triton 2.51 never ends a BLS call whose callee died, and a response
    sent to a caller that died waits for ever: either way this process could never answer
    again. The edit's folder goes with it (the dead side cannot remove it). `each_round`
    runs at every check."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(WATCH_EVERY_S) and watching():
            each_round()
            pid = partner()
            if pid is not None and process_ended(pid) and not done.is_set() and watching():
                edit.remove()
                end_this_process(f"{role} ({pid}) died")

    watcher = threading.Thread(target=watch, name="forwarded-edit-watch", daemon=True)
    watcher.start()

    def stop() -> None:
        done.set()
        watcher.join()

    return stop


def end_this_process(reason: str) -> None:
    """For a model process that can never answer again: the Python backend fails what it
    was running as retryable, and the supervisor starts the model again. The reason goes
    to stderr (tritonserver's log), not through the backend's logger: that hands it to a
    thread which sends it to tritonserver through shared memory, and a process killed
    while that thread holds a lock there leaves it held, which aborts tritonserver when
    it next takes it (Triton 2.51: boost::interprocess::lock_exception)."""
    os.write(2, f"model process {os.getpid()}: {reason}: this process exits\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)


class Refusal(Exception):
    """A request this model answers with an error code other than INTERNAL."""

    # The name of the TritonError code: pb_utils binds them only once the stub runs.
    code = "INTERNAL"


class Unavailable(Refusal):
    """The server cannot do the edit now (restarting component, shutdown): retry."""

    code = "UNAVAILABLE"


class Cancelled(Refusal):
    """The caller gave up on the request (cancelled, deadline passed, disconnected)."""

    code = "CANCELLED"


# What Triton says of a model whose process died, hung, is reloading or is stopping.
_DOWN_SIGNS = (
    "not healthy",
    "health mutex",
    "is not ready",
    "no available versions",
    "server not ready",
    "server is stopping",
)


def first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "no message"


def raise_for_component(model: str, error: Any) -> None:
    """Raises the right exception for an error a BLS call to a component returned."""
    message = error.message()
    if error.code() == pb_utils.TritonError.CANCELLED:
        raise Cancelled(f"{model}: the request was cancelled")
    if error.code() in (pb_utils.TritonError.UNAVAILABLE, pb_utils.TritonError.NOT_FOUND) or any(
        sign in message.lower() for sign in _DOWN_SIGNS
    ):
        raise Unavailable(f"{model} is restarting or unavailable, retry: {first_line(message)}")
    raise RuntimeError(f"{model} failed: {first_line(message)}")


def _code_and_message(error: Exception, model: str) -> tuple[str, str]:
    if isinstance(error, InvalidArgumentError):
        return "INVALID_ARG", str(error)
    if isinstance(error, Refusal):
        return error.code, str(error)
    incident = secrets.token_hex(4)
    pb_utils.Logger.log_error(
        f"{model}: internal error {incident}:\n{''.join(traceback.format_exception(error))}"
    )
    return "INTERNAL", (
        f"{model} failed: internal error {incident} ({type(error).__name__}); "
        "the server log has the details"
    )


def error_response(error: Exception, model: str) -> Any:
    """The response for a failed request: the right code and a one-line message."""
    code, message = _code_and_message(error, model)
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code))
    )


def forwarded_failure(error: Exception, model: str) -> Any:
    """The response for a failed edit a unary model forwarded: the code's name and the
    message as an output. Triton 2.51's BLS hands a decoupled model's error codes back as
    INTERNAL, and an error response sent after the forwarding model's own caller left
    never reaches it."""
    code, message = _code_and_message(error, model)
    failure = np.array([f"{code} {message}".encode()], dtype=np.object_)
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(FAILURE_OUTPUT, failure)])


def forwarded_error_response(failure: Any) -> Any:
    """This model's answer for the failure a forwarded edit sent (`forwarded_failure`)."""
    code, _, message = bytes(as_numpy(failure).reshape(-1)[0]).decode().partition(" ")
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code))
    )
