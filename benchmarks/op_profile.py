"""Where one call of an exported component spends its time in OpenVINO, by operation.

    python -m benchmarks.op_profile build/onnx/sd15 --component unet_pix2pix \
        --precision int8 --side 512 --batch 3 [--calls 3] [--static-shape]

Compiles the file the python-openvino flavour serves at that precision, with the served
properties (one stream on every core, the latency hint; edit_pipeline/openvino_component.py)
and OpenVINO's performance counters, then calls it on random inputs of the shape an edit
of a `side` x `side` photo sends (the UNet of a guided InstructPix2Pix edit: batch 3). It
prints each call's time, then the last call's time by operation kind (convolutions, the
matrix products, attention, which OpenVINO runs as one fused subgraph) and by kernel,
whose name says what it computes in (`brgconv_avx512_I8`: int8; `..._bf16`; `..._f32`).
That tells whether a precision's speed is the CPU's limit or a layer left behind.
`--static-shape` compiles the model for that one shape instead of the dynamic shapes it is
served with: what static shapes would buy (benchmarks/README.md says why they are not served).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edit_pipeline.openvino_component import (
    INFERENCE_PRECISIONS,
    PRECISIONS,
    compile_properties,
    floating_point_precision,
)
from export.components import MAX_IMAGE_SIDE, ComponentSpec, ModelDimensions
from export.onnx_export import load_manifest
from export.sample_inputs import CheckpointInputs, sample_inputs
from model_repository.builder import prepare_openvino_export, served_model_file
from model_repository.configs import RepositoryOptions

# Kernels shown by name: the largest this many.
TOP_KERNELS = 12


@dataclass(frozen=True)
class Profile:
    """Each call's seconds, and the last call's seconds by operation kind and by kernel."""

    model_file: Path
    computes_in: str
    shapes: str  # "dynamic" as served, or "static"
    call_s: tuple[float, ...]
    by_kind: dict[str, float]
    by_kernel: dict[tuple[str, str], float]


def random_feed(export_dir: Path, component: str, side: int, batch: int) -> dict:
    """Inputs of one call at an image of `side` pixels a side (random, as the export's
    validation feeds them)."""
    manifest = load_manifest(export_dir)
    if component not in manifest["components"]:
        allowed = ", ".join(manifest["components"])
        raise ValueError(f"component={component!r}: allowed one of {allowed}")
    dims = ModelDimensions(**manifest["dimensions"])
    # Token ids only need to be below the vocabulary size for a timing.
    checkpoint = CheckpointInputs(dims, 0, 1, 1, num_train_timesteps=1000)
    spec = ComponentSpec.from_json(manifest["components"][component]["spec"])
    if not 0 < side <= MAX_IMAGE_SIDE or side % dims.vae_scale_factor:
        raise ValueError(
            f"side={side}: allowed a multiple of {dims.vae_scale_factor} up to {MAX_IMAGE_SIDE}"
        )
    latent = side // dims.vae_scale_factor
    return sample_inputs(spec, checkpoint, batch, (latent, latent), seed=0)


def profile(
    export_dir: Path,
    component: str,
    precision: str,
    side: int,
    batch: int,
    calls: int,
    static_shape: bool = False,
) -> Profile:
    import openvino as ov

    options = RepositoryOptions(flavour="python-openvino", precision=precision)
    feed = random_feed(export_dir, component, side, batch)
    prepare_openvino_export(export_dir, options)  # the fp16-stored IR when not current
    model_file = served_model_file(export_dir, component, options)
    computes_in = floating_point_precision(precision)
    properties = compile_properties(computes_in, threads=0, streams=1) | {"PERF_COUNT": True}
    core = ov.Core()
    model = core.read_model(str(model_file))
    if static_shape:
        model.reshape({name: ov.PartialShape(list(array.shape)) for name, array in feed.items()})
    compiled = core.compile_model(model, "CPU", properties)
    request = compiled.create_infer_request()
    call_s = []
    for _ in range(calls):
        started = time.perf_counter()
        request.infer(feed)
        call_s.append(time.perf_counter() - started)
    by_kind: Counter[str] = Counter()
    by_kernel: Counter[tuple[str, str]] = Counter()
    for node in request.profiling_info:
        seconds = node.real_time.total_seconds()
        by_kind[node.node_type] += seconds
        by_kernel[(node.node_type, node.exec_type)] += seconds
    shapes = "static" if static_shape else "dynamic"
    return Profile(model_file, computes_in, shapes, tuple(call_s), dict(by_kind), dict(by_kernel))


def format_profile(result: Profile) -> str:
    total = sum(result.by_kind.values()) or 1.0
    calls = ", ".join(f"{s:.3f}" for s in result.call_s)
    precision = INFERENCE_PRECISIONS[result.computes_in]
    lines = [
        f"{result.model_file} (floating point in {precision}, {result.shapes} shapes)",
        f"calls (s): {calls}",
        f"last call by operation, {total:.3f} s counted:",
    ]
    for kind, seconds in sorted(result.by_kind.items(), key=lambda item: -item[1]):
        if seconds / total >= 0.005:
            lines.append(f"  {seconds:8.3f} s  {seconds / total:6.1%}  {kind}")
    lines.append(f"largest kernels ({TOP_KERNELS}):")
    kernels = sorted(result.by_kernel.items(), key=lambda item: -item[1])[:TOP_KERNELS]
    for (kind, kernel), seconds in kernels:
        lines.append(f"  {seconds:8.3f} s  {seconds / total:6.1%}  {kind}: {kernel}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--component", default="unet_pix2pix")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--side", type=int, default=512, help="the photo's side in pixels")
    parser.add_argument("--batch", type=int, default=3, help="3: a guided InstructPix2Pix step")
    parser.add_argument("--calls", type=int, default=3, help="the first packs the weights")
    parser.add_argument(
        "--static-shape",
        action="store_true",
        help="compile for this call's shape alone (served: dynamic shapes)",
    )
    args = parser.parse_args(argv)
    if args.calls < 1 or args.batch < 1:
        parser.error(f"calls={args.calls}, batch={args.batch}: allowed 1 or more each")
    try:
        result = profile(
            args.export_dir,
            args.component,
            args.precision,
            args.side,
            args.batch,
            args.calls,
            args.static_shape,
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_profile(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
