"""Builds TensorRT engines from an ONNX export, one per component, on an NVIDIA GPU.

    python -m export.tensorrt_engines EXPORT_DIR --output DIR [--fp32] [--components ...]

Optimization profiles come from the same component specs the export used (min / opt /
max of every dynamic axis). Engines are fp16 by default and named with the TensorRT
version and the GPU's compute capability, because an engine only runs where it was
built: `unet_pix2pix.trt10.5.0.sm90.plan`. A timing cache in the output folder makes
rebuilds fast. Needs the `tensorrt` extra (`pip install -e '.[tensorrt]'`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from export.components import ComponentSpec

TIMING_CACHE = "timing.cache"
ENGINES_MANIFEST = "engines.json"


class EngineBuildUnavailable(RuntimeError):
    """This machine cannot build engines; the message says why in one line."""


def optimization_profile(spec: ComponentSpec) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every input, derived from the spec's axis ranges."""
    points = [spec.sizes(which) for which in ("min", "opt", "max")]
    return {
        tensor.name: tuple(tensor.shape_for(point) for point in points) for tensor in spec.inputs
    }


def gpu_compute_capability() -> str:
    """'sm90' for an H100, read from nvidia-smi; raises EngineBuildUnavailable without a GPU."""
    if shutil.which("nvidia-smi") is None:
        raise EngineBuildUnavailable("no NVIDIA GPU: nvidia-smi is not on PATH")
    query = ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"]
    result = subprocess.run(query, capture_output=True, text=True, check=False)
    capability = result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""
    if result.returncode != 0 or not capability:
        raise EngineBuildUnavailable(
            f"no usable NVIDIA GPU: nvidia-smi says {result.stderr.strip()!r}"
        )
    return "sm" + capability.replace(".", "")


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise EngineBuildUnavailable(
            "TensorRT is not installed: pip install -e '.[tensorrt]' on a machine with a GPU"
        ) from None
    return tensorrt


def engine_name(component: str, trt_version: str, capability: str) -> str:
    return f"{component}.trt{trt_version}.{capability}.plan"


def build_engine(
    trt: Any,
    onnx_path: Path,
    spec: ComponentSpec,
    engine_path: Path,
    timing_cache_path: Path,
    fp16: bool,
) -> float:
    """Parses one ONNX file and writes its serialized engine; returns the build seconds."""
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external data next to the model.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{spec.name}: TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (minimum, optimum, maximum) in optimization_profile(spec).items():
        profile.set_shape(name, minimum, optimum, maximum)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache_path.read_bytes() if timing_cache_path.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{spec.name}: TensorRT failed to build an engine")
    engine_path.write_bytes(bytes(serialized))
    timing_cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return time.perf_counter() - started


def build_engines(
    export_dir: Path, output: Path, *, fp16: bool = True, components: list[str] | None = None
) -> dict[str, Any]:
    """Builds an engine per exported component; writes and returns `engines.json`."""
    from export.onnx_export import load_manifest

    manifest = load_manifest(export_dir)
    if manifest.get("optimized"):
        raise ValueError(
            f"{export_dir} holds onnxruntime-fused graphs (export --optimize), which TensorRT "
            "cannot parse: build engines from an export without --optimize"
        )
    capability = gpu_compute_capability()
    trt = import_tensorrt()
    output.mkdir(parents=True, exist_ok=True)
    built: dict[str, Any] = {}
    for name, entry in manifest["components"].items():
        if components and name not in components:
            continue
        spec = ComponentSpec.from_json(entry["spec"])
        engine_path = output / engine_name(name, trt.__version__, capability)
        seconds = build_engine(
            trt, export_dir / entry["model"], spec, engine_path, output / TIMING_CACHE, fp16
        )
        built[name] = {
            "engine": engine_path.name,
            "bytes": engine_path.stat().st_size,
            "build_seconds": round(seconds, 1),
            "profile": {k: [list(s) for s in v] for k, v in optimization_profile(spec).items()},
        }
        megabytes = engine_path.stat().st_size / 1e6
        print(f"built {engine_path.name}: {megabytes:.1f} MB in {seconds:.1f} s")
    record = {
        "tensorrt": trt.__version__,
        "compute_capability": capability,
        "precision": "fp16" if fp16 else "fp32",
        "export": str(Path(export_dir).resolve()),
        "components": built,
    }
    (output / ENGINES_MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path, help="folder written by export.onnx_export")
    parser.add_argument("--output", type=Path, required=True, help="engine folder")
    parser.add_argument("--fp32", action="store_true", help="build fp32 engines (default fp16)")
    parser.add_argument("--components", nargs="*", help="only these components")
    args = parser.parse_args(argv)
    try:
        build_engines(args.export_dir, args.output, fp16=not args.fp32, components=args.components)
    except EngineBuildUnavailable as error:
        print(f"error: cannot build TensorRT engines here: {error}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
