"""Writes a complete Triton model repository from an ONNX export (its manifest).

    python -m model_repository.builder EXPORT_DIR --output DIR
        [--flavour python-onnxruntime|onnxruntime|tensorrt|python-openvino|openvino]
        [--precision fp32|bf16|fp16|int8] [--engines DIR] [--help: every option]

The configs come from model_repository/configs.py; this module lays out the folders:
each component's model file (ONNX, TensorRT engine, or in the openvino flavours the IR
written beside the export, or in the user's cache when it is read-only: at bf16 every
component's with fp16-stored weights, converted here when missing
(export/openvino_ir.py), at int8 the UNets export.int8 quantized), and each edit model's
version folder with its model.py, tokenizer, scheduler config and `pipeline.json` (the
component models and tensor names it calls, taken from the specs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from google.protobuf import text_format

import edit_pipeline.triton
from edit_pipeline.cpu_graph import CPU_GRAPH_DIR, MADE_FOR_FILE
from edit_pipeline.openvino_component import check_precision
from edit_pipeline.preprocess import ImageLimits
from edit_pipeline.preview import LatentPreview
from edit_pipeline.settings import (
    SCHEDULER_FILE,
    SETTINGS_FILE,
    TOKENIZER_DIR,
    PipelineSettings,
)
from edit_pipeline.unet_passes import SHALLOW_DIR
from export.components import (
    DEEP_FEATURES,
    TEXT_ENCODER,
    UNET_FOR_PIPELINE,
    VAE_DECODER,
    VAE_ENCODER,
    ComponentSpec,
)
from export.folders import make_empty
from export.int8 import QUANTIZED_COMPONENTS, int8_dir, int8_matches_export
from export.onnx_export import EXTERNAL_DATA_FILE, MODEL_FILE, load_manifest
from export.openvino_ir import (
    IR_FILE,
    IR_WEIGHTS_FILE,
    ensure_fp16_weights,
    fp16_weights_dir,
    plain_export_manifest,
)
from model_repository.arguments import add_arguments, from_arguments
from model_repository.configs import (
    OPENVINO_FLAVOURS,
    OPENVINO_MODEL_FILE,
    OPENVINO_PRECISIONS,
    PYTHON_FLAVOURS,
    READINESS_MODEL,
    RepositoryOptions,
    component_config,
    derived_edit_instances,
    edit_config,
    openvino_model_file,
    readiness_config,
    server_arguments,
)
from model_repository.cpu_graphs import ensure_cpu_graphs
from model_repository.record import REPOSITORY_RECORD, write_record

# The Python backend models' model.py files, copied into the repository.
TRITON_MODELS = Path(edit_pipeline.triton.__file__).parent
# The files a component's model may be: the ONNX export, or OpenVINO IR (bf16, int8).
MODEL_FILES = (MODEL_FILE, EXTERNAL_DATA_FILE, IR_FILE, IR_WEIGHTS_FILE)
# The model.py of each Python flavour's component models.
COMPONENT_TEMPLATES = {
    "python-onnxruntime": "onnxruntime_model",
    "python-openvino": "openvino_model",
}


def image_limits(manifest: dict[str, Any], options: RepositoryOptions) -> ImageLimits:
    """The images edits take: the options' limits, sides a multiple of the VAE's factor."""
    return options.image_limits(int(manifest["dimensions"]["vae_scale_factor"]))


def pipeline_settings(
    manifest: dict[str, Any], pipeline: str, options: RepositoryOptions
) -> PipelineSettings:
    """What an edit model of `pipeline` needs to know of the export, for these options."""
    specs = {
        name: ComponentSpec.from_json(entry["spec"])
        for name, entry in manifest["components"].items()
    }
    return PipelineSettings(
        pipeline=pipeline,
        vae_scaling_factor=manifest["pipelines"][pipeline]["vae_scaling_factor"],
        limits=image_limits(manifest, options),
        components=component_calls(specs, manifest["pipelines"][pipeline], options.flavour),
        latent_preview=LatentPreview.from_json(manifest["latent_preview"]),
    )


def component_calls(
    specs: dict[str, ComponentSpec], pipeline: dict[str, Any], flavour: str
) -> dict[str, dict[str, Any]]:
    """The Triton model, exported component and tensor names of the calls an edit makes,
    from the specs: the four components, and the UNet's shallow pass where it has one (in
    the python flavours, served by the UNet's own model)."""
    roles = {
        "text_encoder": TEXT_ENCODER,
        "vae_encoder": VAE_ENCODER,
        "unet": pipeline["unet"],
        "vae_decoder": VAE_DECODER,
    }
    if pipeline.get("shallow_unet"):
        roles["unet_shallow"] = pipeline["shallow_unet"]
    return {
        role: {
            "model": _served_by(name, pipeline, flavour),
            "component": name,
            "inputs": [t.name for t in specs[name].inputs],
            "outputs": [t.name for t in specs[name].outputs],
        }
        for role, name in roles.items()
    }


