"""Benchmarks Triton against diffusers eager and a bare onnxruntime loop, in one run.

    python -m benchmarks.run [--preset small] [--size 256] [--steps 20] [--scheduler NAME]
        [--concurrency 1 2 4] [--rounds 3] [--flavour python-onnxruntime] [--precision fp32]
        [--url HOST:PORT] [--ablation]

Steps: build what is missing (preset, validated ONNX export, model repository); load the
baselines in this process; start tritonserver (or use --url: the NGC container for the
onnxruntime and tensorrt flavours) and warm everything up. Then, in each of `--rounds`
rounds: perf_analyzer over gRPC at each concurrency level with a real photo (Triton's
statistics snapshotted around each), and, after concurrency 1, the same edits through
the bare onnxruntime loop and diffusers. Interleaving keeps drift on a shared machine
from favouring whichever system ran first. Results go to
benchmarks/results/<date>-<machine>.{json,md,png}; the table and the targets are printed.

`--ablation` first measures what each serving optimisation bought: pairs of servers
(before / after one change) up at once, perf_analyzer alternating between them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from benchmarks import report
from benchmarks.baselines import (
    CPU,
    BareOnnxLoop,
    DiffusersEager,
    ProviderUnavailable,
    Timing,
    pixel_difference,
)
from benchmarks.config import BenchConfig, admin_key
from benchmarks.machine_load import LoadMeter
from benchmarks.perf_analyzer import (
    CsvLevel,
    LevelResult,
    PerfAnalyzer,
    ProfiledLevel,
    check_runs,
    ensure_binary,
    library_folder,
    version_number,
    write_input_data,
)
from benchmarks.photo import photo_png
from benchmarks.server_stats import ModelCounters, combine, settled_snapshot, stage_rows, window
from export.onnx_export import ensure_export
from export.presets import IMG2IMG_FOLDER, PIX2PIX_FOLDER, PRESETS
from model_repository.builder import build_repository
from model_repository.configs import FLAVOURS, RepositoryOptions
from pix2pix_client.contract import IMG2IMG, INSTRUCT_PIX2PIX, SCHEDULERS
from pix2pix_client.request import contract_input

DEFAULT_BUILD_DIR = Path("build")
PIPELINE_FOLDER = {INSTRUCT_PIX2PIX: PIX2PIX_FOLDER, IMG2IMG: IMG2IMG_FOLDER}
# A round in which other processes used more than this share of the machine is measured
# again (at most MAX_EXTRA_ROUNDS times per run or ablation step).
DISTURBED_LOAD = 0.05
MAX_EXTRA_ROUNDS = 3
T = TypeVar("T")
BASELINE_LABELS = {
    "bare_onnxruntime": "bare onnxruntime loop",
    "diffusers_eager": "diffusers eager",
}


def log(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------- building


def export_folder(build_dir: Path, config: BenchConfig) -> Path:
    suffix = "-fp16" if config.precision == "fp16" else ""
    suffix += "-ortopt" if config.optimize else ""
    return build_dir / "onnx" / f"{config.preset}{suffix}"


def repository_options(config: BenchConfig) -> RepositoryOptions:
    return RepositoryOptions(
        flavour=config.flavour,
        edit_instances=config.edit_instances,
        unet_queue_delay_us=config.unet_queue_delay_us,
        intra_op_threads=config.intra_op_threads,
        allow_spinning=config.allow_spinning,
        cpu_rate_limit=config.cpu_rate_limit,
        unet_split_threads=config.unet_split_threads,
    )


def ensure_engines(export_dir: Path, build_dir: Path, config: BenchConfig) -> Path:
    from export.tensorrt_engines import ENGINES_MANIFEST, build_engines

    engines_dir = build_dir / "engines" / export_dir.name
    if not (engines_dir / ENGINES_MANIFEST).is_file():
        log(f"building TensorRT engines in {engines_dir} ...")
        build_engines(export_dir, engines_dir, fp16=config.precision == "fp16")
    return engines_dir


def build_for(config: BenchConfig, preset_root: Path, build_dir: Path, name: str) -> Path:
    """Export (if missing) and a fresh repository for one configuration; returns it."""
    export_dir = export_folder(build_dir, config)
    ensure_export(
        [preset_root], export_dir, fp16=config.precision == "fp16", optimize=config.optimize
    )
    repository = build_dir / "bench" / name / "repository"
    engines = (
        ensure_engines(export_dir, build_dir, config) if config.flavour == "tensorrt" else None
    )
    build_repository(export_dir, repository, repository_options(config), engines)
    return repository


# --------------------------------------------------------------------------- requests


def infer_once(url: str, pipeline: str, image: bytes, request: dict[str, Any]) -> bytes:
    """One edit over gRPC with plain tritonclient; returns the PNG."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        inputs = [
            contract_input(name, value) for name, value in {"image": image, **request}.items()
        ]
        result = client.infer(pipeline, inputs, client_timeout=900)
        return bytes(result.as_numpy("edited_image")[0])
    finally:
        client.close()


