"""Every config.pbtxt of a repository, built as Triton's `ModelConfig` protobuf.

Built from the component specs of the export's manifest and from the public contract,
so field names and tensor names cannot drift from what export, engines and clients use.

    text_encoder, vae_encoder, vae_decoder   the exported components
    unet_pix2pix, unet_img2img               dynamic batching merges concurrent steps
    instruct_pix2pix, img2img                the edit models clients call (Python BLS)
    instruct_pix2pix_stream, img2img_stream  the same, streaming progress (decoupled)
    readiness                                the gate the supervisor switches readiness with
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from edit_pipeline.component_inputs import Bounds, InputBounds
from edit_pipeline.openvino_component import bf16_unsupported_reason
from edit_pipeline.preprocess import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, ImageLimits
from edit_pipeline.runtime_status import CANCEL_TOKEN_INPUT, FAILURE_OUTPUT
from export.components import MIN_IMAGE_SIDE, UNET_FOR_PIPELINE, ComponentSpec, TensorSpec
from export.openvino_ir import IR_FILE
from model_repository.arguments import option
from pix2pix_client.contract import (
    OUTPUTS,
    PIPELINES,
    STREAM_OUTPUTS,
    parameters_for,
    stream_model,
)

KIND_AUTO = mc.ModelInstanceGroup.KIND_AUTO
KIND_CPU = mc.ModelInstanceGroup.KIND_CPU
KIND_GPU = mc.ModelInstanceGroup.KIND_GPU

FLAVOURS = ("python-onnxruntime", "onnxruntime", "tensorrt", "python-openvino", "openvino")
# The flavours whose components OpenVINO runs: they read the plain ONNX export, or IR
# made from it (openvino_model_file).
OPENVINO_FLAVOURS = ("python-openvino", "openvino")
# The flavours whose components are Python backend models (the wheel's tritonserver).
PYTHON_FLAVOURS = ("python-onnxruntime", "python-openvino")
# What the components compute in: fp16 is an fp16 export (GPUs), bf16 is OpenVINO's
# inference precision on CPUs with native bf16 (AVX512_BF16 or AMX), int8 the openvino
# flavours' UNets quantized by export.int8 (what is not quantized in bf16 where the CPU
# has it, fp32 elsewhere).
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
# The precisions only OpenVINO computes.
OPENVINO_PRECISIONS = ("bf16", "int8")
# A flavour or precision chosen for this machine when the repository is built.
AUTO = "auto"
READINESS_MODEL = "readiness"
# The file both openvino flavours read at fp32: the plain ONNX export, as it is (bf16 and
# int8: IR, openvino_model_file).
OPENVINO_MODEL_FILE = "model.onnx"
# The rate limiter's resource: held by a component model instance while it computes.
CPU_RESOURCE = "cpu_cores"

# Export dtype names -> Triton's config types (the contract's own are wire type names).
_SPEC_DTYPES = {
    "float32": mc.TYPE_FP32,
    "float16": mc.TYPE_FP16,
    "int32": mc.TYPE_INT32,
    "int64": mc.TYPE_INT64,
    "bytes": mc.TYPE_STRING,
}


@dataclass(frozen=True)
class RepositoryOptions:
    """Serving settings that are not part of the export: one set for `make serve`, the
    builder and the benchmark, each a flag of their command lines."""

    flavour: str = option(
        AUTO,
        "how the components run (docs/flavours.md); auto: python-openvino where the CPU "
        "computes bf16 natively, python-onnxruntime elsewhere",
        choices=(AUTO, *FLAVOURS),
    )
    pipelines: tuple[str, ...] = option(
        (), "the pipelines served (none given: every one the export has)", choices=PIPELINES
    )
    streaming_models: bool = option(
        True,
        "serve each pipeline's streaming model too; it then runs the unary model's edits "
        "as well (one edit process per pipeline)",
    )
    max_image_side: int = option(DEFAULT_MAX_SIDE, "longer side images are resized to")
    max_image_pixels: int = option(DEFAULT_MAX_PIXELS, "decoded pixels allowed at most")
    edit_instances: int = option(
        0,
        "edits each edit model runs at once; 0: from the machine's cores and memory and the "
        "model's size (docs/operating.md)",
    )
    max_edits: int = option(
        8, "edits each edit model holds, running and waiting; more get UNAVAILABLE at once"
    )
    unet_queue_delay_us: int = option(
        # Small against a UNet step (tens of ms on GPU, hundreds on CPU), longer than the
        # few ms an edit's loop spends between steps, so that concurrent loops meet.
        5000,
        "microseconds the UNet's dynamic batcher waits for a partner request",
    )
    precision: str = option(
        AUTO,
        "what the components compute in: fp32; bf16 (openvino flavours, CPUs with "
        "AVX512_BF16 or AMX); fp16 (an fp16 export, GPUs); int8 (openvino flavours: the "
        "UNets quantized by export.int8, opt-in); auto: bf16 where the flavour and the CPU "
        "compute it, fp32 elsewhere",
        choices=(AUTO, *PRECISIONS),
    )
    intra_op_threads: int = option(
        0, "threads per component (onnxruntime session, OpenVINO compiled model); 0: all cores"
    )
    openvino_streams: int = option(
        # One call at a time reaches a component: more streams would split its cores.
        1,
        "openvino flavours: OpenVINO CPU streams per component",
    )
    allow_spinning: bool = option(
        True, "idle onnxruntime pool threads spin (fast hand-offs, CPU taken from others)"
    )
    cpu_rate_limit: bool = option(
        # Two sessions computing at once on a CPU only take cores from each other.
        True,
        "python flavours: one component computes at a time, with every core",
    )
    unet_split_threads: bool = option(
        # More edits/s on a CPU; the first merged call loads one more UNet copy per core.
        False,
        "python-onnxruntime: merged UNet calls run side by side on one-thread sessions",
    )

    release_activations: bool = option(
        # A UNet is called every step: it keeps its working memory for the next one. Its
        # shallow pass runs between full ones, which need that memory: in OpenVINO giving
        # it back costs the pass about 5%; in onnxruntime both passes share one arena.
        True,
        "python flavours: the components called once per edit (text encoder, VAE) give "
        "their working memory back after each call; python-openvino: so does a UNet's "
        "shallow pass (cache_interval above 1)",
    )
    unet_idle_release_s: float = option(
        # Longer than the gap between one edit's steps or between edits in a row (at SD
        # 1.5 size, 512x512: 0.5 GB per UNet in bf16 that an idle server holds otherwise).
        10.0,
        "python-openvino: a UNet that has had no call for this many seconds gives its "
        "working memory back; 0: it keeps it",
    )
    onnxruntime_fusions: bool = option(
        True, "onnxruntime flavours: serve the export with onnxruntime's fusions (faster)"
    )
    cpu_graphs: bool = option(
        # At sd15 size the saved graphs start a server in 8 s instead of 17 s and take
        # 7.7 GB of disk (edit_pipeline/cpu_graph.py).
        True,
        "python-onnxruntime: serve each graph as onnxruntime optimized it for this CPU, "
        "saved once beside the export (a faster start, as much disk again as the export)",
    )

    def for_this_machine(self) -> RepositoryOptions:
        """These options with an `auto` flavour and precision made concrete: bf16 in
        python-openvino where this CPU computes bf16 natively, fp32 in python-onnxruntime
        (the exact-parity mode) elsewhere; a precision given picks the flavour that
        computes it, a flavour given takes the best precision it has here (never int8,
        which is asked for)."""
        if AUTO not in (self.flavour, self.precision):
            return self
        bf16 = bf16_unsupported_reason() is None
        precision = self.precision
        if precision == AUTO:
            openvino = self.flavour in (AUTO, *OPENVINO_FLAVOURS)
            precision = "bf16" if openvino and bf16 else "fp32"
        flavour = self.flavour
        if flavour == AUTO:
            openvino = precision in OPENVINO_PRECISIONS
            flavour = "python-openvino" if openvino else "python-onnxruntime"
        return replace(self, flavour=flavour, precision=precision)

    @property
    def fused_export(self) -> bool:
        """Whether the export served has onnxruntime's fusions (contrib ops that only
        onnxruntime runs): faster there, unreadable for TensorRT and OpenVINO."""
        return self.onnxruntime_fusions and self.flavour in ("python-onnxruntime", "onnxruntime")

    def check(self) -> None:
        """Raises ValueError naming the first option outside its allowed values."""
        if self.flavour not in (AUTO, *FLAVOURS):
            allowed = ", ".join((AUTO, *FLAVOURS))
            raise ValueError(f"flavour={self.flavour!r}: allowed one of {allowed}")
        unknown = [p for p in self.pipelines if p not in PIPELINES]
        if unknown:
            raise ValueError(f"pipelines={unknown}: allowed {', '.join(PIPELINES)}")
        if self.edit_instances < 0:
            raise ValueError(f"edit_instances={self.edit_instances}: allowed >= 0 (0: derived)")
        if self.precision not in (AUTO, *PRECISIONS):
            allowed = ", ".join((AUTO, *PRECISIONS))
            raise ValueError(f"precision={self.precision!r}: allowed one of {allowed}")
        openvino = self.flavour in OPENVINO_FLAVOURS
        if self.precision in OPENVINO_PRECISIONS and not (openvino or self.flavour == AUTO):
            raise ValueError(
                f"precision={self.precision} with flavour={self.flavour}: only the openvino "
                f"flavours ({', '.join(OPENVINO_FLAVOURS)}) compute in {self.precision}"
            )
        if self.precision == "fp16" and openvino:
            raise ValueError(
                f"precision=fp16 with flavour={self.flavour}: the openvino flavours take "
                "fp32, bf16 or int8"
            )
        if self.openvino_streams < 1:
            raise ValueError(f"openvino_streams={self.openvino_streams}: allowed >= 1")
        at_least = {
            "max_image_side": (self.max_image_side, 8),
            "max_image_pixels": (self.max_image_pixels, 64),
            "intra_op_threads": (self.intra_op_threads, 0),
            "unet_queue_delay_us": (self.unet_queue_delay_us, 0),
        }
        for name, (value, least) in at_least.items():
            if value < least:
                raise ValueError(f"{name}={value}: allowed >= {least}")
        idle = self.unet_idle_release_s
        if not math.isfinite(idle) or idle < 0:
            raise ValueError(f"unet_idle_release_s={idle}: allowed seconds >= 0 (0: it keeps it)")
        if self.max_edits <= max(self.edit_instances, 1):
            raise ValueError(
                f"max_edits={self.max_edits}: allowed more than edit_instances "
                f"({self.edit_instances or 1}); Triton's queue holds the difference"
            )

    def image_limits(self, side_multiple: int) -> ImageLimits:
        # TensorRT engines only run inside their optimization profile.
        min_side = MIN_IMAGE_SIDE if self.flavour == "tensorrt" else side_multiple
        return ImageLimits(
            max_side=self.max_image_side,
            max_pixels=self.max_image_pixels,
            min_side=min_side,
            side_multiple=side_multiple,
        )


# The derived edit instances: one per this many cores (a CPU edit computes on all of
# them; more at once only buys the UNet batches of their merged steps), at most this many.
CORES_PER_EDIT_INSTANCE = 8
MAX_DERIVED_EDIT_INSTANCES = 4
GPU_EDIT_INSTANCES = 2
# What one more running edit costs beyond the weights: its Python backend process (the
# edit model's libraries) and the UNet's working memory for its rows, as a fraction of the
# UNet's weight bytes at a 512x512 image, growing with the pixels.
EDIT_PROCESS_BYTES = 350 * 2**20
UNET_WORKING_FRACTION_AT_512 = 0.5
# The rest of the server, as in the memory budget: 1.25 x the weights + 1.5 GB.
WEIGHT_OVERHEAD = 1.25
SERVER_ALLOWANCE_BYTES = 1.5e9


def machine_memory_bytes() -> int:
    """The memory this process may use: the cgroup's limit (a container's) where there is
    one, else the machine's."""
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return pages
    return min(pages, int(limit)) if limit.isdigit() else pages


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def derived_edit_instances(
    options: RepositoryOptions,
    served_weight_bytes: int,
    unet_weight_bytes: int,
    edit_models: int,
    cores: int | None = None,
    memory_bytes: int | None = None,
) -> int:
    """Edits each edit model runs at once, when not given: what the cores use, as far as
    the memory holds every edit model's running edits at the largest image accepted.
    Waiting edits (up to max_edits) hold only their request."""
    if options.flavour == "tensorrt":
        return min(GPU_EDIT_INSTANCES, options.max_edits - 1)
    cores = usable_cores() if cores is None else cores
    memory_bytes = machine_memory_bytes() if memory_bytes is None else memory_bytes
    by_cores = min(MAX_DERIVED_EDIT_INSTANCES, cores // CORES_PER_EDIT_INSTANCE)
    pixels = min(options.max_image_side**2, options.max_image_pixels)
    working = UNET_WORKING_FRACTION_AT_512 * unet_weight_bytes * pixels / 512**2
    per_instance = edit_models * (EDIT_PROCESS_BYTES + working)
    room = memory_bytes - WEIGHT_OVERHEAD * served_weight_bytes - SERVER_ALLOWANCE_BYTES
    by_memory = int(room // per_instance)
    return max(1, min(by_cores, by_memory, options.max_edits - 1))


def server_arguments(options: RepositoryOptions) -> list[str]:
    """tritonserver flags the repository needs (TritonServer adds them from repository.json)."""
    if options.flavour in PYTHON_FLAVOURS and options.cpu_rate_limit:
        return ["--rate-limit=execution_count"]
    return []


def _parameters(config: Any, values: dict[str, Any]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def _tensor(message: Any, tensor: TensorSpec, batched: bool = True, optional: bool = False) -> None:
    """A tensor of a component: batched, the config lists the dims after the batch axis;
    unbatched (max_batch_size 0), every dim, the batch axis one of the variable ones."""
    message.name = tensor.name
    if optional:
        message.optional = True
    message.data_type = _SPEC_DTYPES[tensor.dtype]
    dims = [-1 if isinstance(d, str) else int(d) for d in tensor.dims[1 if batched else 0 :]]
    if len(tensor.dims) > 1:
        message.dims.extend(dims)
        return
    # A tensor that is only the batch axis, like the UNet's per-row timestep: Triton wants
    # a dim past the batch axis, so it travels as [batch, 1] (what the edit models send)
    # and reaches the model as [batch].
    message.dims.extend([*dims, 1])
    message.reshape.SetInParent()
    message.reshape.shape.extend(dims)


def _scalar(message: Any, name: str, wire_type: str, optional: bool) -> None:
    """A [1]-shaped contract tensor of a model without a batch axis."""
    message.name = name
    # The wire's BYTES is a config's TYPE_STRING; the other names agree.
    message.data_type = getattr(mc, "TYPE_STRING" if wire_type == "BYTES" else f"TYPE_{wire_type}")
    message.dims.append(1)
    if optional:
        message.optional = True


def input_bounds(spec: ComponentSpec, limits: ImageLimits) -> InputBounds:
    """The inputs edits within `limits` send a component (edit_pipeline/component_inputs.py):
    images of `min_side` to `max_side` pixels a side, floored to a multiple of
    `side_multiple`; their latents that many times smaller; batches up to the spec's;
    values within the spec's bounds."""
    multiple = limits.side_multiple
    least, most = max(limits.min_side // multiple, 1), limits.max_side // multiple
    latent = Bounds(least, most)
    axes = {
        "batch": Bounds(1, spec.axes["batch"].max),
        "latent_height": latent,
        "latent_width": latent,
        "height": Bounds(least * multiple, most * multiple, multiple),
        "width": Bounds(least * multiple, most * multiple, multiple),
    }
    dims = {tensor.name: tensor.dims for tensor in spec.inputs}
    named = {dim for tensor_dims in dims.values() for dim in tensor_dims if isinstance(dim, str)}
    values = {t.name: Bounds(*t.values) for t in spec.inputs if t.values is not None}
    return InputBounds(dims, {axis: axes[axis] for axis in sorted(named)}, values)


def component_config(
    spec: ComponentSpec,
    options: RepositoryOptions,
    limits: ImageLimits,
    optional_inputs: Sequence[str] = (),
) -> Any:
    """config.pbtxt of an exported component, for the chosen flavour; `optional_inputs`
    may be left out of a request; inputs of shapes or values no edit within `limits` sends
    are refused (input_bounds) in the Python backend's flavours."""
    # Triton's OpenVINO backend (r24.10) fixes a batching model's batch to max_batch_size
    # and refuses smaller ones (or pads them, computing the padding): with max_batch_size 0
    # the batch stays a dynamic dim of OpenVINO's own, without Triton's dynamic batcher.
    batched = options.flavour != "openvino"
    config = mc.ModelConfig(name=spec.name, max_batch_size=spec.axes["batch"].max if batched else 0)
    for tensor in spec.inputs:
        _tensor(config.input.add(), tensor, batched, optional=tensor.name in optional_inputs)
    for tensor in spec.outputs:
        _tensor(config.output.add(), tensor, batched)
    is_unet = spec.name.startswith(tuple(UNET_FOR_PIPELINE.values()))
    if options.flavour == "python-onnxruntime":
        config.backend = "python"
        _parameters(
            config,
            {
                "intra_op_threads": options.intra_op_threads,
                "allow_spinning": int(options.allow_spinning),
                "split_threads": int(options.unet_split_threads and is_unet),
                "release_activations": int(options.release_activations and not is_unet),
            },
        )
    elif options.flavour == "python-openvino":
        config.backend = "python"
        _parameters(
            config,
            {
                "model_file": openvino_model_file(options.precision),
                "precision": options.precision,
                "threads": options.intra_op_threads,
                "streams": options.openvino_streams,
                "release_activations": int(options.release_activations and not is_unet),
                "release_shallow_activations": int(options.release_activations and is_unet),
                "release_after_idle_s": options.unet_idle_release_s if is_unet else 0,
            },
        )
    elif options.flavour == "openvino":
        config.backend = "openvino"
        config.default_model_filename = openvino_model_file(options.precision)
        _parameters(config, openvino_backend_parameters(options))
        config.instance_group.add(count=1, kind=KIND_CPU)
    elif options.flavour == "onnxruntime":
        config.platform = "onnxruntime_onnx"
        _parameters(
            config,
            {"intra_op_thread_count": options.intra_op_threads, "inter_op_thread_count": 1},
        )
        config.instance_group.add(count=1, kind=KIND_AUTO)
    else:
        config.platform = "tensorrt_plan"
        config.instance_group.add(count=1, kind=KIND_GPU)
    if options.flavour in PYTHON_FLAVOURS:
        bounds = input_bounds(spec, limits).to_json()
        _parameters(config, {"input_bounds": json.dumps(bounds)})
        group = config.instance_group.add(count=1, kind=KIND_CPU)
        if options.cpu_rate_limit:
            group.rate_limiter.resources.add(name=CPU_RESOURCE, count=1, **{"global": True})
    if is_unet and batched:
        config.dynamic_batching.max_queue_delay_microseconds = options.unet_queue_delay_us
    return config


def openvino_backend_parameters(options: RepositoryOptions) -> dict[str, str]:
    """The `parameters` Triton's OpenVINO backend (r24.10) reads for the CPU."""
    parameters = {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": str(options.openvino_streams),
    }
    if options.intra_op_threads > 0:
        parameters["INFERENCE_NUM_THREADS"] = str(options.intra_op_threads)
    # The backend's only precision switch: inference_precision(bf16) when YES. int8 computes
    # what it does not quantize in bf16 where the building machine's CPU has it.
    native_bf16 = bf16_unsupported_reason() is None
    if options.precision == "bf16" or (options.precision == "int8" and native_bf16):
        parameters["HINT_BF16"] = "YES"
    return parameters


def openvino_model_file(precision: str) -> str:
    """The file an openvino flavour's components read: IR at bf16 and int8 (the weights
    stored in fp16, export/openvino_ir.py; at int8 the UNets quantized, export/int8.py),
    the plain ONNX export at fp32."""
    return IR_FILE if precision in OPENVINO_PRECISIONS else OPENVINO_MODEL_FILE


def edit_instance_kind(flavour: str) -> int:
    """Where an edit model runs: next to its UNet, so the loop's tensors never move.

    tensorrt UNets are on a GPU; onnxruntime backend UNets are wherever Triton put them
    (KIND_AUTO: a GPU when there is one); the python and openvino flavours' UNets are on
    the CPU.
    """
    return {"tensorrt": KIND_GPU, "onnxruntime": KIND_AUTO}.get(flavour, KIND_CPU)


def edit_config(
    pipeline: str, options: RepositoryOptions, streaming: bool = False, forwards: bool = False
) -> Any:
    """A model clients call: the contract's inputs and outputs, one edit per instance.

    The streaming model is the same model made decoupled: it answers with a response per
    denoising step before the result, over gRPC streams only. A unary model that
    `forwards` runs its edits in the streaming model (forward_model.py): it computes
    nothing, so it runs on the CPU whatever the flavour.
    """
    name = stream_model(pipeline) if streaming else pipeline
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    # Every input is optional to Triton, required ones included: the model names a
    # missing input and its allowed values itself, which Triton's own check does not.
    for parameter in parameters_for(pipeline, streaming):
        _scalar(config.input.add(), parameter.name, parameter.wire_type, optional=True)
    for output, wire_type, _ in STREAM_OUTPUTS if streaming else OUTPUTS:
        _scalar(config.output.add(), output, wire_type, optional=False)
    if streaming:
        config.model_transaction_policy.decoupled = True
        _scalar(config.input.add(), CANCEL_TOKEN_INPUT, "BYTES", optional=True)
        _scalar(config.output.add(), FAILURE_OUTPUT, "BYTES", optional=False)
    if forwards:
        _parameters(config, {"streaming_model": stream_model(pipeline)})
    kind = KIND_CPU if forwards else edit_instance_kind(options.flavour)
    config.instance_group.add(count=options.edit_instances, kind=kind)
    # Edits beyond the running ones wait here, up to a bound; past it Triton refuses them
    # at once with UNAVAILABLE instead of queueing without end.
    policy = config.dynamic_batching.default_queue_policy
    policy.max_queue_size = options.max_edits - options.edit_instances
    # A request may carry its own queue timeout (tritonclient's `timeout`).
    policy.allow_timeout_override = True
    # Inputs stay where the encoders left them (GPU memory on a GPU) instead of being
    # copied to the CPU first, the Python backend's default.
    _parameters(config, {"FORCE_CPU_ONLY_INPUT_TENSORS": "no"})
    return config


def readiness_config() -> Any:
    config = mc.ModelConfig(name=READINESS_MODEL, backend="python", max_batch_size=0)
    _scalar(config.input.add(), "probe", "BOOL", optional=False)
    _scalar(config.output.add(), "ready", "BOOL", optional=False)
    config.instance_group.add(count=1, kind=KIND_CPU)
    return config
