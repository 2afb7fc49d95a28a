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
import contextlib
import datetime
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import results as report
from benchmarks.ablation import measure_ablation
from benchmarks.fidelity import Agreement
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
from benchmarks.serving import build, log, serving, warm_up
from benchmarks.settings import BenchConfig
from benchmarks.systems import DIFFUSERS_FP32, BareLoop, Baseline, ServedEdit, load_baselines
from model_repository.arguments import add_arguments, from_arguments
from model_repository.configs import PYTHON_FLAVOURS, RepositoryOptions
from pix2pix_client.contract import stream_model


@dataclass(frozen=True)
class Round:
    """What one round measured: Triton's levels with their statistics windows, the stream
    at concurrency 1, and each baseline's wall-clock milliseconds."""

    levels: dict[int, Profiled]
    counters: dict[int, dict[str, ModelCounters]]
    streaming: Profiled
    baseline_ms: dict[str, list[float]]


def measure_rounds(
    config: BenchConfig,
    url: str,
    perf: PerfAnalyzer,
    inputs: tuple[Path, Path],
    baselines: dict[str, Baseline],
    image: bytes,
    loads: RoundLoads,
) -> list[Round]:
    """perf_analyzer at every level, the stream and each baseline next to concurrency 1."""
    import tritonclient.grpc as grpcclient

    requests = config.requests_per_round
    edit_data, stream_data = inputs
    workdir = edit_data.parent

    def time_baselines(order: list[str], runs: dict[str, list[float]]) -> None:
        for name in order:
            for _ in range(requests):
                started = time.perf_counter()
                baselines[name](image)
                runs[name].append((time.perf_counter() - started) * 1000)
            log(f"  {name}: {len(runs[name])} edits")

    def one_round(attempt: int) -> Round:
        runs: dict[str, list[float]] = {name: [] for name in baselines}
        levels, counters = {}, {}
        # Every other round the baselines go first: drift within a round favours no one.
        order = list(baselines) if attempt % 2 else list(reversed(baselines))
        if attempt % 2 == 0:
            time_baselines(order, runs)
        for level in config.concurrency:
            before = settled_snapshot(client)
            levels[level] = perf.run(
                config.pipeline,
                url,
                edit_data,
                level,
                requests * level,
                workdir,
                tag=f"_a{attempt}",
            )
            counters[level] = window(before, settled_snapshot(client))
            log(f"  Triton c={level}: {levels[level].throughput_per_s:.3f} edits/s")
        streaming = perf.run(
            stream_model(config.pipeline),
            url,
            stream_data,
            1,
            requests,
            workdir,
            streaming=True,
            tag=f"_a{attempt}",
        )
        if attempt % 2:
            time_baselines(order, runs)
        return Round(levels, counters, streaming, runs)

    client = grpcclient.InferenceServerClient(url)
    try:
        return undisturbed_rounds(config.rounds, one_round, loads, log)
    finally:
        client.close()


# --------------------------------------------------------------------------- main


def serve_others(
    config: BenchConfig,
    build_dir: Path,
    image: bytes,
    stack: contextlib.ExitStack,
    running: dict[str, str],
) -> dict[str, Baseline]:
    """Each other served configuration (`--served`) as a system. Configurations that
    differ only in the cache interval, a request input, share a server: `running` maps
    what is served (`BenchConfig.name`) to its URL and gains the servers started here."""
    systems: dict[str, Baseline] = {}
    for variant in config.served_variants():
        if variant.name not in running:
            repository = build(variant, build_dir, variant.name).repository
            running[variant.name] = stack.enter_context(serving(repository, None))
            warm_up(running[variant.name], variant, image, repository)
        system = ServedEdit(running[variant.name], variant)
        systems[system.name] = system
    return systems


