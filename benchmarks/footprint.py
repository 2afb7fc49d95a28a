"""What serving costs in memory and start time, against diffusers on the same weights:
`make bench-footprint` (the sd15 preset at 512x512 unless PRESET= and SIZE= say otherwise).

For each served configuration (`make serve`'s, and the FLAVOUR:PRECISION ones of
--served), one at a time:

- `serve --repository` of a repository built beforehand, started as an operator starts
  it: the seconds until it is ready, and the PSS of its whole process tree, process by
  process (the serving parent, tritonserver, each model instance). The repository's
  files (links followed: the export's files it serves) are read once first, as diffusers'
  folder is before its load: both start with their weights in the page cache, as on a
  restart, not with whatever the build before happened to leave there. The rest of the
  export (other precisions, graphs for other machines) is not read: at sd15 it is more
  than the page cache holds, and reading it would evict what the server reads;
- EDITS edits at MEMORY_STEPS steps (every served pipeline in turn), then TIMED edits at
  STEPS steps: their latency, the tree's PSS after them and its peak while they ran
  (sampled); in python-openvino, the PSS at rest as well, once the UNets have been idle
  long enough to give their working memory back (--unet-idle-release-s); then CONCURRENT
  edits sent at once, each pipeline in turn: how many completed
  and how many were refused at once (UNAVAILABLE), and the peak while they ran;
- the budget: PSS after the edits against 1.25 x the bytes of the weights the server
  holds (at the precision they compute in) + 1.5 GB.

Then diffusers' pipeline on the same weights, in a process of its own (fp32, and bf16
where the CPU computes it): from_pretrained's seconds, the same edits, its RSS and PSS
after them and its peak RSS. With --from-checkpoint, `serve --model` of the diffusers
folder into an empty build folder as well: export, repository and load, until ready.

Writes benchmarks/results/<date>-<machine>-<preset>-footprint.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.photo import photo_png
from benchmarks.results import cpu_description, library_versions, machine_info, machine_slug
from benchmarks.serving import repository_record
from benchmarks.settings import BenchConfig
from edit_pipeline.openvino_component import bf16_unsupported_reason
from model_repository.arguments import add_arguments, from_arguments
from model_repository.builder import weight_bytes
from model_repository.chain import DEFAULT_BUILD_DIR, Source, ensure_preset, prepare_in_child
from model_repository.configs import PRECISIONS, RepositoryOptions
from pix2pix_client import EditClient, EditError, EditResult, ServerUnavailable
from serving import procfs
from serving.tritonserver import free_port

GB = 1e9
# The budget: PSS <= WEIGHT_FACTOR x the served weights' bytes + ALLOWANCE_BYTES.
WEIGHT_FACTOR = 1.25
ALLOWANCE_BYTES = 1.5 * GB
# Reading smaps_rollup of a tree of multi-GB processes costs CPU: often enough for a
# peak of edits that last seconds, rarely enough to leave the edits their cores.
SAMPLE_S = 2.0
# Past a UNet's idle release, the time its release and heap trim take.
REST_MARGIN_S = 5.0
READY_TIMEOUT_S = 3600.0


def log(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------- memory


def process_label(pid: int, serve_pid: int) -> str:
    """What a process of the server's tree is: the serving parent, tritonserver, or the
    model instance a Python backend process runs."""
    if pid == serve_pid:
        return "serve (builds, supervises)"
    stub = procfs.read_stub(pid)
    if stub is not None:
        return stub.instance
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return str(pid)


def tree_pss(root: int) -> dict[str, int]:
    """PSS in bytes of every process of a tree, by label."""
    return {process_label(pid, root): procfs.pss_bytes(pid) for pid in procfs.process_tree(root)}


class PeakSampler:
    """The largest total PSS a process tree reaches while it runs, sampled."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, sum(tree_pss(self.root).values()))

    def _run(self) -> None:
        # A sample at the start and one at the end, whatever the run's length.
        self._sample()
        while not self._stop.wait(SAMPLE_S):
            self._sample()
        self._sample()

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def served_pipelines(repository: Path) -> list[str]:
    return repository_record(repository)["pipelines"]