def warm_up(url: str, config: BenchConfig, image: bytes) -> tuple[bytes, float]:
    """Twice, as many concurrent edits as sampler instances: every instance of every model
    has run (the first edit of an instance imports and allocates lazily)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(config.edit_instances) as pool:
        for _ in range(2):
            outputs = list(
                pool.map(
                    lambda _: infer_once(url, config.pipeline, image, config.request()),
                    range(config.edit_instances),
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


@contextlib.contextmanager
def serving(repository: Path | None, url: str | None, log_file: Path) -> Iterator[str]:
    """The gRPC URL of a running server: `url`, or one started on `repository`."""
    from model_repository.server import TritonServer

    if url is not None:
        yield url
        return
    assert repository is not None
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.unlink(missing_ok=True)
    server = TritonServer(repository, log_file=log_file, admin_key=admin_key())
    started = time.perf_counter()
    server.start()
    try:
        server.wait_ready(timeout_s=600)
        log(f"tritonserver ready in {time.perf_counter() - started:.0f} s ({server.grpc_url})")
        yield server.grpc_url
    finally:
        server.stop()


# --------------------------------------------------------------------------- the rounds


@dataclasses.dataclass
class RoundLoads:
    """Other processes' share of the machine per round: kept rounds and left-out ones."""

    kept: list[float] = dataclasses.field(default_factory=list)
    # Rounds left out because other processes used more than DISTURBED_LOAD of it.
    discarded: list[float] = dataclasses.field(default_factory=list)


def undisturbed_rounds(rounds: int, measure: Callable[[int], T], loads: RoundLoads) -> list[T]:
    """`measure(attempt)` until `rounds` rounds ran with the machine to ourselves.

    A round in which other processes used more than DISTURBED_LOAD of the machine measured
    someone else's job as much as ours: it is left out and run again, at most
    MAX_EXTRA_ROUNDS times. Returns the kept rounds' results; `loads` records both kinds.
    """
    kept: list[T] = []
    attempt = 0
    while len(kept) < rounds:
        attempt += 1
        log(f"round {len(kept) + 1} of {rounds} (attempt {attempt})")
        meter = LoadMeter().start()
        result = measure(attempt)
        load = meter.foreign_fraction()
        log(f"  other processes used {load:.0%} of the machine")
        if load > DISTURBED_LOAD and attempt < rounds + MAX_EXTRA_ROUNDS:
            loads.discarded.append(load)
            log("  round left out and measured again")
            continue
        loads.kept.append(load)
        kept.append(result)
    return kept


# One round of the main sweep: Triton's levels with their statistics windows, and the
# baselines' wall-clock seconds.
Round = tuple[
    dict[int, tuple[CsvLevel, ProfiledLevel]],
    dict[int, dict[str, ModelCounters]],
    dict[str, list[float]],
]


