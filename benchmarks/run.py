"""Benchmarks Triton against diffusers eager and a bare onnxruntime loop, in one run.

    python -m benchmarks.run [--preset small] [--size 256] [--steps 20] [--scheduler NAME]
        [--concurrency 1 2 4] [--flavour python-onnxruntime] [--precision fp32]
        [--url HOST:PORT] [--ablation]

Steps: build what is missing (preset, ONNX export, model repository); start tritonserver
(or use --url, e.g. the NGC container for the onnxruntime/tensorrt flavours); warm it up;
run perf_analyzer at each concurrency level over gRPC with a real photo, taking Triton's
statistics before and after each level; stop the server; time the baselines in this
process; write benchmarks/results/<date>-<machine>.{json,md,png} and print the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.baselines import CPU, BareOnnxLoop, DiffusersEager, pixel_difference, time_runs
from benchmarks.config import BenchConfig
from benchmarks.perf_analyzer import (
    WIRE_TYPES,
    PerfAnalyzer,
    check_runs,
    ensure_binary,
    library_folder,
    version_number,
    write_input_data,
)
from benchmarks.photo import photo_png
from benchmarks.server_stats import snapshot, stage_rows, window
from export.presets import IMG2IMG_FOLDER, PIX2PIX_FOLDER, PRESETS
from model_repository.builder import FLAVOURS, RepositoryOptions, build_repository
from pix2pix_client.contract import IMG2IMG, INSTRUCT_PIX2PIX, PARAMETERS_BY_NAME, SCHEDULERS

DEFAULT_BUILD_DIR = Path("build")
PIPELINE_FOLDER = {INSTRUCT_PIX2PIX: PIX2PIX_FOLDER, IMG2IMG: IMG2IMG_FOLDER}
NUMPY_TYPES = {
    "TYPE_STRING": "object",
    "TYPE_INT32": "int32",
    "TYPE_INT64": "int64",
    "TYPE_FP32": "float32",
}


def log(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------- building


def ensure_export(preset_root: Path, export_dir: Path, config: BenchConfig) -> Path:
    """A validated export of the preset with the run's precision and fusions."""
    from export.onnx_export import MANIFEST, export_checkpoint, format_table

    manifest_path = export_dir / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        current = (
            manifest["validation"]["passed"]
            and manifest["precision"] == config.precision
            and bool(manifest.get("optimized")) == config.optimize
        )
        if current:
            log(f"export up to date: {export_dir}")
            return export_dir
    log(f"exporting {preset_root} ({config.precision}, optimize={config.optimize}) ...")
    manifest, rows = export_checkpoint(
        [preset_root], export_dir, fp16=config.precision == "fp16", optimize=config.optimize
    )
    log(format_table(rows))
    if not manifest["validation"]["passed"]:
        raise RuntimeError(f"{export_dir}: the export failed validation against PyTorch")
    return export_dir


def export_folder(build_dir: Path, config: BenchConfig) -> Path:
    suffix = ("-fp16" if config.precision == "fp16" else "") + (
        "-ortopt" if config.optimize else ""
    )
    return build_dir / "onnx" / f"{config.preset}{suffix}"


def repository_options(config: BenchConfig) -> RepositoryOptions:
    return RepositoryOptions(
        flavour=config.flavour,
        sampler_instances=config.sampler_instances,
        unet_queue_delay_us=config.unet_queue_delay_us,
        intra_op_threads=config.intra_op_threads,
        allow_spinning=config.allow_spinning,
    )


def ensure_engines(export_dir: Path, build_dir: Path, config: BenchConfig) -> Path:
    from export.tensorrt_engines import ENGINES_MANIFEST, build_engines

    engines_dir = build_dir / "engines" / export_dir.name
    if not (engines_dir / ENGINES_MANIFEST).is_file():
        log(f"building TensorRT engines in {engines_dir} ...")
        build_engines(export_dir, engines_dir, fp16=config.precision == "fp16")
    return engines_dir


# --------------------------------------------------------------------------- requests


