"""An exported component run by OpenVINO inside a Python backend model.

Used by the `python-openvino` flavour. OpenVINO compiles for the CPU the plain ONNX export
(the onnxruntime fusions' contrib ops are no ONNX it reads) in fp32, or in bf16 the IR
with fp16-stored weights converted from it (export/openvino_ir.py); at int8 the UNets'
quantized IR (export/int8.py) computes its quantized operations in int8 and, like the
components not quantized, the rest in bf16 where the CPU computes it natively, fp32
elsewhere.
bf16 halves the work of the convolutions and matrix products on CPUs that compute it
natively (AVX512_BF16, AMX); elsewhere it buys no speed, so building a bf16 repository
there is refused with one line, and a bf16 repository loaded there computes in fp32 and
logs why (one built on another machine).

Requests that arrive together (Triton's dynamic batcher) and share a shape run as one
call, as in the onnxruntime flavour (edit_pipeline/batching.py). A component called once
per edit (the encoders, the VAE), and a UNet's shallow pass (edit_pipeline/unet_passes.py),
give their working memory back after each call (`release_activations`: OpenVINO's
`release_memory`, then the heap's free pages); the full UNet keeps its own for the next
step, and gives it back once it has been idle a while (`release_after_idle_s`,
edit_pipeline/idle_release.py). A component read from IR gives back the pages of its
mapped weights file once a call of a new shape has packed them
(edit_pipeline/page_release.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edit_pipeline.batching import model_feed, run_merged
from edit_pipeline.idle_release import IdleRelease
from edit_pipeline.page_release import release_free_heap, release_mapped_pages

# What OpenVINO computes in, by the project's name: OpenVINO's name of it.
INFERENCE_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
# The precisions a component takes: int8 is the quantized IR's, not an inference precision.
PRECISIONS = (*INFERENCE_PRECISIONS, "int8")
# /proc/cpuinfo flags of native bf16 arithmetic: AVX-512 BF16 dot products, or AMX tiles.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_fields() -> dict[str, str] | None:
    """The first processor's fields as Linux reports them (CPUINFO: "model name",
    "cpu family", "flags", ...); None where there is none."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() and fields:
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def feature_flags(fields: dict[str, str]) -> set[str]:
    """The feature flags among a processor's fields: "flags" on x86, "Features" on Arm."""
    return set(fields.get("flags", fields.get("Features", "")).split())


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as Linux reports them (CPUINFO); None where there is none."""
    fields = cpu_fields()
    return None if fields is None else feature_flags(fields)


@functools.cache
def openvino_capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU plugin says this CPU computes fast (BF16, FP32, INT8, ...); asked
    once per process (a Core each time would load the CPU plugin again)."""
    import openvino as ov

    return tuple(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def bf16_unsupported_reason(
    flags: set[str] | None = None, capabilities: Sequence[str] | None = None
) -> str | None:
    """Why this CPU cannot run bf16 natively, or None when it can.

    Both must agree: Linux's flags (AVX512_BF16 or AMX-BF16), where there are any, and
    OpenVINO's CPU plugin (its BF16 capability).
    """
    flags = cpu_flags() if flags is None else flags
    capabilities = openvino_capabilities() if capabilities is None else capabilities
    if flags is not None and not flags & set(BF16_CPU_FLAGS):
        return f"this CPU has neither {' nor '.join(BF16_CPU_FLAGS)}"
    if "BF16" not in capabilities:
        return "OpenVINO lists no BF16 among this CPU's capabilities"
    return None


def _check_known(precision: str) -> None:
    if precision not in PRECISIONS:
        allowed = ", ".join(PRECISIONS)
        raise ValueError(f"precision={precision!r}: allowed one of {allowed}")


def check_precision(precision: str) -> None:
    """Raises ValueError (one line) when this CPU cannot compute in `precision`."""
    _check_known(precision)
    if precision == "bf16" and (reason := bf16_unsupported_reason()):
        raise ValueError(
            f"precision=bf16: {reason}, so bf16 would buy no speed here; use precision fp32"
        )


def floating_point_precision(precision: str) -> str:
    """What a component served at `precision` computes its floating-point operations in on
    this CPU: bf16 where the CPU computes it natively (for int8's operations left in
    floating point too), fp32 elsewhere."""
    if precision == "fp32" or bf16_unsupported_reason() is not None:
        return "fp32"
    return "bf16"


def compile_properties(precision: str, threads: int, streams: int) -> dict[str, Any]:
    """OpenVINO CPU properties of one component's compiled model.

    One stream with every thread it is given (0: all cores), the latency hint: one call at
    a time, as the Python backend hands them over.
    """
    properties: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": INFERENCE_PRECISIONS[precision],
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": streams,
    }
    if threads > 0:
        properties["INFERENCE_NUM_THREADS"] = threads
    return properties