@dataclasses.dataclass
class Measurement:
    """Everything measured over the rounds of one run."""

    levels: dict[int, list[tuple[CsvLevel, ProfiledLevel]]]
    counters: dict[int, list[dict[str, ModelCounters]]]
    baseline_runs: dict[str, list[list[float]]]  # seconds, per kept round
    baseline_warmups: dict[str, float]
    outputs: dict[str, bytes]
    loads: RoundLoads = dataclasses.field(default_factory=RoundLoads)


def _time_baselines(
    baselines: dict[str, Callable[[bytes], bytes]],
    order: list[str],
    image: bytes,
    count: int,
    runs: dict[str, list[float]],
) -> None:
    """`count` edits through each baseline in `order`; wall-clock seconds go to `runs`."""
    for name in order:
        for _ in range(count):
            started = time.perf_counter()
            baselines[name](image)
            runs[name].append(time.perf_counter() - started)
        log(
            f"  {BASELINE_LABELS[name]}: {len(runs[name])} edits, median "
            f"{statistics.median(runs[name]) * 1000:,.0f} ms"
        )


def measure_rounds(
    config: BenchConfig,
    url: str,
    perf: PerfAnalyzer,
    data_file: Path,
    workdir: Path,
    baselines: dict[str, Callable[[bytes], bytes]],
    image: bytes,
) -> Measurement:
    """perf_analyzer at every level and each baseline next to the first, round after round."""
    import tritonclient.grpc as grpcclient

    measured = Measurement({}, {}, {}, {}, {})
    measured.outputs["triton"], warmup_s = warm_up(url, config, image)
    log(f"Triton warm-up ({2 * config.edit_instances} edits): {warmup_s:.1f} s")
    for name, edit in baselines.items():
        started = time.perf_counter()
        measured.outputs[name] = edit(image)
        measured.baseline_warmups[name] = time.perf_counter() - started
        measured.baseline_runs[name] = []
        log(f"{BASELINE_LABELS[name]} warm-up: {measured.baseline_warmups[name]:.1f} s")

    def one_round(attempt: int) -> Round:
        levels: dict[int, tuple[CsvLevel, ProfiledLevel]] = {}
        counters: dict[int, dict[str, ModelCounters]] = {}
        runs: dict[str, list[float]] = {name: [] for name in baselines}
        # Every other round the baselines go first, so drift within a round does not
        # always favour the same system.
        order = list(baselines) if attempt % 2 else list(reversed(baselines))
        baselines_first = attempt % 2 == 0
        for concurrency in config.concurrency:
            first_level = concurrency == config.concurrency[0]
            if first_level and baselines_first:
                _time_baselines(baselines, order, image, config.requests_per_round, runs)
            requests = config.requests_per_round * concurrency
            before = settled_snapshot(client)
            row, profiled = perf.run_level(
                config.pipeline, url, data_file, concurrency, requests, workdir, tag=f"_a{attempt}"
            )
            counters[concurrency] = window(before, settled_snapshot(client))
            levels[concurrency] = (row, profiled)
            log(
                f"  Triton c={concurrency}: {requests} edits, "
                f"{profiled.throughput_per_s:.3f} edits/s, median "
                f"{statistics.median(profiled.latencies_ms):,.0f} ms"
            )
            if first_level and not baselines_first:
                _time_baselines(baselines, order, image, config.requests_per_round, runs)
        return levels, counters, runs

    client = grpcclient.InferenceServerClient(url)
    try:
        kept = undisturbed_rounds(config.rounds, one_round, measured.loads)
    finally:
        client.close()
    for levels, counters, runs in kept:
        for concurrency, level in levels.items():
            measured.levels.setdefault(concurrency, []).append(level)
            measured.counters.setdefault(concurrency, []).append(counters[concurrency])
        for name, times in runs.items():
            measured.baseline_runs[name].append(times)
    return measured


