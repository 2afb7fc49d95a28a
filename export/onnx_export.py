"""Exports a checkpoint's text encoder, VAE and UNets to ONNX, then validates each one.

    python -m export.onnx_export MODEL [MODEL ...] --output DIR [--fp16] [--opset 17] [--optimize]

MODEL is a diffusers folder of the Stable Diffusion family (InstructPix2Pix or img2img)
or a preset root holding both. The text encoder and VAE are shared by both pipelines and
exported once. Every shape and sample input comes from the checkpoint's own configs
(export/checkpoint.py, export/sample_inputs.py). Every component is then run in
onnxruntime against PyTorch on random inputs at two shapes (export/validation.py); a
table of errors is printed, and the export fails (exit 1) when one exceeds its tolerance.
The output folder gets a `manifest.json` that the repository builder reads.

`--optimize` applies onnxruntime's fusions (export/onnx_optimize.py) before validation:
faster in onnxruntime, but with com.microsoft ops that TensorRT cannot build engines from.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

from export import unet_reuse
from export.checkpoint import (
    PipelineFolder,
    UnsupportedCheckpointError,
    checkpoint_inputs,
    discover_pipelines,
    shared_from,
)
from export.components import (
    TEXT_ENCODER,
    UNET_FOR_PIPELINE,
    VAE_DECODER,
    VAE_ENCODER,
    ComponentSpec,
    ShallowPass,
    component_specs,
    shallow_unet,
)
from export.latent_preview import fit_latent_preview
from export.sample_inputs import CheckpointInputs, sample_inputs
from export.validation import TOLERANCE, ValidationRow, format_table, validate_component

MANIFEST = "manifest.json"
# 2: dimensions carry the vocabulary size and the UNets' sample size; 3: the latent
# preview map; 4: the UNets' deep features and shallow passes; 5: the text encoder's
# token ids bounded by the vocabulary. Exports of another format are made again.
MANIFEST_FORMAT = 5
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx.data"
# Protobuf cannot hold a model over 2 GiB; leave headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000
DEFAULT_OPSET = 17

# Shapes traced at export. Odd latent sides are no multiple of any UNet's down-sampling
# factor, which makes diffusers pass explicit upsample sizes: the exported graph then works
# for every latent side, not only multiples of that factor. Image sides are the latent
# sides times the checkpoint's VAE scale factor.
TRACE_BATCH = 2
TRACE_LATENT = (25, 33)


# --------------------------------------------------------------------------- wrappers


def _wrappers(pipelines: dict[str, Any]) -> dict[str, Any]:
    """torch modules whose forward signature is exactly the component spec's."""
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, text_encoder: Any) -> None:
            super().__init__()
            self.text_encoder = text_encoder

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.text_encoder(input_ids.to(torch.int64), return_dict=False)[0]

    class VaeEncoder(torch.nn.Module):
        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            distribution = self.vae.encode(image).latent_dist
            return distribution.mean, distribution.std

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, latent: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(latent, return_dict=False)[0]

    class UNet(torch.nn.Module):
        def __init__(self, unet: Any) -> None:
            super().__init__()
            self.unet = unet

        def forward(
            self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
        ) -> torch.Tensor:
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class DeepFeaturesUNet(UNet):
        def forward(
            self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return unet_reuse.full_pass(self.unet, sample, timestep, encoder_hidden_states)

    class ShallowUNet(UNet):
        # (sample, timestep, [encoder_hidden_states,] deep_features): the prompt's
        # embeddings only where the shallow sub-blocks cross-attend (ShallowPass).
        def forward(  # type: ignore[override]
            self, sample: torch.Tensor, timestep: torch.Tensor, *rest: torch.Tensor
        ) -> torch.Tensor:
            *context, deep_features = rest
            return unet_reuse.shallow_pass(
                self.unet, sample, timestep, context[0] if context else None, deep_features
            )

    shared = shared_from(pipelines)
    modules = {
        TEXT_ENCODER: TextEncoder(shared.text_encoder),
        VAE_ENCODER: VaeEncoder(shared.vae),
        VAE_DECODER: VaeDecoder(shared.vae),
    }
    for pipeline_name, pipeline in pipelines.items():
        name = UNET_FOR_PIPELINE[pipeline_name]
        if unet_reuse.reuse_unsupported_reason(pipeline.unet) is None:
            modules[name] = DeepFeaturesUNet(pipeline.unet)
            modules[shallow_unet(name)] = ShallowUNet(pipeline.unet)
        else:
            modules[name] = UNet(pipeline.unet)
    return {name: module.eval() for name, module in modules.items()}


def _shallow_passes(pipelines: dict[str, Any]) -> dict[str, ShallowPass]:
    """The shallow pass of each UNet that reuse can cut (export/unet_reuse.py)."""
    passes = {}
    for pipeline_name, pipeline in pipelines.items():
        reason = unet_reuse.reuse_unsupported_reason(pipeline.unet)
        if reason is None:
            passes[UNET_FOR_PIPELINE[pipeline_name]] = unet_reuse.shallow_pass_inputs(pipeline.unet)
        else:
            print(f"{pipeline_name}: no reused UNet work: {reason}", flush=True)
    return passes


def _check_shared_weights(pipelines: dict[str, Any]) -> None:
    """Both pipelines call one text encoder and one VAE: their weights must agree."""
    import torch

    if len(pipelines) < 2:
        return
    first, second = pipelines.values()
    for component in ("text_encoder", "vae"):
        a = getattr(first, component).state_dict()
        b = getattr(second, component).state_dict()
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        if not same:
            raise UnsupportedCheckpointError(
                f"the two pipelines have different {component} weights; the served "
                "pipelines share one: export them separately"
            )


# --------------------------------------------------------------------------- export


def _parameter_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_component(
    module: Any,
    spec: ComponentSpec,
    target_dir: Path,
    checkpoint: CheckpointInputs,
    opset: int,
    fp16: bool,
    optimize: bool = False,
) -> tuple[Path, dict[str, int]]:
    """Writes `target_dir/model.onnx` (+ external data when large) for one component.

    Returns the file and, when `optimize`, how many nodes of each fused op it holds.
    """
    import onnx
    import torch

    target_dir.mkdir(parents=True, exist_ok=True)
    for stale in target_dir.iterdir():
        if stale.is_file():
            stale.unlink()
    batch = 1 if spec.name == TEXT_ENCODER else TRACE_BATCH
    example = sample_inputs(spec, checkpoint, batch, TRACE_LATENT, seed=0)
    args = tuple(torch.from_numpy(example[t.name]) for t in spec.inputs)
    dynamic_axes = {t.name: t.dynamic_axes for t in (*spec.inputs, *spec.outputs)}
    large = _parameter_bytes(module) > EXTERNAL_DATA_THRESHOLD_BYTES
    target = target_dir / MODEL_FILE

    with tempfile.TemporaryDirectory(dir=target_dir) as scratch, warnings.catch_warnings():
        # diffusers' shape checks become constants in the trace; the validation below
        # runs other shapes, which is what shows the graph generalises.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = Path(scratch) / MODEL_FILE
        with torch.inference_mode():
            torch.onnx.export(
                module,
                args,
                str(traced),
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        fused_ops: dict[str, int] = {}
        if optimize:
            from export.onnx_optimize import optimize_component

            model, fused_ops = optimize_component(traced, spec.name)
        else:
            model = onnx.load(str(traced), load_external_data=True)
        if fp16:
            from onnxruntime.transformers.float16 import convert_float_to_float16
            from onnxruntime.transformers.onnx_model import OnnxModel

            # Inputs and outputs stay fp32 so the served contract is the same either way.
            model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=large)
            # The converter appends the casts of kept fp32 inputs after their consumers.
            OnnxModel(model).topological_sort()
        if large or model.ByteSize() > EXTERNAL_DATA_THRESHOLD_BYTES:
            onnx.save_model(
                model,
                str(target),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=EXTERNAL_DATA_FILE,
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(target))
    onnx.checker.check_model(str(target))
    for written in target_dir.iterdir():
        written.chmod(0o644)  # readable by a server running as another user (containers)
    return target, fused_ops


# --------------------------------------------------------------------------- manifest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _library_versions() -> dict[str, str]:
    names = ("torch", "diffusers", "transformers", "onnx", "onnxruntime")
    return {name: version(name) for name in names} | {"python": platform.python_version()}


def _copy_pipeline_assets(folders: dict[str, PipelineFolder], output: Path) -> dict[str, Any]:
    """Tokenizer and scheduler configs travel with the export, so it stands on its own."""
    shared = shared_from(folders)
    tokenizer_dir = output / "tokenizer"
    if tokenizer_dir.exists():
        shutil.rmtree(tokenizer_dir)
    shutil.copytree(shared.path / "tokenizer", tokenizer_dir)
    schedulers = {}
    for pipeline_name, folder in folders.items():
        target = output / "schedulers" / pipeline_name / "scheduler_config.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder.path / "scheduler" / "scheduler_config.json", target)
        schedulers[pipeline_name] = target.relative_to(output).as_posix()
    return {"tokenizer": "tokenizer", "schedulers": schedulers}


def _pipeline_entry(folder: PipelineFolder, components: dict[str, Any]) -> dict[str, Any]:
    unet = UNET_FOR_PIPELINE[folder.pipeline]
    return {
        "source": str(folder.path.resolve()),
        "unet": unet,
        # None where the UNet cannot reuse its work (export/unet_reuse.py).
        "shallow_unet": shallow_unet(unet) if shallow_unet(unet) in components else None,
        "vae_scaling_factor": folder.vae_scaling_factor(),
    }


def _reset_peak_rss() -> None:
    """Starts this process's peak RSS afresh (Linux), so that the manifest's peak is the
    export's, not that of what ran before it in the same process (a preset's build)."""
    # Not Linux, or not allowed: the peak is the process's since it started.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def export_checkpoint(
    models: list[Path],
    output: Path,
    *,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    optimize: bool = False,
) -> tuple[dict[str, Any], list[ValidationRow]]:
    """Exports and validates every component; writes and returns the manifest."""
    import torch

    from export.checkpoint import load_pipeline

    started = time.perf_counter()
    _reset_peak_rss()
    folders = discover_pipelines(models)
    precision = "fp16" if fp16 else "fp32"
    torch.manual_seed(0)
    pipelines = {name: load_pipeline(folder) for name, folder in folders.items()}
    checkpoint = checkpoint_inputs(folders, pipelines)
    _check_shared_weights(pipelines)
    specs = component_specs(checkpoint.dims, _shallow_passes(pipelines))
    latent_preview = fit_latent_preview(
        shared_from(pipelines).vae, checkpoint.dims.vae_scale_factor
    )
    modules = _wrappers(pipelines)
    # From here the wrappers hold the only references to the torch weights, and each is
    # let go once exported and validated: the weights are mapped from their files, and a
    # UNet's stay resident while referenced (3.4 GB at SD 1.5 size).
    del pipelines

    output.mkdir(parents=True, exist_ok=True)
    (output / MANIFEST).unlink(missing_ok=True)
    components: dict[str, Any] = {}
    rows: list[ValidationRow] = []
    for name in list(modules):
        module, spec = modules.pop(name), specs[name]
        tick = time.perf_counter()
        path, fused_ops = export_component(
            module, spec, output / name, checkpoint, opset, fp16, optimize
        )
        export_s = time.perf_counter() - tick
        tick = time.perf_counter()
        component_rows = validate_component(module, spec, path, checkpoint, TOLERANCE[precision])
        rows.extend(component_rows)
        files = sorted(p for p in path.parent.iterdir() if p.is_file())
        components[name] = {
            "spec": spec.to_json(),
            "triton_max_batch_size": spec.axes["batch"].max,
            "files": {
                p.relative_to(output).as_posix(): {
                    "bytes": p.stat().st_size,
                    "sha256": file_sha256(p),
                }
                for p in files
            },
            "model": path.relative_to(output).as_posix(),
            "external_data": (path.parent / EXTERNAL_DATA_FILE).exists(),
            "fused_ops": fused_ops,
            "export_seconds": round(export_s, 2),
            "validation_seconds": round(time.perf_counter() - tick, 2),
        }
        megabytes = sum(f["bytes"] for f in components[name]["files"].values()) / 1e6
        print(f"exported {name:<13} {megabytes:9.1f} MB  in {export_s:6.1f} s", flush=True)

    passed = all(row.passed for row in rows)
    manifest = {
        "format": MANIFEST_FORMAT,
        "precision": precision,
        "opset": opset,
        # onnxruntime fusions (com.microsoft ops): onnxruntime only, no TensorRT engines.
        "optimized": optimize,
        "pipelines": {
            name: _pipeline_entry(folder, components) for name, folder in folders.items()
        },
        "dimensions": asdict(checkpoint.dims),
        "latent_preview": latent_preview,
        "components": components,
        **_copy_pipeline_assets(folders, output),
        "validation": {
            "passed": passed,
            "tolerance_max_rel": TOLERANCE[precision],
            "rows": [row.__dict__ | {"passed": row.passed} for row in rows],
        },
        "versions": _library_versions(),
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    (output / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest, rows


def export_is_current(
    export_dir: Path, models: list[Path], *, fp16: bool = False, optimize: bool = False
) -> bool:
    """Whether `export_dir` holds a passing export, in today's manifest format, of exactly
    these diffusers folders (or preset roots), with this precision and these fusions."""
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        return False
    manifest = json.loads(path.read_text())
    wanted = {Path(model).resolve() for model in models}
    sources = {Path(entry["source"]) for entry in manifest["pipelines"].values()}
    return (
        manifest.get("format") == MANIFEST_FORMAT
        and manifest["validation"]["passed"]
        and manifest["precision"] == ("fp16" if fp16 else "fp32")
        and bool(manifest.get("optimized")) == optimize
        and all(source in wanted or source.parent in wanted for source in sources)
    )


def ensure_export(
    models: list[Path], export_dir: Path, *, fp16: bool = False, optimize: bool = False
) -> dict[str, Any]:
    """The manifest of a current export of `models` (see export_is_current), exporting
    first when there is none; raises RuntimeError when the export fails validation."""
    if export_is_current(export_dir, models, fp16=fp16, optimize=optimize):
        print(f"export up to date: {export_dir}", flush=True)
        return load_manifest(export_dir)
    shown = ", ".join(str(model) for model in models)
    print(f"exporting {shown} to ONNX ({'fp16' if fp16 else 'fp32'}) ...", flush=True)
    manifest, rows = export_checkpoint(models, export_dir, fp16=fp16, optimize=optimize)
    print(format_table(rows), summary_line(manifest, rows), sep="\n", flush=True)
    if not manifest["validation"]["passed"]:
        raise RuntimeError(f"{export_dir}: the export failed validation against PyTorch")
    return manifest


def summary_line(manifest: dict[str, Any], rows: list[ValidationRow]) -> str:
    """The export's outcome, time and peak memory in one line."""
    validation = manifest["validation"]
    return (
        f"{'passed' if validation['passed'] else 'FAILED'}: {len(rows)} checks, "
        f"tolerance max rel {validation['tolerance_max_rel']:.0e} ({manifest['precision']}); "
        f"{manifest['seconds']} s, peak RSS {manifest['peak_rss_mb']:.0f} MB"
    )


def load_manifest(export_dir: Path) -> dict[str, Any]:
    """Reads an export's manifest; refuses one whose validation failed."""
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{export_dir}: no {MANIFEST}; run the ONNX export first")
    try:
        manifest = json.loads(path.read_bytes())
        passed = manifest["validation"]["passed"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path} is damaged or not an export's manifest ({type(error).__name__}: {error}); "
            "run the ONNX export again"
        ) from None
    if not passed:
        raise ValueError(f"{export_dir}: this export failed validation against PyTorch")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="diffusers folder(s) or preset root")
    parser.add_argument("--output", type=Path, required=True, help="export folder")
    parser.add_argument("--fp16", action="store_true", help="fp16 weights (GPUs); fp32 default")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument(
        "--optimize",
        action="store_true",
        help="onnxruntime fusions (faster in onnxruntime; not for TensorRT engines)",
    )
    args = parser.parse_args(argv)
    try:
        manifest, rows = export_checkpoint(
            args.models, args.output, fp16=args.fp16, opset=args.opset, optimize=args.optimize
        )
    except UnsupportedCheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print()
    print(format_table(rows))
    print(f"\n{summary_line(manifest, rows)}")
    print(f"manifest: {args.output / MANIFEST}")
    return 0 if manifest["validation"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
