"""Writes a complete Triton model repository from an ONNX export (its manifest).

    python -m model_repository.builder EXPORT_DIR --output DIR
        [--flavour python-onnxruntime|onnxruntime|tensorrt] [--engines DIR]

Every config.pbtxt is built as Triton's `ModelConfig` protobuf from the component specs
in the manifest and the public contract, then printed in text format, so field names
and tensor names cannot drift from what export, engines and clients use.

Models (the same for every flavour; only how the five components run changes):

    preprocess_pix2pix, preprocess_img2img   Python: validate, decode image, tokenize
    text_encoder, vae_encoder, vae_decoder   the exported components
    unet_pix2pix, unet_img2img               dynamic batching merges concurrent steps
    sampler_pix2pix, sampler_img2img         Python BLS: the denoising loop
    postprocess                              Python: PNG encoding
    instruct_pix2pix, img2img                the ensembles clients call
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.components import (
    TEXT_ENCODER,
    UNET_FOR_PIPELINE,
    VAE_DECODER,
    VAE_ENCODER,
    ComponentSpec,
    TensorSpec,
)
from export.onnx_export import EXTERNAL_DATA_FILE, MODEL_FILE, load_manifest
from model_repository.preprocess import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, SIDE_MULTIPLE
from pix2pix_client.contract import IMG2IMG, INSTRUCT_PIX2PIX, OUTPUTS, parameters_for

KIND_AUTO = mc.ModelInstanceGroup.KIND_AUTO
KIND_CPU = mc.ModelInstanceGroup.KIND_CPU
KIND_GPU = mc.ModelInstanceGroup.KIND_GPU

FLAVOURS = ("python-onnxruntime", "onnxruntime", "tensorrt")
BACKEND_TEMPLATES = Path(__file__).parent / "backend"
POSTPROCESS = "postprocess"
SHORT_NAME = {INSTRUCT_PIX2PIX: "pix2pix", IMG2IMG: "img2img"}

DTYPES = {
    "float32": mc.TYPE_FP32,
    "float16": mc.TYPE_FP16,
    "int32": mc.TYPE_INT32,
    "int64": mc.TYPE_INT64,
    "bytes": mc.TYPE_STRING,
}
CONTRACT_DTYPES = {
    "TYPE_STRING": mc.TYPE_STRING,
    "TYPE_INT32": mc.TYPE_INT32,
    "TYPE_INT64": mc.TYPE_INT64,
    "TYPE_FP32": mc.TYPE_FP32,
}


def preprocess_model(pipeline: str) -> str:
    return f"preprocess_{SHORT_NAME[pipeline]}"


def sampler_model(pipeline: str) -> str:
    return f"sampler_{SHORT_NAME[pipeline]}"


@dataclass(frozen=True)
class RepositoryOptions:
    """Serving settings that are not part of the export."""

    flavour: str = "python-onnxruntime"
    max_image_side: int = DEFAULT_MAX_SIDE
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    sampler_instances: int = 2
    # Microseconds the UNet's dynamic batcher waits for a partner request: small against a
    # UNet step (tens of ms on GPU, hundreds on CPU), enough for concurrent loops to meet.
    unet_queue_delay_us: int = 2000
    # onnxruntime threads per component session; 0 lets onnxruntime use every core.
    intra_op_threads: int = 0
    # Whether idle onnxruntime pool threads spin (python-onnxruntime flavour): off, models
    # running at the same time in other processes keep their cores.
    allow_spinning: bool = True
    # python-onnxruntime: one component session computes at a time, with every core
    # (Triton's rate limiter); two sessions at once on a CPU only take cores from each
    # other. Needs the server flag in `server_arguments`.
    cpu_rate_limit: bool = True
    # python-onnxruntime UNets: calls the dynamic batcher merges run side by side, one
    # thread each, instead of as one batch (more edits/s on a CPU; the first merged call
    # loads one more copy of the UNet per core).
    unet_split_threads: bool = False


# The rate limiter's resource: held by a component model instance while it computes.
CPU_RESOURCE = "onnxruntime_cpu"


def server_arguments(options: RepositoryOptions) -> list[str]:
    """tritonserver flags the repository needs (TritonServer adds them from repository.json)."""
    if options.flavour == "python-onnxruntime" and options.cpu_rate_limit:
        return ["--rate-limit=execution_count"]
    return []


# --------------------------------------------------------------------------- tensors


def _dims(tensor: TensorSpec, batched: bool) -> list[int]:
    dims = tensor.dims[1:] if batched else tensor.dims
    return [-1 if isinstance(d, str) else int(d) for d in dims]


def _fill_tensor(message: Any, tensor: TensorSpec, batched: bool) -> None:
    message.name = tensor.name
    message.data_type = DTYPES[tensor.dtype]
    dims = _dims(tensor, batched)
    if dims:
        message.dims.extend(dims)
    else:
        # A tensor that is only the batch axis, like the UNet's per-row timestep: Triton
        # wants at least one dim, so it travels as [batch, 1] and reaches the model as [batch].
        message.dims.append(1)
        message.reshape.SetInParent()


def _with_batch(tensor: TensorSpec, batch: int, name: str | None = None) -> TensorSpec:
    """The same tensor with its batch axis fixed, as a Python step produces or takes it."""
    return TensorSpec(name or tensor.name, tensor.dtype, (batch, *tensor.dims[1:]))


def _parameters(config: Any, values: dict[str, Any]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def _io(config: Any, inputs: list[TensorSpec], outputs: list[TensorSpec], batched: bool) -> None:
    for tensor in inputs:
        _fill_tensor(config.input.add(), tensor, batched)
    for tensor in outputs:
        _fill_tensor(config.output.add(), tensor, batched)


# --------------------------------------------------------------------------- configs


def component_config(spec: ComponentSpec, options: RepositoryOptions) -> Any:
    """config.pbtxt of an exported component, for the chosen flavour."""
    config = mc.ModelConfig(name=spec.name, max_batch_size=spec.axes["batch"].max)
    _io(config, list(spec.inputs), list(spec.outputs), batched=True)
    if options.flavour == "python-onnxruntime":
        config.backend = "python"
        split = options.unet_split_threads and spec.name in UNET_FOR_PIPELINE.values()
        _parameters(
            config,
            {
                "intra_op_threads": options.intra_op_threads,
                "allow_spinning": int(options.allow_spinning),
                "split_threads": int(split),
            },
        )
        group = config.instance_group.add(count=1, kind=KIND_CPU)
        if options.cpu_rate_limit:
            group.rate_limiter.resources.add(name=CPU_RESOURCE, count=1, **{"global": True})
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
    if spec.name in UNET_FOR_PIPELINE.values():
        config.dynamic_batching.max_queue_delay_microseconds = options.unet_queue_delay_us
    return config


def _python_config(
    name: str, instances: int, parameters: dict[str, Any], kind: int = KIND_CPU
) -> Any:
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    config.instance_group.add(count=instances, kind=kind)
    _parameters(config, parameters)
    return config


def sampler_instance_kind(flavour: str) -> int:
    """Where the sampler loop runs: next to the UNet, so its tensors never change device.

    tensorrt UNets are on a GPU; onnxruntime backend UNets are wherever Triton put them
    (KIND_AUTO: a GPU when there is one); python-onnxruntime UNets are on the CPU.
    """
    return {"tensorrt": KIND_GPU, "onnxruntime": KIND_AUTO}.get(flavour, KIND_CPU)


def _contract_inputs(config: Any, pipeline: str) -> None:
    # Every input is optional to Triton, required ones included: Triton checks only how
    # many inputs an ensemble got, and a missing `prompt` ends in an ensemble "deadlock"
    # error. The preprocess model answers instead, naming the input and its values.
    for parameter in parameters_for(pipeline):
        _contract_tensor(config.input.add(), parameter.name, parameter.triton_dtype, True)


def _contract_tensor(message: Any, name: str, dtype: str, optional: bool) -> None:
    message.name = name
    message.data_type = CONTRACT_DTYPES[dtype]
    message.dims.append(1)
    if optional:
        message.optional = True


# The validated request as JSON (floats as the user typed them), and the seed chosen.
PARAMETERS_TENSOR = TensorSpec("parameters", "bytes", (1,))
SEED_USED_TENSOR = TensorSpec("seed_used", "int64", (1,))


@dataclass(frozen=True)
class PipelineTensors:
    """The tensors flowing between the steps of one ensemble."""

    input_ids: TensorSpec
    pixels: TensorSpec
    prompt_embeds: TensorSpec
    latent_mean: TensorSpec
    latent_std: TensorSpec
    latent: TensorSpec
    decoded: TensorSpec
    parameters: TensorSpec = PARAMETERS_TENSOR
    seed_used: TensorSpec = SEED_USED_TENSOR

    @classmethod
    def from_specs(cls, specs: dict[str, ComponentSpec]) -> PipelineTensors:
        text, encoder, decoder = specs[TEXT_ENCODER], specs[VAE_ENCODER], specs[VAE_DECODER]
        return cls(
            input_ids=_with_batch(text.inputs[0], 2),  # prompt, negative prompt
            # "image" is the ensemble's encoded input; the decoded tensor needs its own name.
            pixels=_with_batch(encoder.inputs[0], 1, "pixels"),
            prompt_embeds=_with_batch(text.outputs[0], 2, "prompt_embeds"),
            latent_mean=_with_batch(encoder.outputs[0], 1),
            latent_std=_with_batch(encoder.outputs[1], 1),
            latent=_with_batch(decoder.inputs[0], 1),
            decoded=_with_batch(decoder.outputs[0], 1),
        )


def preprocess_config(pipeline: str, tensors: PipelineTensors, options: RepositoryOptions) -> Any:
    config = _python_config(
        preprocess_model(pipeline),
        options.sampler_instances,
        {
            "pipeline": pipeline,
            "max_image_side": options.max_image_side,
            "max_image_pixels": options.max_image_pixels,
            "min_image_side": min_image_side(options),
        },
    )
    _contract_inputs(config, pipeline)
    for tensor in (tensors.input_ids, tensors.pixels, tensors.parameters, tensors.seed_used):
        _fill_tensor(config.output.add(), tensor, batched=False)
    return config


def sampler_config(
    pipeline: str, tensors: PipelineTensors, vae_scaling_factor: float, options: RepositoryOptions
) -> Any:
    config = _python_config(
        sampler_model(pipeline),
        options.sampler_instances,
        {
            "pipeline": pipeline,
            "unet_model": UNET_FOR_PIPELINE[pipeline],
            "vae_scaling_factor": vae_scaling_factor,
            # Inputs stay where the encoders left them (GPU memory on a GPU) instead of
            # being copied to the CPU first, the Python backend's default.
            "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
        },
        sampler_instance_kind(options.flavour),
    )
    inputs = [tensors.prompt_embeds, tensors.latent_mean, tensors.latent_std, tensors.parameters]
    _io(config, inputs, [tensors.latent], batched=False)
    return config


def postprocess_config(tensors: PipelineTensors, options: RepositoryOptions) -> Any:
    config = _python_config(POSTPROCESS, options.sampler_instances, {})
    _io(config, [tensors.decoded], [TensorSpec("edited_image", "bytes", (1,))], batched=False)
    return config


def ensemble_config(pipeline: str, tensors: PipelineTensors) -> Any:
    """The fixed DAG: preprocess -> text/vae encoders -> sampler -> decoder -> postprocess."""
    config = mc.ModelConfig(name=pipeline, platform="ensemble", max_batch_size=0)
    _contract_inputs(config, pipeline)
    for name, dtype, _ in OUTPUTS:
        _contract_tensor(config.output.add(), name, dtype, optional=False)

    def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> None:
        added = config.ensemble_scheduling.step.add(model_name=model, model_version=-1)
        added.input_map.update(inputs)
        added.output_map.update(outputs)

    contract_inputs = {p.name: p.name for p in parameters_for(pipeline)}
    step(
        preprocess_model(pipeline),
        contract_inputs,
        {
            "input_ids": "input_ids",
            "pixels": "pixels",
            "parameters": "parameters",
            "seed_used": "seed_used",
        },
    )
    step(TEXT_ENCODER, {"input_ids": "input_ids"}, {"last_hidden_state": "prompt_embeds"})
    step(
        VAE_ENCODER,
        {"image": "pixels"},
        {"latent_mean": "latent_mean", "latent_std": "latent_std"},
    )
    step(
        sampler_model(pipeline),
        {name: name for name in ("prompt_embeds", "latent_mean", "latent_std", "parameters")},
        {"latent": "latent"},
    )
    step(VAE_DECODER, {"latent": "latent"}, {"image": "decoded"})
    step(POSTPROCESS, {"image": "decoded"}, {"edited_image": "edited_image"})
    return config


def min_image_side(options: RepositoryOptions) -> int:
    # TensorRT engines only run inside their optimization profile.
    if options.flavour == "tensorrt":
        from export.components import MIN_IMAGE_SIDE

        return MIN_IMAGE_SIDE
    return SIDE_MULTIPLE


# --------------------------------------------------------------------------- files


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard links keep a multi-GB UNet from being copied; copies cross filesystems."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _write_model(output: Path, config: Any, template: str | None = None) -> Path:
    version_dir = output / config.name / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    (output / config.name / "config.pbtxt").write_text(text_format.MessageToString(config))
    if template is not None:
        shutil.copyfile(BACKEND_TEMPLATES / f"{template}.py", version_dir / "model.py")
    return version_dir


def _engine_files(engines_dir: Path) -> dict[str, Path]:
    record_path = engines_dir / "engines.json"
    if not record_path.is_file():
        raise FileNotFoundError(
            f"{engines_dir}: no engines.json; run export.tensorrt_engines first"
        )
    record = json.loads(record_path.read_text())
    return {name: engines_dir / entry["engine"] for name, entry in record["components"].items()}


def build_repository(
    export_dir: Path,
    output: Path,
    options: RepositoryOptions = RepositoryOptions(),
    engines_dir: Path | None = None,
) -> list[str]:
    """Writes the repository; returns the names of the models in it."""
    if options.flavour not in FLAVOURS:
        raise ValueError(f"flavour={options.flavour!r}: allowed one of {', '.join(FLAVOURS)}")
    export_dir = Path(export_dir)
    manifest = load_manifest(export_dir)
    specs = {
        name: ComponentSpec.from_json(entry["spec"])
        for name, entry in manifest["components"].items()
    }
    engines = _engine_files(engines_dir) if options.flavour == "tensorrt" and engines_dir else {}
    if options.flavour == "tensorrt" and not engines:
        raise FileNotFoundError("the tensorrt flavour needs --engines (export.tensorrt_engines)")

    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    written = []
    for name, spec in specs.items():
        template = "onnx_component" if options.flavour == "python-onnxruntime" else None
        version_dir = _write_model(output, component_config(spec, options), template)
        if options.flavour == "tensorrt":
            _link_or_copy(engines[name], version_dir / "model.plan")
        else:
            source = export_dir / name
            _link_or_copy(source / MODEL_FILE, version_dir / MODEL_FILE)
            if (source / EXTERNAL_DATA_FILE).exists():
                _link_or_copy(source / EXTERNAL_DATA_FILE, version_dir / EXTERNAL_DATA_FILE)
        written.append(name)

    tensors = PipelineTensors.from_specs(specs)
    for pipeline, details in manifest["pipelines"].items():
        version_dir = _write_model(
            output, preprocess_config(pipeline, tensors, options), "preprocess"
        )
        shutil.copytree(export_dir / manifest["tokenizer"], version_dir / "tokenizer")
        version_dir = _write_model(
            output,
            sampler_config(pipeline, tensors, details["vae_scaling_factor"], options),
            "sampler",
        )
        shutil.copyfile(
            export_dir / manifest["schedulers"][pipeline], version_dir / "scheduler_config.json"
        )
        _write_model(output, ensemble_config(pipeline, tensors))
        written += [preprocess_model(pipeline), sampler_model(pipeline), pipeline]
    _write_model(output, postprocess_config(tensors, options), "postprocess")
    written.append(POSTPROCESS)
    (output / "repository.json").write_text(
        json.dumps(
            {
                "export": str(export_dir.resolve()),
                "flavour": options.flavour,
                "options": options.__dict__,
                "server_args": server_arguments(options),
                "models": sorted(written),
                "pipelines": sorted(manifest["pipelines"]),
            },
            indent=2,
        )
        + "\n"
    )
    return sorted(written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path, help="folder written by export.onnx_export")
    parser.add_argument("--output", type=Path, required=True, help="repository folder to write")
    parser.add_argument("--flavour", choices=FLAVOURS, default="python-onnxruntime")
    parser.add_argument("--engines", type=Path, help="engine folder (tensorrt flavour)")
    parser.add_argument("--max-image-side", type=int, default=DEFAULT_MAX_SIDE)
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument("--sampler-instances", type=int, default=2)
    parser.add_argument("--intra-op-threads", type=int, default=0)
    args = parser.parse_args(argv)
    options = RepositoryOptions(
        flavour=args.flavour,
        max_image_side=args.max_image_side,
        max_image_pixels=args.max_image_pixels,
        sampler_instances=args.sampler_instances,
        intra_op_threads=args.intra_op_threads,
    )
    try:
        models = build_repository(args.export_dir, args.output, options, args.engines)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{options.flavour} repository with {len(models)} models: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