def infer_once(url: str, pipeline: str, image: bytes, request: dict[str, Any]) -> bytes:
    """One edit over gRPC with plain tritonclient; returns the PNG."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        inputs = []
        for name, value in {"image": image, **request}.items():
            triton_dtype = PARAMETERS_BY_NAME[name].triton_dtype
            if isinstance(value, str):
                value = value.encode()
            array = np.array([value], dtype=NUMPY_TYPES[triton_dtype])
            tensor = grpcclient.InferInput(name, [1], WIRE_TYPES[triton_dtype])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = client.infer(pipeline, inputs, client_timeout=900)
        return bytes(result.as_numpy("edited_image")[0])
    finally:
        client.close()


def warm_up(url: str, config: BenchConfig, image: bytes) -> tuple[bytes, float]:
    """Every sampler instance runs an edit (first runs load lazily); returns one output."""
    started = time.perf_counter()
    with ThreadPoolExecutor(config.sampler_instances) as pool:
        outputs = list(
            pool.map(
                lambda _: infer_once(url, config.pipeline, image, config.request()),
                range(config.sampler_instances),
            )
        )
    return outputs[0], time.perf_counter() - started


def describe_request(config: BenchConfig, image_bytes: int) -> str:
    parameters = ", ".join(f"{k}={v!r}" for k, v in config.request().items())
    return (
        f"scikit-image's astronaut photo resized to {config.size}x{config.size}, PNG "
        f"({image_bytes:,} bytes); {parameters}; the scheduler is the checkpoint's own when "
        "not given. Every system gets these bytes and parameters and returns PNG bytes."
    )


# --------------------------------------------------------------------------- Triton


def sweep(
    perf: PerfAnalyzer,
    url: str,
    config: BenchConfig,
    data_file: Path,
    workdir: Path,
) -> dict[str, Any]:
    """perf_analyzer at each level, with Triton's statistics over each level's window."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    levels, stages = [], {}
    try:
        for concurrency in config.concurrency:
            requests = config.requests_per_level * concurrency
            log(f"perf_analyzer: concurrency {concurrency}, {requests} requests ...")
            before = snapshot(client)
            level, _ = perf.run_level(
                config.pipeline, url, data_file, concurrency, requests, workdir
            )
            counters = window(before, snapshot(client))
            levels.append(level.to_json())
            stages[str(concurrency)] = [r.to_json() for r in stage_rows(counters, config.pipeline)]
            log(
                f"  {level.throughput_per_s:.3f} edits/s, p50 {level.p50_ms:,.0f} ms, "
                f"p90 {level.p90_ms:,.0f} ms, p99 {level.p99_ms:,.0f} ms"
            )
    finally:
        client.close()
    return {"levels": levels, "stages": stages}


def measure_triton(
    config: BenchConfig,
    repository: Path | None,
    url: str | None,
    perf: PerfAnalyzer,
    image: bytes,
    workdir: Path,
) -> dict[str, Any]:
    """Starts a server on `repository` unless `url` names a running one, then sweeps."""
    from model_repository.server import TritonServer

    data_file = write_input_data(workdir / "input_data.json", image, config.request())
    server = None
    if url is None:
        assert repository is not None
        log_file = workdir / "tritonserver.log"
        log_file.unlink(missing_ok=True)
        server = TritonServer(repository, log_file=log_file)
        started = time.perf_counter()
        server.start()
        server.wait_ready(timeout_s=600)
        url = server.grpc_url
        log(f"tritonserver ready in {time.perf_counter() - started:.0f} s ({url})")
    try:
        output, warmup_s = warm_up(url, config, image)
        log(f"warm-up ({config.sampler_instances} concurrent edits): {warmup_s:.1f} s")
        measured = sweep(perf, url, config, data_file, workdir)
    finally:
        if server is not None:
            server.stop()
    measured["output"] = output
    return measured


# --------------------------------------------------------------------------- baselines


