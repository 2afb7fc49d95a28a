"""Requests that Triton's dynamic batcher hands a Python backend model together.

The batcher gives `execute` a list of requests; those whose tensors agree past the batch
axis are concatenated and run as one call, then the outputs are cut back into per-request
rows. That is where concurrent edits' UNet steps merge, whatever runs the call (onnxruntime
or OpenVINO).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

Tensors = dict[str, np.ndarray]


class Runnable(Protocol):
    """A component model in this process (onnxruntime session, OpenVINO compiled model)."""

    def run(self, inputs: Tensors) -> Tensors: ...


class Component(Protocol):
    """What a component's Triton model serves: requests that arrived together, run merged."""

    input_names: list[str]

    def run_merged(self, requests: Sequence[Tensors]) -> list[Tensors]: ...

    def close(self) -> None: ...


def model_feed(inputs: Tensors, input_names: Sequence[str], input_ranks: dict[str, int]) -> Tensors:
    """The named inputs as the model takes them: Triton carries a [batch] tensor as
    [batch, 1] (dims [1] + reshape []), which goes back to [batch] here."""
    feed = {}
    for name in input_names:
        array = inputs[name]
        if array.ndim == input_ranks[name] + 1 and array.shape[-1] == 1:
            array = array.reshape(array.shape[:-1])
        feed[name] = array
    return feed


def run_merged(
    requests: Sequence[Tensors], input_names: Sequence[str], run: Callable[[Tensors], Tensors]
) -> list[Tensors]:
    """Runs `requests` through `run`, one call per group of equal non-batch shapes;
    returns each request's outputs, in order."""
    results: list[Tensors | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(requests):
        key = tuple(request[name].shape[1:] for name in input_names)
        groups.setdefault(key, []).append(index)
    for indices in groups.values():
        if len(indices) == 1:
            results[indices[0]] = run(requests[indices[0]])
            continue
        merged = {
            name: np.concatenate([requests[i][name] for i in indices]) for name in input_names
        }
        outputs = run(merged)
        offset = 0
        for i in indices:
            rows = requests[i][input_names[0]].shape[0]
            results[i] = {name: value[offset : offset + rows] for name, value in outputs.items()}
            offset += rows
    return results  # type: ignore[return-value]