class OpenVinoComponent:
    """One exported model compiled by OpenVINO for the CPU, runnable on merged batches."""

    def __init__(
        self,
        model_path: Path,
        precision: str = "fp32",
        threads: int = 0,
        streams: int = 1,
        release_activations: bool = False,
        release_after_idle_s: float = 0.0,
    ) -> None:
        import openvino as ov

        _check_known(precision)
        self.model_path = Path(model_path)
        # A repository built on a bf16 machine may be served on another (replicas, S3).
        self.fallback_reason = bf16_unsupported_reason() if precision == "bf16" else None
        self.precision = floating_point_precision(precision)
        self._properties = compile_properties(self.precision, threads, streams)
        self._core = ov.Core()
        model = self._core.read_model(str(self.model_path))
        self.input_names = [port.get_any_name() for port in model.inputs]
        self.input_ranks = {
            port.get_any_name(): port.get_partial_shape().rank.get_length() for port in model.inputs
        }
        self.output_names = [port.get_any_name() for port in model.outputs]
        self._compile(model)
        self.release_activations = release_activations
        self.idle_release = IdleRelease(self._release_working_memory, release_after_idle_s)
        # IR's weights file, which OpenVINO maps and packs from on a shape's first call.
        ir = self.model_path.suffix == ".xml"
        self._mapped_weights = self.model_path.with_suffix(".bin") if ir else None

    def _compile(self, model: Any = None) -> None:
        """Compiles the model (read again from its file when not given) and its request."""
        self._request = self.compiled = None  # the old one's memory first
        if model is None:
            model = self._core.read_model(str(self.model_path))
        self.compiled = self._core.compile_model(model, "CPU", self._properties)
        self._request = self.compiled.create_infer_request()
        # A new compiled model packs the mapped weights again on each shape's first call.
        self._shapes_packed: set[tuple[tuple[int, ...], ...]] = set()

    @property
    def inference_precision(self) -> str:
        """The precision the compiled model computes in, as OpenVINO reports it."""
        reported = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        return {name: key for key, name in INFERENCE_PRECISIONS.items()}.get(reported, reported)

    def _release_working_memory(self) -> None:
        if self.compiled is not None:  # None after a failed call, until the next one
            self.compiled.release_memory()
        release_free_heap()

    def close(self) -> None:
        """Releases the compiled model and its infer request."""
        self.idle_release.close()
        self._request = None
        self.compiled = None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call: named inputs -> named outputs (arrays of their own)."""
        feed = {
            name: np.ascontiguousarray(array)
            for name, array in model_feed(inputs, self.input_names, self.input_ranks).items()
        }
        with self.idle_release.calling():
            if self._request is None:
                self._compile()
            try:
                outputs = self._request.infer(feed, share_inputs=True, share_outputs=False)
            except Exception:
                # A call that failed part-way (a shape the model cannot take) can leave the
                # compiled model's memory such that later calls read wrong values once its
                # working memory was released (NaN latents, OpenVINO 2026.4), and a new
                # request does not help: the next call compiles it again (and so does each
                # one after it until a compilation succeeds).
                self._request = self.compiled = None
                raise
            results = {name: outputs[name] for name in self.output_names}
            if self.release_activations:
                self._release_working_memory()
        shapes = tuple(array.shape for array in feed.values())
        if self._mapped_weights is not None and shapes not in self._shapes_packed:
            self._shapes_packed.add(shapes)
            release_mapped_pages(self._mapped_weights)
        return results

    def run_merged(self, requests: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Runs requests that arrived together (equal non-batch shapes as one batch);
        returns per-request outputs."""
        return run_merged(requests, self.input_names, self.run)