def _served_by(component: str, pipeline: dict[str, Any], flavour: str) -> str:
    """The Triton model that serves an exported component."""
    if flavour in PYTHON_FLAVOURS and component == pipeline.get("shallow_unet"):
        return pipeline["unet"]
    return component


def _hosting_spec(full: ComponentSpec, shallow: ComponentSpec) -> ComponentSpec:
    """A python flavour's UNet model: the full pass's tensors, and the deep features the
    shallow pass takes as one more input (optional: a request with it runs that pass)."""
    extra = tuple(t for t in shallow.inputs if t.name not in {i.name for i in full.inputs})
    return replace(full, inputs=(*full.inputs, *extra))


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard links keep a multi-GB UNet from being copied; copies cross filesystems."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _link_model_files(source: Path, target: Path, files: tuple[str, ...] = MODEL_FILES) -> None:
    """A served component's model files (ONNX and its external data, or IR), or `files`,
    into a model's folder."""
    target.mkdir(parents=True, exist_ok=True)
    for file in files:
        if (source / file).exists():
            _link_or_copy(source / file, target / file)


def _write_model(output: Path, config: Any, template: str | None = None) -> Path:
    version_dir = output / config.name / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    (output / config.name / "config.pbtxt").write_text(text_format.MessageToString(config))
    if template is not None:
        shutil.copyfile(TRITON_MODELS / f"{template}.py", version_dir / "model.py")
    return version_dir


def _engine_files(engines_dir: Path) -> dict[str, Path]:
    record_path = engines_dir / "engines.json"
    if not record_path.is_file():
        raise FileNotFoundError(
            f"{engines_dir}: no engines.json; run export.tensorrt_engines first"
        )
    record = json.loads(record_path.read_text())
    return {name: engines_dir / entry["engine"] for name, entry in record["components"].items()}


def prepare_openvino_export(export_dir: Path, options: RepositoryOptions) -> None:
    """What the openvino flavours serve at `options`' precision, made from the export.

    OpenVINO reads the plain fp32 export, computes bf16 only where the CPU does, and int8
    from the IR export.int8 made of this export: raises ValueError with one line
    otherwise. At bf16 and int8 (what it does not quantize) the IR with fp16-stored
    weights is converted when not current.
    """
    plain_export_manifest(export_dir, f"the {options.flavour} flavour")
    check_precision(options.precision)
    if options.precision == "int8" and not int8_matches_export(export_dir):
        raise ValueError(
            f"{export_dir}: no int8 UNets quantized from this export; build them with "
            f"`python -m export.int8 {export_dir}` (make int8), or let serve, demo or "
            "bench build them (--precision int8)"
        )
    if options.precision in OPENVINO_PRECISIONS:
        ensure_fp16_weights(export_dir)


def served_folder(export_dir: Path, component: str, options: RepositoryOptions) -> Path:
    """The folder of the files a component is served from: its ONNX export, or in an
    openvino flavour its IR (openvino_model_file)."""
    if options.flavour not in OPENVINO_FLAVOURS:
        return export_dir / component
    if openvino_model_file(options.precision) == OPENVINO_MODEL_FILE:
        return export_dir / component
    quantized = options.precision == "int8" and component in QUANTIZED_COMPONENTS
    return (int8_dir if quantized else fp16_weights_dir)(export_dir) / component


def served_model_file(export_dir: Path, component: str, options: RepositoryOptions) -> Path:
    """The file a component is served from, in its served_folder."""
    openvino = options.flavour in OPENVINO_FLAVOURS
    name = openvino_model_file(options.precision) if openvino else MODEL_FILE
    return served_folder(export_dir, component, options) / name


def weight_bytes(folder: Path, precision: str) -> int:
    """Bytes of the weights of the component whose files are in `folder`, as it computes:
    the files' size, halved for an fp32 ONNX export computed in bf16."""
    stored = sum((folder / file).stat().st_size for file in MODEL_FILES if (folder / file).exists())
    from_fp32 = precision == "bf16" and (folder / MODEL_FILE).exists()
    return stored // 2 if from_fp32 else stored


def with_edit_instances(
    options: RepositoryOptions, export_dir: Path, components: list[str], pipelines: tuple[str, ...]
) -> RepositoryOptions:
    """The options with edit instances derived, where none were given."""
    if options.edit_instances:
        return options
    sizes = {
        name: weight_bytes(served_folder(export_dir, name, options), options.precision)
        for name in components
    }
    unet = max(sizes[UNET_FOR_PIPELINE[p]] for p in pipelines)
    # Where streaming models are served, the unary models forward to them and hold no
    # pipeline: one model per pipeline runs edits.
    edit_models = len(pipelines)
    instances = derived_edit_instances(options, sum(sizes.values()), unet, edit_models)
    print(
        f"edit instances: {instances} per edit model ({edit_models} edit models; from the "
        f"cores, the memory and {sum(sizes.values()) / 1e9:.2f} GB of weights)",
        flush=True,
    )
    return replace(options, edit_instances=instances)


