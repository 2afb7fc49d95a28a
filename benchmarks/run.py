"""Benchmarks Triton against diffusers eager and a bare onnxruntime loop, in one run.

    python -m benchmarks.run [--preset small] [--size 256] [--steps 20] [--concurrency 1 2 4]
        [--rounds 5] [--flavour ...] [--url HOST:PORT] [--ablation] [--help: every option]

Builds what is missing (preset, validated export, repository: what `make serve` serves
unless a flag says otherwise), loads the baselines, starts tritonserver (or uses --url)
and warms everything up. Then, round after round: perf_analyzer at each concurrency level
with Triton's statistics around it, the streaming model at concurrency 1, and the same
edits through each baseline next to it. Results: benchmarks/results/<date>-<machine>.*.
How it measures and what the figures mean: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import results as report
from benchmarks.ablation import measure_ablation
from benchmarks.perf_analyzer import (
    Level,
    PerfAnalyzer,
    Profiled,
    check_runs,
    ensure_binary,
    library_folder,
    version_number,
    write_input_data,
)
from benchmarks.photo import photo_png
from benchmarks.rounds import DISTURBED_LOAD, RoundLoads, undisturbed_rounds
from benchmarks.server_stats import ModelCounters, combine, settled_snapshot, stage_rows, window
from benchmarks.serving import Built, build, log, serving, warm_up
from benchmarks.settings import BenchConfig
from benchmarks.systems import BareLoop, DiffusersEager, ProviderUnavailable, pixel_difference
from model_repository.arguments import add_arguments, from_arguments
from model_repository.configs import RepositoryOptions
from pix2pix_client.contract import stream_model

Baseline = Callable[[bytes], bytes]


def load_baselines(config: BenchConfig, built: Built, notes: list[str]) -> dict[str, Baseline]:
    """The in-process systems, loaded once; notes say why one is missing."""
    baselines: dict[str, Baseline] = {}
    gpu = config.options.flavour == "tensorrt" or config.options.precision == "fp16"
    providers = ("CUDAExecutionProvider",) if gpu else ("CPUExecutionProvider",)
    try:
        baselines[BareLoop.name] = BareLoop(built.export_dir, config, providers)
    except ProviderUnavailable as error:
        notes.append(f"The bare loop was skipped: {error}.")
    try:
        device = "cuda" if gpu else "cpu"
        baselines[DiffusersEager.name] = DiffusersEager(built.preset_root, config, device)
    except ValueError as error:
        notes.append(f"The diffusers baseline was skipped: {error}.")
    return baselines


# --------------------------------------------------------------------------- the rounds


@dataclass
class Measured:
    """What the rounds of one run measured, round by round."""

    levels: dict[int, list[Profiled]] = field(default_factory=dict)
    counters: dict[int, list[dict[str, ModelCounters]]] = field(default_factory=dict)
    streaming: list[Profiled] = field(default_factory=list)
    baseline_ms: dict[str, list[list[float]]] = field(default_factory=dict)
    loads: RoundLoads = field(default_factory=RoundLoads)


@dataclass(frozen=True)
class Inputs:
    """perf_analyzer's input data for the whole edit model and the streaming one."""

    edit: Path
    stream: Path


def measure_rounds(
    config: BenchConfig,
    url: str,
    perf: PerfAnalyzer,
    inputs: Inputs,
    workdir: Path,
    baselines: dict[str, Baseline],
    image: bytes,
) -> Measured:
    """perf_analyzer at every level, the stream and each baseline next to concurrency 1."""
    import tritonclient.grpc as grpcclient

    measured = Measured(baseline_ms={name: [] for name in baselines})
    requests = config.requests_per_round

    def time_baselines(order: list[str], runs: dict[str, list[float]]) -> None:
        for name in order:
            for _ in range(requests):
                started = time.perf_counter()
                baselines[name](image)
                runs[name].append((time.perf_counter() - started) * 1000)
            log(f"  {name}: {len(runs[name])} edits")

    def one_round(attempt: int) -> Measured:
        this = Measured(baseline_ms={name: [] for name in baselines})
        runs: dict[str, list[float]] = {name: [] for name in baselines}
        # Every other round the baselines go first: drift within a round favours no one.
        order = list(baselines) if attempt % 2 else list(reversed(baselines))
        if attempt % 2 == 0:
            time_baselines(order, runs)
        for concurrency in config.concurrency:
            before = settled_snapshot(client)
            profiled = perf.run(
                config.pipeline,
                url,
                inputs.edit,
                concurrency,
                requests * concurrency,
                workdir,
                tag=f"_a{attempt}",
            )
            this.counters[concurrency] = [window(before, settled_snapshot(client))]
            this.levels[concurrency] = [profiled]
            log(f"  Triton c={concurrency}: {profiled.throughput_per_s:.3f} edits/s")
        this.streaming = [
            perf.run(
                stream_model(config.pipeline),
                url,
                inputs.stream,
                1,
                requests,
                workdir,
                streaming=True,
                tag=f"_a{attempt}",
            )
        ]
        if attempt % 2:
            time_baselines(order, runs)
        for name, times in runs.items():
            this.baseline_ms[name] = [times]
        return this

    client = grpcclient.InferenceServerClient(url)
    try:
        kept = undisturbed_rounds(config.rounds, one_round, measured.loads, log)
    finally:
        client.close()
    for this in kept:
        for concurrency in config.concurrency:
            measured.levels.setdefault(concurrency, []).extend(this.levels[concurrency])
            measured.counters.setdefault(concurrency, []).extend(this.counters[concurrency])
        measured.streaming.extend(this.streaming)
        for name in baselines:
            measured.baseline_ms[name].extend(this.baseline_ms[name])
    return measured