def served_weight_bytes(repository: Path, precision: str) -> int:
    """The bytes of the components' weights at the precision they compute in."""
    return sum(weight_bytes(folder, precision) for folder in repository.glob("*/1"))


# --------------------------------------------------------------------------- served


@dataclass
class ServedFootprint:
    """One served configuration's start, memory and edits."""

    name: str
    ready_s: float
    weights_bytes: int
    pss_at_ready: dict[str, int]
    pss_after_edits: dict[str, int]
    # Once idle long enough for the UNets to give their working memory back; None where
    # they keep it.
    pss_at_rest: dict[str, int] | None
    peak_pss: int
    edit_s: list[float]
    stop_s: float
    # Edits sent at once: how each ended (completed, refused, failed) and the peak PSS.
    concurrent: dict[str, int] = field(default_factory=dict)
    concurrent_peak_pss: int = 0
    from_checkpoint_s: float | None = None

    @property
    def budget_bytes(self) -> float:
        return WEIGHT_FACTOR * self.weights_bytes + ALLOWANCE_BYTES

    def total(self, when: str) -> int | None:
        """The whole tree's PSS at ready, after the edits or at rest (None: not read)."""
        by_process = getattr(self, f"pss_{when}")
        return None if by_process is None else sum(by_process.values())


@contextlib.contextmanager
def serving(arguments: list[str], log_file: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`python -m serving.serve ARGUMENTS` on free ports; yields it and its gRPC URL once
    it is ready, stops it with SIGTERM afterwards."""
    grpc, http, metrics = free_port(), free_port(), free_port()
    command = [
        sys.executable, "-m", "serving.serve", *arguments,
        "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics),
        "--log-file", str(log_file),
    ]  # fmt: skip
    with open(log_file.with_suffix(".serve.log"), "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{grpc}"
    try:
        yield process, url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=600)


def wait_ready(process: subprocess.Popen[bytes], url: str) -> float:
    """Seconds from now until the server at `url` is ready."""
    started = time.perf_counter()
    while time.perf_counter() - started < READY_TIMEOUT_S:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited with {process.returncode}")
        # A channel of its own per probe, as an orchestrator's probe connects: a channel
        # refused before the server listened would wait out gRPC's reconnect backoff.
        with contextlib.suppress(Exception), EditClient(url, retries=0) as client:
            if client.health(timeout_s=5)["ready"]:
                return time.perf_counter() - started
        time.sleep(0.5)
    raise TimeoutError(f"not ready after {READY_TIMEOUT_S:.0f} s")


def edit_in_turn(
    client: EditClient, configs: list[BenchConfig], index: int, image: bytes, steps: int
) -> EditResult:
    """Edit number `index` of a series that takes the configs (pipelines) in turn."""
    config = configs[index % len(configs)]
    request = config.request() | {"num_inference_steps": steps}
    prompt = request.pop("prompt")
    return client.edit(image, prompt, model=config.pipeline, **request)


def run_edits(
    url: str, configs: list[BenchConfig], image: bytes, edits: int, steps: int
) -> list[float]:
    """`edits` edits one after the other, taking the configs (pipelines) in turn; their
    seconds."""
    seconds = []
    with EditClient(url, timeout_s=READY_TIMEOUT_S) as client:
        for index in range(edits):
            seconds.append(edit_in_turn(client, configs, index, image, steps).latency_s)
    return seconds


def run_concurrent(
    url: str, configs: list[BenchConfig], image: bytes, edits: int, steps: int
) -> dict[str, int]:
    """`edits` edits sent at once, the configs (pipelines) in turn: how many completed,
    were refused at once as busy, or failed otherwise."""

    def one(index: int) -> str:
        try:
            edit_in_turn(client, configs, index, image, steps)
        except ServerUnavailable:
            return "refused"
        except EditError as error:
            log(f"  edit {index} failed: {error}")
            return "failed"
        return "completed"

    with EditClient(url, timeout_s=READY_TIMEOUT_S) as client, ThreadPoolExecutor(edits) as pool:
        outcomes = list(pool.map(one, range(edits)))
    return {outcome: outcomes.count(outcome) for outcome in ("completed", "refused", "failed")}


def read_through(folder: Path) -> int:
    """Reads every file under `folder` (symbolic links followed) once: the page cache then
    holds them, as after a first start. Returns the bytes read."""
    total = 0
    for root, _, files in os.walk(folder, followlinks=True):
        for name in files:
            with open(Path(root) / name, "rb") as file:
                while chunk := file.read(1 << 24):
                    total += len(chunk)
    return total


def measure_served(
    name: str, config: BenchConfig, repository: Path, args: argparse.Namespace, image: bytes
) -> ServedFootprint:
    log(f"{name}: serving {repository}")
    log(f"  read {read_through(repository) / GB:.1f} GB of its files first")
    log_file = args.build_dir / "bench" / "footprint" / f"{name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with serving(["--repository", str(repository)], log_file) as (process, url):
        ready_s = wait_ready(process, url)
        at_ready = tree_pss(process.pid)
        log(f"  ready in {ready_s:.1f} s, PSS {sum(at_ready.values()) / GB:.2f} GB")
        with PeakSampler(process.pid) as sampler:
            # Every pipeline served, as a server's clients would: each UNet has worked.
            every = [
                replace(config, pipeline=p) for p in repository_record(repository)["pipelines"]
            ]
            run_edits(url, every, image, args.edits, args.memory_steps)
            timed = run_edits(url, [config], image, args.timed_edits, config.steps)
        after = tree_pss(process.pid)
        log(
            f"  after the edits PSS {sum(after.values()) / GB:.2f} GB, peak {sampler.peak / GB:.2f}"
        )
        at_rest = None
        if config.options.flavour == "python-openvino" and config.options.unet_idle_release_s > 0:
            time.sleep(config.options.unet_idle_release_s + REST_MARGIN_S)
            at_rest = tree_pss(process.pid)
            log(f"  at rest PSS {sum(at_rest.values()) / GB:.2f} GB")
        with PeakSampler(process.pid) as concurrent_sampler:
            concurrent = run_concurrent(url, every, image, args.concurrent, args.memory_steps)
        log(f"  {args.concurrent} at once: {concurrent}, peak {concurrent_sampler.peak / GB:.2f}")
        stopping = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=600)
        stop_s = time.perf_counter() - stopping
    return ServedFootprint(
        name=name,
        ready_s=ready_s,
        weights_bytes=served_weight_bytes(repository, config.options.precision),
        pss_at_ready=at_ready,
        pss_after_edits=after,
        pss_at_rest=at_rest,
        peak_pss=max(sampler.peak, sum(after.values())),
        edit_s=timed,
        stop_s=stop_s,
        concurrent=concurrent,
        concurrent_peak_pss=concurrent_sampler.peak,
    )


def measure_from_checkpoint(config: BenchConfig, weights: Path, args: argparse.Namespace) -> float:
    """Seconds from `serve --model` of the diffusers folder, with nothing built, to ready."""
    with tempfile.TemporaryDirectory(prefix="footprint-") as build_dir:
        options = config.options
        arguments = [
            "--model", str(weights), "--build-dir", build_dir,
            "--flavour", options.flavour, "--precision", options.precision,
        ]  # fmt: skip
        log_file = Path(build_dir) / "from-checkpoint.log"
        with serving(arguments, log_file) as (process, url):
            seconds = wait_ready(process, url)
    log(f"  from the checkpoint: ready in {seconds:.1f} s")
    return seconds


# --------------------------------------------------------------------------- diffusers


def diffusers_footprint(
    weights: str, config: BenchConfig, dtype: str, image: bytes, plan: tuple[int, int, int]
) -> dict[str, Any]:
    """diffusers' pipeline in this process (a fresh one): its load, the edits, memory."""
    import torch

    from benchmarks.systems import DiffusersEager

    edits, memory_steps, timed = plan
    read_through(Path(weights))
    started = time.perf_counter()
    pipeline = DiffusersEager(Path(weights), config, dtype=getattr(torch, dtype))
    load_s = time.perf_counter() - started
    pipeline.config = replace(config, steps=memory_steps)
    for _ in range(edits):
        pipeline(image)
    pipeline.config = config
    timings = []
    for _ in range(timed):
        started = time.perf_counter()
        pipeline(image)
        timings.append(time.perf_counter() - started)
    return {
        "load_s": load_s,
        "edit_s": timings,
        "pss_after_edits": procfs.pss_bytes(os.getpid()),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def measure_diffusers(
    dtype: str, config: BenchConfig, weights: Path, args: argparse.Namespace, image: bytes
) -> dict[str, Any]:
    log(f"diffusers {dtype}")
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        found = pool.apply(
            diffusers_footprint,
            (str(weights), config, dtype, image, (args.edits, args.memory_steps, args.timed_edits)),
        )
    log(
        f"  loaded in {found['load_s']:.1f} s, PSS after the edits "
        f"{found['pss_after_edits'] / GB:.2f} GB, peak RSS {found['peak_rss'] / GB:.2f} GB"
    )
    return found


# --------------------------------------------------------------------------- results


@dataclass
class Footprint:
    config: dict[str, Any]
    machine: dict[str, Any]
    libraries: dict[str, str]
    edits: int
    memory_steps: int
    served: list[ServedFootprint] = field(default_factory=list)
    diffusers: dict[str, dict[str, Any]] = field(default_factory=dict)


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value / GB:.2f}"


def markdown(footprint: Footprint) -> str:
    config, machine = footprint.config, footprint.machine
    fp32 = footprint.diffusers.get("float32", {})
    lines = [
        f"# Footprint: {config['preset']} preset, {config['size']}x{config['size']}, "
        f"{config['steps']} steps ({config['pipeline']})",
        "",
        f"Machine: {cpu_description(machine)}, {machine['logical_cores']} cores, "
        f"{machine['ram_gib']} GiB. Each system started alone, its files read "
        "once before (page cache warm, as on a restart); "
        f"{footprint.edits} edits at {footprint.memory_steps} steps, then the timed ones. "
        "PSS: the whole process tree, from /proc/PID/smaps_rollup.",
        "",
        "## Start",
        "",
        "| system | ready (s) | / diffusers fp32 load |",
        "|---|---|---|",
    ]
    load = fp32.get("load_s")
    for served in footprint.served:
        rows = [("from the built repository", served.ready_s)]
        if served.from_checkpoint_s is not None:
            rows.append(
                ("from the checkpoint (export, repository, load)", served.from_checkpoint_s)
            )
        for what, seconds in rows:
            ratio = f"{seconds / load:.2f}x" if load else "-"
            lines.append(f"| {served.name}, {what} | {seconds:.1f} | {ratio} |")
    for dtype, found in footprint.diffusers.items():
        lines.append(f"| diffusers {dtype} `from_pretrained` | {found['load_s']:.1f} | - |")
    lines += [
        "",
        "## Memory (GB)",
        "",
        "| system | at ready | after the edits | at rest | peak | weights | budget | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for served in footprint.served:
        after = served.total("after_edits")
        lines.append(
            f"| {served.name} | {_gb(served.total('at_ready'))} | {_gb(after)} | "
            f"{_gb(served.total('at_rest'))} | {_gb(served.peak_pss)} | "
            f"{_gb(served.weights_bytes)} | {_gb(served.budget_bytes)} | "
            f"{'yes' if after <= served.budget_bytes else 'no'} |"
        )
    for dtype, found in footprint.diffusers.items():
        lines.append(
            f"| diffusers {dtype} | - | {_gb(found['pss_after_edits'])} | - | "
            f"{_gb(found['peak_rss'])} (RSS) | - | - | - |"
        )
    lines += [
        "",
        "## Edit latency",
        "",
        "| system | median (s) | / diffusers fp32 |",
        "|---|---|---|",
    ]
    reference = statistics.median(fp32["edit_s"]) if fp32.get("edit_s") else None
    systems = [(s.name, s.edit_s) for s in footprint.served]
    systems += [(f"diffusers {d}", f["edit_s"]) for d, f in footprint.diffusers.items()]
    for name, seconds in systems:
        if seconds:
            median = statistics.median(seconds)
            ratio = f"{median / reference:.2f}x" if reference else "-"
            lines.append(f"| {name} | {median:.2f} | {ratio} |")
    lines += [
        "",
        "## Edits sent at once (admission)",
        "",
        "| system | sent | completed | refused at once | failed | peak PSS (GB) |",
        "|---|---|---|---|---|---|",
    ]
    for served in footprint.served:
        counts = served.concurrent
        lines.append(
            f"| {served.name} | {sum(counts.values())} | {counts.get('completed', 0)} | "
            f"{counts.get('refused', 0)} | {counts.get('failed', 0)} | "
            f"{_gb(served.concurrent_peak_pss)} |"
        )
    for served in footprint.served:
        lines += [
            "",
            f"## PSS by process: {served.name} (MB)",
            "",
            "| process | at ready | after the edits | at rest |",
            "|---|---|---|---|",
        ]
        at_rest = served.pss_at_rest or {}
        for process in sorted(served.pss_after_edits, key=served.pss_after_edits.__getitem__)[::-1]:
            rest = f"{at_rest[process] / 1e6:.0f}" if process in at_rest else "-"
            lines.append(
                f"| {process} | {served.pss_at_ready.get(process, 0) / 1e6:.0f} | "
                f"{served.pss_after_edits[process] / 1e6:.0f} | {rest} |"
            )
    return "\n".join(lines) + "\n"


def write(footprint: Footprint, output_dir: Path, stem: str) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    data = asdict(footprint)
    (output_dir / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    path = output_dir / f"{stem}.md"
    path.write_text(markdown(footprint))
    return path


# --------------------------------------------------------------------------- main


def served_options(base: RepositoryOptions, spec: str) -> RepositoryOptions:
    flavour, _, precision = spec.partition(":")
    return replace(base, flavour=flavour, precision=precision or "fp32")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=10, help="edits before memory is read")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps of those edits")
    parser.add_argument("--timed-edits", type=int, default=2, help="edits at --steps, timed")
    parser.add_argument(
        "--concurrent", type=int, default=4, help="edits sent at once (admission by memory)"
    )
    parser.add_argument(
        "--from-checkpoint",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time serve --model from the diffusers folder with nothing built",
    )
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR)
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--stem", help="result files' name (default: date, machine, preset)")
    add_arguments(parser.add_argument_group("what is measured"), BenchConfig)
    add_arguments(parser.add_argument_group("what is served (as make serve)"), RepositoryOptions)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Each count's least: memory edits run as many steps as an edit takes at least.
    least = {"edits": 1, "timed_edits": 1, "concurrent": 1, "memory_steps": 2}
    try:
        for name, minimum in least.items():
            if (value := getattr(args, name)) < minimum:
                raise ValueError(f"{name}={value}: allowed >= {minimum}")
        config = from_arguments(BenchConfig, args, options=from_arguments(RepositoryOptions, args))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    options = config.options
    image = photo_png(config.size)
    machine = machine_info()
    footprint = Footprint(
        config=config.to_json(),
        machine=machine,
        libraries=library_versions(),
        edits=args.edits,
        memory_steps=args.memory_steps,
    )
    weights = ensure_preset(config.preset, args.build_dir)
    for spec in (f"{options.flavour}:{options.precision}", *config.served):
        served = served_options(options, spec)
        if served.precision not in PRECISIONS:
            raise ValueError(f"{spec}: allowed precisions {', '.join(PRECISIONS)}")
        repository = args.build_dir / "bench" / "footprint" / spec.replace(":", "-")
        prepare_in_child(
            Source(preset=config.preset), served, args.build_dir, repository=repository
        )
        measured = measure_served(spec, replace(config, options=served), repository, args, image)
        if args.from_checkpoint:
            measured.from_checkpoint_s = measure_from_checkpoint(
                replace(config, options=served), weights, args
            )
        footprint.served.append(measured)
    dtypes = ["float32"]
    if bf16_unsupported_reason() is None:
        dtypes.append("bfloat16")
    for dtype in dtypes:
        footprint.diffusers[dtype] = measure_diffusers(dtype, config, weights, args, image)
    date = datetime.date.today().isoformat()
    stem = args.stem or f"{date}-{machine_slug(machine)}-{config.preset}-footprint"
    path = write(footprint, args.output_dir, stem)
    log(path.read_text())
    log(f"written: {path} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
