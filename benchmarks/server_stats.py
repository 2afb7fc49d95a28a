"""Per-stage timings from Triton's statistics API, as deltas over a measured window.

Triton keeps cumulative counters per model (request count, and nanoseconds spent queued
and computing). A snapshot before and after a window, subtracted, gives what that window
cost; dividing by the edit model's request count in the window gives the cost per edit.
The components' calls come from the edit model through BLS and count under their models.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from benchmarks.settings import admin_key
from export.components import TEXT_ENCODER, UNET_FOR_PIPELINE, VAE_DECODER, VAE_ENCODER
from pix2pix_client.connection import normalise_headers


@dataclass(frozen=True)
class ModelCounters:
    """Triton's cumulative statistics of one model (durations in ns)."""

    requests: int = 0  # successful requests
    executions: int = 0  # model executions (a merged batch is one)
    success_ns: int = 0  # request latency inside the server: queue + compute
    queue_ns: int = 0
    compute_infer_ns: int = 0  # the model's own work

    def __sub__(self, other: ModelCounters) -> ModelCounters:
        return ModelCounters(
            **{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)}
        )

    def __add__(self, other: ModelCounters) -> ModelCounters:
        return ModelCounters(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )


def _int(value: Any) -> int:
    # The JSON form of the protobuf writes uint64 as strings; absent means zero.
    return int(value or 0)


def counters_from_json(statistics: dict[str, Any]) -> dict[str, ModelCounters]:
    """`get_inference_statistics(as_json=True)` -> counters per model name."""
    counters = {}
    for model in statistics.get("model_stats", []):
        stats = model.get("inference_stats", {})

        def ns(key: str, stats: dict[str, Any] = stats) -> int:
            return _int(stats.get(key, {}).get("ns"))

        counters[model["name"]] = ModelCounters(
            requests=_int(stats.get("success", {}).get("count")),
            executions=_int(model.get("execution_count")),
            success_ns=ns("success"),
            queue_ns=ns("queue"),
            compute_infer_ns=ns("compute_infer"),
        )
    return counters


def snapshot(client: Any) -> dict[str, ModelCounters]:
    """Counters of every model, from a tritonclient gRPC client.

    The statistics API is restricted: the call carries the admin key.
    """
    headers = normalise_headers(None, admin_key())
    return counters_from_json(client.get_inference_statistics(headers=headers, as_json=True))


def settled_snapshot(client: Any, timeout_s: float = 10.0) -> dict[str, ModelCounters]:
    """A snapshot once the counters stop moving.

    Triton updates a model's statistics just after it sends the response, so a snapshot
    taken the moment the last response arrived can miss that request: it would then fall
    into the next window.
    """
    import time

    deadline = time.monotonic() + timeout_s
    previous = snapshot(client)
    while True:
        time.sleep(0.2)
        current = snapshot(client)
        if current == previous or time.monotonic() > deadline:
            return current
        previous = current


def window(
    before: dict[str, ModelCounters], after: dict[str, ModelCounters]
) -> dict[str, ModelCounters]:
    """What happened between two snapshots."""
    return {name: counters - before.get(name, ModelCounters()) for name, counters in after.items()}


def combine(*windows: dict[str, ModelCounters]) -> dict[str, ModelCounters]:
    """Several windows (e.g. the rounds of one concurrency level) as one."""
    total: dict[str, ModelCounters] = {}
    for counters in windows:
        for name, value in counters.items():
            total[name] = total.get(name, ModelCounters()) + value
    return total


@dataclass(frozen=True)
class StageRow:
    """One stage of an edit, per edit (ms) over a window."""

    stage: str
    model: str
    calls_per_edit: float
    ms_per_call: float
    ms_per_edit: float
    queue_ms_per_edit: float
    # Model executions per edit: below calls_per_edit when the dynamic batcher merged calls.
    executions_per_edit: float = 0.0


def stage_rows(counters: dict[str, ModelCounters], pipeline: str) -> list[StageRow]:
    """The per-stage table of one edit model from a window's counters.

    Compute time is compute_infer (the model's own work). "edit model" is the edit
    model's compute minus its component calls' server time: decoding and resizing the
    image, tokenizing, the Python loop and scheduler math, the BLS round trips and the PNG
    encoding. The last row is the edit's end-to-end time inside the server.
    """
    edits = counters[pipeline].requests
    if edits <= 0:
        raise ValueError(f"no {pipeline} requests in this window")
    components = (
        ("text encoder", TEXT_ENCODER),
        ("VAE encoder", VAE_ENCODER),
        ("UNet x N", UNET_FOR_PIPELINE[pipeline]),
        ("VAE decoder", VAE_DECODER),
    )

    def row(stage: str, model: str) -> StageRow:
        c = counters.get(model, ModelCounters())
        return StageRow(
            stage=stage,
            model=model,
            calls_per_edit=c.requests / edits,
            ms_per_call=c.compute_infer_ns / c.requests / 1e6 if c.requests else 0.0,
            ms_per_edit=c.compute_infer_ns / edits / 1e6,
            queue_ms_per_edit=c.queue_ns / edits / 1e6,
            executions_per_edit=c.executions / edits,
        )

    edit = counters[pipeline]
    component_ns = sum(counters.get(m, ModelCounters()).success_ns for _, m in components)
    own_ns = max(edit.compute_infer_ns - component_ns, 0)
    return [
        *(row(stage, model) for stage, model in components),
        StageRow(
            stage="edit model (w/o components)",
            model=pipeline,
            calls_per_edit=1.0,
            ms_per_call=own_ns / edits / 1e6,
            ms_per_edit=own_ns / edits / 1e6,
            queue_ms_per_edit=edit.queue_ns / edits / 1e6,
            executions_per_edit=edit.executions / edits,
        ),
        StageRow(
            stage="end to end (server)",
            model=pipeline,
            calls_per_edit=1.0,
            ms_per_call=edit.success_ns / edits / 1e6,
            ms_per_edit=edit.success_ns / edits / 1e6,
            queue_ms_per_edit=edit.queue_ns / edits / 1e6,
            executions_per_edit=1.0,
        ),
    ]