def build_repository(
    export_dir: Path,
    output: Path,
    options: RepositoryOptions | None = None,
    engines_dir: Path | None = None,
) -> list[str]:
    """Writes the repository; returns the names of the models in it."""
    options = (options or RepositoryOptions()).for_this_machine()
    options.check()
    export_dir = Path(export_dir)
    manifest = load_manifest(export_dir)
    specs = {
        name: ComponentSpec.from_json(entry["spec"])
        for name, entry in manifest["components"].items()
    }
    engines = _engine_files(engines_dir) if options.flavour == "tensorrt" and engines_dir else {}
    if options.flavour == "tensorrt" and not engines:
        raise FileNotFoundError("the tensorrt flavour needs --engines (export.tensorrt_engines)")
    if options.flavour in OPENVINO_FLAVOURS:
        prepare_openvino_export(export_dir, options)
    # Beside each component's graph, python-onnxruntime gets it optimized for this CPU.
    saves_cpu_graphs = options.flavour == "python-onnxruntime" and options.cpu_graphs
    cpu_graphs = ensure_cpu_graphs(export_dir) if saves_cpu_graphs else None

    pipelines = options.pipelines or tuple(manifest["pipelines"])
    missing = [p for p in pipelines if p not in manifest["pipelines"]]
    if missing:
        raise ValueError(
            f"pipelines={missing}: the export at {export_dir} has "
            f"{', '.join(manifest['pipelines'])} only"
        )
    entries = [manifest["pipelines"][p] for p in pipelines]
    served = {TEXT_ENCODER, VAE_ENCODER, VAE_DECODER} | {e["unet"] for e in entries}
    # A UNet's shallow pass: a model of its own, or in the python flavours a second file
    # of the UNet's model (edit_pipeline/unet_passes.py).
    shallow = {e["unet"]: e["shallow_unet"] for e in entries if e.get("shallow_unet")}
    hosted = options.flavour in PYTHON_FLAVOURS
    if not hosted:
        served |= set(shallow.values())
    options = with_edit_instances(options, export_dir, sorted(served), pipelines)

    make_empty(output, "a model repository", REPOSITORY_RECORD)
    written = []
    limits = image_limits(manifest, options)
    for name in sorted(served):
        spec = specs[name]
        if hosted and name in shallow:
            spec = _hosting_spec(spec, specs[shallow[name]])
        optional = [DEEP_FEATURES] if hosted and name in shallow else []
        config = component_config(spec, options, limits, optional_inputs=optional)
        version_dir = _write_model(output, config, COMPONENT_TEMPLATES.get(options.flavour))
        if options.flavour == "tensorrt":
            _link_or_copy(engines[name], version_dir / "model.plan")
        else:
            folders = {name: version_dir}
            if hosted and name in shallow:
                folders[shallow[name]] = version_dir / SHALLOW_DIR
            for component, folder in folders.items():
                _link_model_files(served_folder(export_dir, component, options), folder)
                if cpu_graphs is not None:
                    saved = (*MODEL_FILES, MADE_FOR_FILE)
                    _link_model_files(cpu_graphs / component, folder / CPU_GRAPH_DIR, saved)
        written.append(name)

    for pipeline in pipelines:
        settings = pipeline_settings(manifest, pipeline, options)
        # The model that runs the pipeline: the streaming one where it is served.
        config = edit_config(pipeline, options, streaming=options.streaming_models)
        version_dir = _write_model(output, config, "edit_model")
        (version_dir / SETTINGS_FILE).write_text(json.dumps(settings.to_json(), indent=2) + "\n")
        shutil.copytree(export_dir / manifest["tokenizer"], version_dir / TOKENIZER_DIR)
        shutil.copyfile(export_dir / manifest["schedulers"][pipeline], version_dir / SCHEDULER_FILE)
        written.append(config.name)
        if options.streaming_models:
            config = edit_config(pipeline, options, forwards=True)
            _write_model(output, config, "forward_model")
            written.append(config.name)
    _write_model(output, readiness_config(), "readiness_model")
    written.append(READINESS_MODEL)
    write_record(
        output,
        {
            "export": str(export_dir.resolve()),
            "flavour": options.flavour,
            "options": asdict(options),
            "server_args": server_arguments(options),
            "models": sorted(written),
            "pipelines": sorted(pipelines),
        },
    )
    return sorted(written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path, help="folder written by export.onnx_export")
    parser.add_argument("--output", type=Path, required=True, help="repository folder to write")
    parser.add_argument("--engines", type=Path, help="engine folder (tensorrt flavour)")
    add_arguments(parser, RepositoryOptions)
    args = parser.parse_args(argv)
    options = from_arguments(RepositoryOptions, args)
    try:
        models = build_repository(args.export_dir, args.output, options, args.engines)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{options.flavour} repository with {len(models)} models: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