def measure_baselines(
    config: BenchConfig, preset_root: Path, export_dir: Path, image: bytes
) -> tuple[dict[str, Any], dict[str, bytes], list[str]]:
    timings: dict[str, Any] = {}
    outputs: dict[str, bytes] = {}
    notes: list[str] = []
    gpu = config.flavour == "tensorrt" or config.precision == "fp16"

    providers = CPU
    if gpu:
        import onnxruntime as ort

        providers = ("CUDAExecutionProvider",)
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            providers = ()
            notes.append("bare loop skipped: onnxruntime here has no CUDAExecutionProvider")
    if providers:
        log(f"bare onnxruntime loop: 1 warm-up + {config.baseline_runs} runs ...")
        bare = BareOnnxLoop(export_dir, config, providers)
        timing, outputs["bare_onnxruntime"] = time_runs(bare, image, config.baseline_runs)
        timings["bare_onnxruntime"] = timing.to_json()
        log(f"  p50 {timing.p50_ms:,.0f} ms")
        del bare

    try:
        device = "cuda" if gpu else "cpu"
        diffusers = DiffusersEager(preset_root / PIPELINE_FOLDER[config.pipeline], config, device)
    except ValueError as error:
        notes.append(f"diffusers baseline skipped: {error}")
    else:
        log(f"diffusers eager: 1 warm-up + {config.baseline_runs} runs ...")
        timing, outputs["diffusers_eager"] = time_runs(diffusers, image, config.baseline_runs)
        timings["diffusers_eager"] = timing.to_json()
        log(f"  p50 {timing.p50_ms:,.0f} ms")
    return timings, outputs, notes


# --------------------------------------------------------------------------- main


def run(config: BenchConfig, args: argparse.Namespace) -> dict[str, Any]:
    from model_repository.serve import ensure_preset

    build_dir: Path = args.build_dir
    preset_root = ensure_preset(config.preset, build_dir)
    export_dir = ensure_export(preset_root, export_folder(build_dir, config), config)
    workdir = build_dir / "bench" / f"{export_dir.name}-{config.flavour}"
    workdir.mkdir(parents=True, exist_ok=True)
    repository = None
    if args.url is None:
        if config.flavour != "python-onnxruntime":
            raise SystemExit(
                f"error: the {config.flavour} flavour needs the NGC tritonserver (the wheel's "
                "server has the Python backend only): serve the repository there and pass --url"
            )
        repository = workdir / "repository"
        build_repository(export_dir, repository, repository_options(config))
    elif config.flavour == "tensorrt":
        engines = ensure_engines(export_dir, build_dir, config)
        repository = workdir / "repository"
        build_repository(export_dir, repository, repository_options(config), engines)
        log(f"repository for the server at {args.url}: {repository} (it must serve this one)")

    perf = PerfAnalyzer(ensure_binary(), library_folder(build_dir / "perf_analyzer" / "lib"))
    perf_version = check_runs(perf.binary, perf.libraries)
    image = photo_png(config.size)

    triton = measure_triton(config, repository, args.url, perf, image, workdir)
    baselines, outputs, notes = {}, {}, []
    if not args.skip_baselines:
        baselines, outputs, notes = measure_baselines(config, preset_root, export_dir, image)
    outputs["triton"] = triton.pop("output")

    levels = {lv["concurrency"]: lv for lv in triton["levels"]}
    triton_ms = levels[1]["p50_ms"] if 1 in levels else None
    targets = report.evaluate_targets(
        triton_ms,
        baselines.get("diffusers_eager", {}).get("p50_ms"),
        baselines.get("bare_onnxruntime", {}).get("p50_ms"),
        {c: lv["throughput_per_s"] for c, lv in levels.items()},
    )
    agreement = {
        f"Triton vs {name.replace('_', ' ')}": pixel_difference(outputs["triton"], output)
        for name, output in outputs.items()
        if name != "triton"
    }
    machine = report.machine_info()
    results: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": args.command_line,
        "machine": machine,
        "versions": report.library_versions() | {"perf_analyzer": version_number(perf_version)},
        "config": config.to_json(),
        "request_description": describe_request(config, len(image)),
        "export": str(export_dir),
        "triton": triton,
        "baselines": baselines,
        "ratios": {
            "triton_over_diffusers": _ratio(triton_ms, baselines.get("diffusers_eager")),
            "triton_over_bare": _ratio(triton_ms, baselines.get("bare_onnxruntime")),
        },
        "targets_apply": report.targets_apply(config.to_json()),
        "targets": [t.to_json() for t in targets],
        "agreement": agreement,
        "latency_note": (
            "Triton: client-side latency measured by perf_analyzer over gRPC on this machine "
            "(the whole ensemble: PNG decode, CLIP, VAE encode, the BLS sampler loop, VAE "
            "decode, PNG encode). Baselines: wall clock of the same work in this process, "
            "after one warm-up edit, the server stopped. p99 of a handful of requests is "
            "their maximum."
        ),
        "stages_note": (
            "compute_infer per model over each level's window, divided by the edits in it. "
            "At concurrency above 1, merged UNet batches count their whole duration for each "
            "request in them, and stages of different edits overlap, so rows can add up to "
            "more than the wall clock."
        ),
        "notes": notes,
        "optimisations": [],
    }
    return results