def run(config: BenchConfig, args: argparse.Namespace) -> report.Results | None:
    built = build(config, args.build_dir, config.name)
    if args.prepare_only or (args.url is None and config.options.flavour not in PYTHON_FLAVOURS):
        # The wheel's tritonserver runs the Python backend only: the NGC container serves
        # the other flavours, and the run measures it with --url (benchmarks/README.md).
        log(f"repository: {built.repository}")
        return None
    perf = PerfAnalyzer(ensure_binary(), library_folder(args.build_dir / "perf_analyzer" / "lib"))
    perf_version = check_runs(perf.binary, perf.libraries)
    image = photo_png(config.size)
    workdir = built.repository.parent
    stream_request = {**config.request(), "preview_every": config.preview_every}
    inputs = (
        write_input_data(workdir / "input_data.json", image, config.request()),
        write_input_data(workdir / "input_stream.json", image, stream_request),
    )
    notes: list[str] = []
    ablation = []
    if args.ablation:
        ablation = measure_ablation(
            config, args.build_dir, perf, inputs[0], image, args.ablation_rounds, log
        )
    baselines = {} if args.skip_baselines else load_baselines(config, built, notes)
    loops = [system for system in baselines.values() if isinstance(system, BareLoop)]
    preview = loops[0].preview_cost(image) if loops else None
    loads = RoundLoads()
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(serving(built.repository, args.url))
        triton_png = warm_up(url, config, image, None if args.url else built.repository)
        baselines |= serve_others(config, args.build_dir, image, stack, {config.name: url})
        outputs = {name: system(image) for name, system in baselines.items()}  # their warm-up
        rounds = measure_rounds(config, url, perf, inputs, baselines, image, loads)
    if loads.discarded:
        notes.append(
            f"{len(loads.discarded)} round(s) left out and measured again: other "
            f"processes used more than {DISTURBED_LOAD:.0%} of the machine."
        )
    levels = {c: [r.levels[c] for r in rounds] for c in config.concurrency}
    results = report.Results(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=args.command_line,
        machine=report.machine_info(),
        versions=report.library_versions() | {"perf_analyzer": version_number(perf_version)},
        config=config.to_json(),
        targets_apply=config.targets_apply,
        export=str(built.export_dir),
        levels=[Level.aggregate(levels[c]) for c in config.concurrency],
        stages={
            c: stage_rows(combine(*(r.counters[c] for r in rounds)), config.pipeline)
            for c in config.concurrency
        },
        streaming=Level.aggregate([r.streaming for r in rounds]),
        baselines={
            name: report.Timing(tuple(x for r in rounds for x in r.baseline_ms[name]))
            for name in baselines
        },
        agreement={
            f"Triton vs {name}": Agreement.of(triton_png, png) for name, png in outputs.items()
        },
        preview=preview,
        loads=loads,
        ablation=ablation,
        notes=notes,
    )
    if 1 in levels:
        # Triton at concurrency 1 against each other system, round by round.
        triton = [level.latencies_ms for level in levels[1]]
        for name in baselines:
            results.ratios[name] = report.Ratio.paired(
                triton, [r.baseline_ms[name] for r in rounds]
            )
        streams = [r.streaming.latencies_ms for r in rounds]
        results.ratios["streaming"] = report.Ratio.paired(streams, triton)
        if (reference := DIFFUSERS_FP32) in baselines:
            # Every system against diffusers fp32 eager: what each speed switch buys.
            diffusers = [r.baseline_ms[reference] for r in rounds]
            results.against_diffusers["triton"] = report.Ratio.paired(triton, diffusers)
            for name in baselines:
                if name != reference:
                    runs = [r.baseline_ms[name] for r in rounds]
                    results.against_diffusers[name] = report.Ratio.paired(runs, diffusers)
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
    today = datetime.date.today().isoformat()
    stem = args.stem or f"{today}-{report.machine_slug(results.machine)}"
    paths = report.write(results, args.output_dir, stem)
    log("\n" + report.console_summary(results) + "\n")
    for kind, path in paths.items():
        log(f"{kind:>4}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