def load_baselines(
    config: BenchConfig, preset_root: Path, export_dir: Path
) -> tuple[dict[str, Callable[[bytes], bytes]], list[str]]:
    """The in-process systems, loaded once; notes say why one is missing."""
    baselines: dict[str, Callable[[bytes], bytes]] = {}
    notes: list[str] = []
    gpu = config.flavour == "tensorrt" or config.precision == "fp16"
    providers = CPU
    if gpu:
        import onnxruntime as ort

        providers = ("CUDAExecutionProvider",)
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            providers = ()
            notes.append("The bare loop was skipped: this onnxruntime has no CUDA provider.")
    if providers:
        try:
            baselines["bare_onnxruntime"] = BareOnnxLoop(export_dir, config, providers)
        except ProviderUnavailable as error:
            notes.append(f"The bare loop was skipped: {error} (see its warning above).")
    try:
        device = "cuda" if gpu else "cpu"
        folder = preset_root / PIPELINE_FOLDER[config.pipeline]
        baselines["diffusers_eager"] = DiffusersEager(folder, config, device)
    except ValueError as error:
        notes.append(f"The diffusers baseline was skipped: {error}.")
    return baselines, notes


# --------------------------------------------------------------------------- ablation


@dataclasses.dataclass(frozen=True)
class AblationStep:
    """One change measured against the configuration before it."""

    name: str
    change: str
    before: dict[str, Any]  # BenchConfig fields that differ from the run's configuration
    after: dict[str, Any]
    kept: bool


def ablation_steps(config: BenchConfig) -> list[AblationStep]:
    """The serving optimisations, each against the step before; then what was rejected."""
    plain = {"optimize": False, "cpu_rate_limit": False, "unet_split_threads": False}
    fused = {**plain, "optimize": True}
    limited = {**fused, "cpu_rate_limit": True}
    final = {
        "optimize": config.optimize,
        "cpu_rate_limit": config.cpu_rate_limit,
        "unet_split_threads": config.unet_split_threads,
    }
    return [
        AblationStep(
            "onnxruntime fusions",
            "export --optimize: onnxruntime's SD fusions; self-attention as "
            "MultiHeadAttention, which runs flash attention on CPU; GEGLU split into value "
            "and gate projections (BiasGelu); SkipLayerNormalization left unfused in the UNet",
            plain,
            fused,
            kept=True,
        ),
        AblationStep(
            "rate limiter",
            "one component session computes at a time, with every core (Triton rate "
            "limiter on the python-onnxruntime component models)",
            fused,
            limited,
            kept=True,
        ),
        AblationStep(
            "UNet side by side",
            "UNet calls the dynamic batcher merges run side by side on one-thread sessions "
            "instead of as one batch on all cores",
            limited,
            final,
            kept=True,
        ),
        AblationStep(
            "no spinning (rejected)",
            "onnxruntime pool threads sleep instead of spinning between operators",
            final,
            {**final, "allow_spinning": False},
            kept=False,
        ),
    ]


def _summary(rounds: list[tuple[CsvLevel, ProfiledLevel]]) -> dict[str, float]:
    level = LevelResult.aggregate(rounds)
    return {"p50_ms": level.p50_ms, "throughput_per_s": level.throughput_per_s}


def paired_changes(
    measured: dict[tuple[str, int], list[tuple[CsvLevel, ProfiledLevel]]],
) -> dict[str, dict[str, Any]]:
    """After against before, round by round: the c=1 median latency and c=2 throughput."""
    latency = report.paired_ratio(
        [profiled.latencies_ms for _, profiled in measured[("after", 1)]],
        [profiled.latencies_ms for _, profiled in measured[("before", 1)]],
    )
    throughput = report.geometric_mean_ratio(
        [
            after.throughput_per_s / before.throughput_per_s
            for (_, after), (_, before) in zip(
                measured[("after", 2)], measured[("before", 2)], strict=True
            )
        ]
    )
    return {
        "median_ms_c1": {key: latency[key] for key in ("value", "per_round")},
        "throughput_c2": throughput,
    }


def _ablation_round(
    config: BenchConfig,
    perf: PerfAnalyzer,
    data_file: Path,
    urls: dict[str, str],
    workdirs: dict[str, Path],
    levels: tuple[int, ...],
    attempt: int,
) -> dict[tuple[str, int], tuple[CsvLevel, ProfiledLevel]]:
    """Each level on the servers in turn: (side, concurrency) -> perf_analyzer's result."""
    return {
        (side, concurrency): perf.run_level(
            config.pipeline,
            url,
            data_file,
            concurrency,
            config.requests_per_round * concurrency,
            workdirs[side],
            tag=f"_a{attempt}",
        )
        for concurrency in levels
        for side, url in urls.items()
    }