def _ratio(triton_ms: float | None, baseline: dict[str, Any] | None) -> float | None:
    if not triton_ms or not baseline:
        return None
    return round(triton_ms / baseline["p50_ms"], 4)


def write_results(results: dict[str, Any], output_dir: Path, stem: str) -> dict[str, Path]:
    """<stem>.json, <stem>.png and <stem>.md (which shows the plot) in `output_dir`."""
    json_path = report.write_json(results, output_dir / f"{stem}.json")
    plot_path = report.plot(results, output_dir / f"{stem}.png")
    md_path = report.write_markdown(results, output_dir / f"{stem}.md", plot_path.name)
    return {"json": json_path, "png": plot_path, "md": md_path}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--pipeline", choices=(INSTRUCT_PIX2PIX, IMG2IMG), default=INSTRUCT_PIX2PIX)
    parser.add_argument("--size", type=int, default=256, help="photo side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scheduler", choices=SCHEDULERS, help="default: the checkpoint's")
    parser.add_argument("--prompt", default=BenchConfig.prompt)
    parser.add_argument("--guidance-scale", type=float, default=BenchConfig.guidance_scale)
    parser.add_argument(
        "--image-guidance-scale", type=float, default=BenchConfig.image_guidance_scale
    )
    parser.add_argument("--temperature", type=float, default=BenchConfig.temperature)
    parser.add_argument("--seed", type=int, default=BenchConfig.seed)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--requests", type=int, default=BenchConfig.requests_per_level,
        help="perf_analyzer requests per level, times the concurrency",
    )  # fmt: skip
    parser.add_argument("--baseline-runs", type=int, default=BenchConfig.baseline_runs)
    parser.add_argument("--flavour", choices=FLAVOURS, default="python-onnxruntime")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument(
        "--no-optimize", action="store_true", help="plain export, without onnxruntime fusions"
    )
    parser.add_argument("--intra-op-threads", type=int, default=BenchConfig.intra_op_threads)
    parser.add_argument(
        "--spinning",
        action=argparse.BooleanOptionalAction,
        default=BenchConfig.allow_spinning,
        help="onnxruntime pool threads spin while idle",
    )
    parser.add_argument("--sampler-instances", type=int, default=BenchConfig.sampler_instances)
    parser.add_argument("--unet-queue-delay-us", type=int, default=BenchConfig.unet_queue_delay_us)
    parser.add_argument("--skip-baselines", action="store_true", help="measure Triton only")
    parser.add_argument("--url", help="gRPC host:port of a running server (skip starting one)")
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR)
    parser.add_argument("--output-dir", type=Path, default=report.RESULTS_DIR)
    parser.add_argument("--stem", help="result file name without extension (default: date-machine)")
    args = parser.parse_args(argv)
    args.command_line = "python -m benchmarks.run " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    return args


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        preset=args.preset,
        pipeline=args.pipeline,
        size=args.size,
        steps=args.steps,
        scheduler=args.scheduler,
        prompt=args.prompt,
        guidance_scale=args.guidance_scale,
        image_guidance_scale=args.image_guidance_scale,
        temperature=args.temperature,
        seed=args.seed,
        concurrency=tuple(args.concurrency),
        requests_per_level=args.requests,
        baseline_runs=args.baseline_runs,
        flavour=args.flavour,
        precision=args.precision,
        optimize=not args.no_optimize and args.flavour != "tensorrt",
        intra_op_threads=args.intra_op_threads,
        allow_spinning=args.spinning,
        sampler_instances=args.sampler_instances,
        unet_queue_delay_us=args.unet_queue_delay_us,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = run(config, args)
    stem = args.stem or report.result_stem(datetime.date.today().isoformat(), results["machine"])
    paths = write_results(results, args.output_dir, stem)
    log("")
    log(report.console_summary(results))
    log("")
    for kind, path in paths.items():
        log(f"{kind:>4}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