# --------------------------------------------------------------------------- main


def run(config: BenchConfig, args: argparse.Namespace) -> report.Results | None:
    name = f"{config.preset}-{config.options.flavour}"
    built = build(config, args.build_dir, name)
    if args.url is None and config.options.flavour not in ("python-onnxruntime",):
        log(f"repository: {built.repository}")
        log(
            "the wheel's tritonserver runs the Python backend only: serve this repository in "
            "the NGC container and run again with --url (benchmarks/README.md)"
        )
        return None
    if args.prepare_only:
        log(f"repository: {built.repository}")
        return None
    workdir = built.repository.parent
    perf = PerfAnalyzer(ensure_binary(), library_folder(args.build_dir / "perf_analyzer" / "lib"))
    perf_version = check_runs(perf.binary, perf.libraries)
    image = photo_png(config.size)
    inputs = Inputs(
        write_input_data(workdir / "input_data.json", image, config.request()),
        write_input_data(
            workdir / "input_stream.json",
            image,
            {**config.request(), "preview_every": config.preview_every},
        ),
    )
    notes: list[str] = []
    ablation = []
    if args.ablation:
        ablation = measure_ablation(
            config, args.build_dir, perf, inputs.edit, image, args.ablation_rounds, log
        )
    baselines = {} if args.skip_baselines else load_baselines(config, built, notes)
    outputs = {name: system(image) for name, system in baselines.items()}  # their warm-up
    preview = baselines[BareLoop.name].preview_cost(image) if BareLoop.name in baselines else None
    with serving(built.repository, args.url) as url:
        outputs["Triton"] = warm_up(url, config, image)
        measured = measure_rounds(config, url, perf, inputs, workdir, baselines, image)
    if measured.loads.discarded:
        notes.append(
            f"{len(measured.loads.discarded)} round(s) left out and measured again: "
            f"other processes used more than {DISTURBED_LOAD:.0%} of the machine."
        )
    results = report.Results(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=args.command_line,
        machine=report.machine_info(),
        versions=report.library_versions() | {"perf_analyzer": version_number(perf_version)},
        config=config.to_json(),
        targets_apply=config.targets_apply,
        export=str(built.export_dir),
        levels=[Level.aggregate(measured.levels[c]) for c in config.concurrency],
        stages={
            c: stage_rows(combine(*measured.counters[c]), config.pipeline)
            for c in config.concurrency
        },
        streaming=Level.aggregate(measured.streaming),
        baselines={
            name: report.Timing(tuple(x for run in runs for x in run), 0.0)
            for name, runs in measured.baseline_ms.items()
        },
        agreement={
            f"Triton vs {name}": pixel_difference(outputs["Triton"], output)
            for name, output in outputs.items()
            if name != "Triton"
        },
        preview=preview,
        loads=measured.loads,
        ablation=ablation,
        notes=notes,
    )
    if 1 in measured.levels:
        # Triton at concurrency 1 against each other system, round by round.
        triton = [level.latencies_ms for level in measured.levels[1]]
        results.ratios = {
            name: report.Ratio.paired(triton, runs) for name, runs in measured.baseline_ms.items()
        }
        streams = [level.latencies_ms for level in measured.streaming]
        results.ratios["streaming"] = report.Ratio.paired(streams, triton)
    results.evaluate_targets()
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser.add_argument_group("what is measured"), BenchConfig)
    add_arguments(parser.add_argument_group("what is served (as make serve)"), RepositoryOptions)
    run_group = parser.add_argument_group("the run")
    run_group.add_argument("--skip-baselines", action="store_true", help="measure Triton only")
    run_group.add_argument(
        "--ablation", action="store_true", help="first measure what each optimisation bought"
    )
    run_group.add_argument("--ablation-rounds", type=int, default=3, help="rounds per step")
    run_group.add_argument("--url", help="gRPC host:port of a running server to measure")
    run_group.add_argument(
        "--prepare-only", action="store_true", help="build the repository, print it, stop"
    )
    run_group.add_argument("--build-dir", type=Path, default=Path("build"))
    run_group.add_argument("--output-dir", type=Path, default=report.RESULTS_DIR)
    run_group.add_argument("--stem", help="result file name (default: date-machine)")
    args = parser.parse_args(argv)
    shown = sys.argv[1:] if argv is None else argv
    args.command_line = "python -m benchmarks.run " + shlex.join(shown)
    return args


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return from_arguments(BenchConfig, args, options=from_arguments(RepositoryOptions, args))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = run(config, args)
    if results is None:
        return 0
    stem = (
        args.stem or f"{datetime.date.today().isoformat()}-{report.machine_slug(results.machine)}"
    )
    paths = report.write(results, args.output_dir, stem)
    log("\n" + report.console_summary(results) + "\n")
    for kind, path in paths.items():
        log(f"{kind:>4}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