def measure_ablation(
    config: BenchConfig,
    preset_root: Path,
    build_dir: Path,
    perf: PerfAnalyzer,
    data_file: Path,
    image: bytes,
    rounds: int,
) -> list[dict[str, Any]]:
    """Each step: both servers up, perf_analyzer alternating between them (c=1, c=2)."""
    results = []
    levels = (1, 2)
    for index, step in enumerate(ablation_steps(config)):
        log(f"ablation {index + 1}: {step.name}")
        variants = {
            "before": dataclasses.replace(config, **step.before),
            "after": dataclasses.replace(config, **step.after),
        }
        repositories = {
            side: build_for(variant, preset_root, build_dir, f"ablation-{index + 1}-{side}")
            for side, variant in variants.items()
        }
        loads = RoundLoads()
        with contextlib.ExitStack() as stack:
            urls = {
                side: stack.enter_context(
                    serving(repository, None, repository.parent / "tritonserver.log")
                )
                for side, repository in repositories.items()
            }
            for side, url in urls.items():
                warm_up(url, variants[side], image)

            workdirs = {side: repository.parent for side, repository in repositories.items()}
            one_round = functools.partial(
                _ablation_round, config, perf, data_file, urls, workdirs, levels
            )
            kept = undisturbed_rounds(rounds, one_round, loads)
        measured = {key: [round_[key] for round_ in kept] for key in kept[0]}
        entry: dict[str, Any] = {
            "name": step.name,
            "change": step.change,
            "kept": step.kept,
            "foreign_load": [round(x, 3) for x in loads.kept],
            "discarded_rounds_load": [round(x, 3) for x in loads.discarded],
        }
        for side in ("before", "after"):
            for concurrency in levels:
                summary = _summary(measured[(side, concurrency)])
                entry[f"{side}_c{concurrency}"] = summary
        entry["paired"] = paired_changes(measured)
        results.append(entry)
        row = report.optimisation_row(entry)
        log(f"  median c=1 {row[2]}; edits/s c=2 {row[3]}")
    return results


# --------------------------------------------------------------------------- main


def summarise(
    config: BenchConfig, measured: Measurement
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Triton's levels and stage tables, the baselines' timings, and output agreement."""
    triton = {
        "levels": [LevelResult.aggregate(measured.levels[c]).to_json() for c in config.concurrency],
        "stages": {
            str(c): [
                row.to_json() for row in stage_rows(combine(*measured.counters[c]), config.pipeline)
            ]
            for c in config.concurrency
        },
    }
    baselines = {
        name: Timing(
            tuple(x for runs in rounds for x in runs), measured.baseline_warmups[name]
        ).to_json()
        for name, rounds in measured.baseline_runs.items()
    }
    agreement = {
        f"Triton vs {BASELINE_LABELS[name]}": pixel_difference(measured.outputs["triton"], output)
        for name, output in measured.outputs.items()
        if name != "triton"
    }
    return triton, baselines, agreement


def run(config: BenchConfig, args: argparse.Namespace) -> dict[str, Any]:
    from model_repository.serve import ensure_preset

    build_dir: Path = args.build_dir
    preset_root = ensure_preset(config.preset, build_dir)
    export_dir = export_folder(build_dir, config)
    ensure_export(
        [preset_root], export_dir, fp16=config.precision == "fp16", optimize=config.optimize
    )
    name = f"{export_dir.name}-{config.flavour}"
    workdir = build_dir / "bench" / name
    workdir.mkdir(parents=True, exist_ok=True)
    repository = None
    if args.url is None and not args.prepare_only and config.flavour != "python-onnxruntime":
        raise SystemExit(
            f"error: the {config.flavour} flavour needs the NGC tritonserver (the wheel's "
            "server has the Python backend only): serve the repository there and pass --url"
        )
    if args.url is None or config.flavour == "tensorrt":
        repository = build_for(config, preset_root, build_dir, name)
    if args.prepare_only:
        log(f"repository: {repository}")
        log("serve it, then run again with --url HOST:8001 (see benchmarks/README.md)")
        return {}
    if args.url is not None and repository is not None:
        log(f"the server at {args.url} must serve {repository}")

    perf = PerfAnalyzer(ensure_binary(), library_folder(build_dir / "perf_analyzer" / "lib"))
    perf_version = check_runs(perf.binary, perf.libraries)
    image = photo_png(config.size)
    data_file = write_input_data(workdir / "input_data.json", image, config.request())

    optimisations = []
    if args.ablation:
        if args.url is not None:
            raise SystemExit("error: --ablation starts its own servers; leave out --url")
        optimisations = measure_ablation(
            config, preset_root, build_dir, perf, data_file, image, args.ablation_rounds
        )

    baselines, notes = (
        ({}, []) if args.skip_baselines else load_baselines(config, preset_root, export_dir)
    )
    with serving(repository, args.url, workdir / "tritonserver.log") as url:
        measured = measure_rounds(config, url, perf, data_file, workdir, baselines, image)
    triton, timings, agreement = summarise(config, measured)
    triton["foreign_load"] = [round(x, 3) for x in measured.loads.kept]
    triton["discarded_rounds_load"] = [round(x, 3) for x in measured.loads.discarded]
    if measured.loads.discarded:
        notes.append(
            f"{len(measured.loads.discarded)} round(s) were left out and measured again: other "
            "processes used "
            + ", ".join(f"{x:.0%}" for x in measured.loads.discarded)
            + f" of the machine meanwhile (more than {DISTURBED_LOAD:.0%})."
        )
    disturbed = [x for x in measured.loads.kept if x > DISTURBED_LOAD]
    if disturbed:
        notes.append(
            "Some rounds kept here still had other processes on the machine ("
            + ", ".join(f"{x:.0%}" for x in disturbed)
            + "): no clean round came within the retries, so every system in them ran slower."
        )
    for step in optimisations:
        if step["discarded_rounds_load"]:
            notes.append(
                f"Ablation '{step['name']}': {len(step['discarded_rounds_load'])} disturbed "
                "round(s) measured again."
            )

    levels = {lv["concurrency"]: lv for lv in triton["levels"]}
    ratios = {}
    if 1 in measured.levels:
        # Triton at concurrency 1 against each baseline, round by round.
        triton_rounds = [profiled.latencies_ms for _, profiled in measured.levels[1]]
        ratios = {
            name: report.paired_ratio(triton_rounds, [[s * 1000 for s in r] for r in rounds])
            for name, rounds in measured.baseline_runs.items()
        }
    targets = report.evaluate_targets(
        ratios, {c: lv["throughput_per_s"] for c, lv in levels.items()}
    )
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": args.command_line,
        "machine": report.machine_info(),
        "versions": report.library_versions() | {"perf_analyzer": version_number(perf_version)},
        "config": config.to_json(),
        "request_description": describe_request(config, len(image)),
        "export": str(export_dir),
        "triton": triton,
        "baselines": timings,
        "ratios": ratios,
        "targets_apply": report.targets_apply(config.to_json()),
        "targets": [t.to_json() for t in targets],
        "agreement": agreement,
        "latency_note": (
            "Triton: client-side latency measured by perf_analyzer over gRPC on this machine "
            "(the whole ensemble: PNG decode, CLIP, VAE encode, the BLS sampler loop, VAE "
            "decode, PNG encode). Baselines: wall clock of the same work in this process "
            "while the server sat idle. All three ran in the same interleaved rounds (every "
            "other round the baselines went before Triton's concurrency 1), after warm-up. "
            "Medians and percentiles pool the rounds (p99 of a few edits is their maximum). "
            "The ratio is paired by round: the geometric mean over rounds of Triton's median "
            "over the baseline's median in that round, so the machine's drift from one round "
            "to the next cancels out."
        ),
        "stages_note": (
            "compute_infer per model, summed over the rounds of each level, divided by the "
            "edits. At concurrency above 1, merged UNet batches count their whole duration "
            "for each request in them and stages of different edits may overlap, so rows "
            "can add up to more than the wall clock."
        ),
        "notes": notes,
        "optimisations": optimisations,
    }


def write_results(results: dict[str, Any], output_dir: Path, stem: str) -> dict[str, Path]:
    """<stem>.json, <stem>.png and <stem>.md (which shows the plot) in `output_dir`."""
    json_path = report.write_json(results, output_dir / f"{stem}.json")
    plot_path = report.plot(results, output_dir / f"{stem}.png")
    md_path = report.write_markdown(results, output_dir / f"{stem}.md", plot_path.name)
    return {"json": json_path, "png": plot_path, "md": md_path}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=defaults.preset)
    parser.add_argument(
        "--pipeline", choices=(INSTRUCT_PIX2PIX, IMG2IMG), default=defaults.pipeline
    )
    parser.add_argument("--size", type=int, default=defaults.size, help="photo side in pixels")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--scheduler", choices=SCHEDULERS, help="default: the checkpoint's")
    parser.add_argument("--prompt", default=defaults.prompt)
    parser.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale)
    parser.add_argument("--image-guidance-scale", type=float, default=defaults.image_guidance_scale)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(defaults.concurrency))
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument(
        "--requests", type=int, default=defaults.requests_per_round,
        help="edits per system per round at concurrency 1 (times the level above it)",
    )  # fmt: skip
    parser.add_argument("--flavour", choices=FLAVOURS, default=defaults.flavour)
    parser.add_argument("--precision", choices=("fp32", "fp16"), default=defaults.precision)
    parser.add_argument(
        "--no-optimize", action="store_true", help="plain export, without onnxruntime fusions"
    )
    parser.add_argument("--intra-op-threads", type=int, default=defaults.intra_op_threads)
    parser.add_argument(
        "--spinning",
        action=argparse.BooleanOptionalAction,
        default=defaults.allow_spinning,
        help="onnxruntime pool threads spin while idle",
    )
    parser.add_argument(
        "--rate-limit",
        action=argparse.BooleanOptionalAction,
        default=defaults.cpu_rate_limit,
        help="one component session computes at a time (Triton rate limiter)",
    )
    parser.add_argument(
        "--unet-split-threads",
        action=argparse.BooleanOptionalAction,
        default=defaults.unet_split_threads,
        help="merged UNet calls run side by side, one thread each",
    )
    parser.add_argument("--edit-instances", type=int, default=defaults.edit_instances)
    parser.add_argument("--unet-queue-delay-us", type=int, default=defaults.unet_queue_delay_us)
    parser.add_argument("--skip-baselines", action="store_true", help="measure Triton only")
    parser.add_argument(
        "--ablation", action="store_true", help="first measure what each optimisation bought"
    )
    parser.add_argument("--ablation-rounds", type=int, default=3, help="rounds per --ablation step")
    parser.add_argument("--url", help="gRPC host:port of a running server (skip starting one)")
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="build the export, engines and repository, print where, and stop",
    )
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR)
    parser.add_argument("--output-dir", type=Path, default=report.RESULTS_DIR)
    parser.add_argument("--stem", help="result file name without extension (default: date-machine)")
    args = parser.parse_args(argv)
    shown = sys.argv[1:] if argv is None else argv
    args.command_line = "python -m benchmarks.run " + shlex.join(shown)
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
        rounds=args.rounds,
        requests_per_round=args.requests,
        flavour=args.flavour,
        precision=args.precision,
        optimize=not args.no_optimize and args.flavour != "tensorrt",
        intra_op_threads=args.intra_op_threads,
        allow_spinning=args.spinning,
        cpu_rate_limit=args.rate_limit,
        unet_split_threads=args.unet_split_threads,
        edit_instances=args.edit_instances,
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
    if not results:
        return 0
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
