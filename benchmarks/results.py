"""A run's results as typed records, the targets, and the .json / .md / .png files.

What the figures mean and how they are measured is in benchmarks/README.md; the files
here hold the figures and short labels only.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.perf_analyzer import Level
from benchmarks.rounds import RoundLoads
from benchmarks.server_stats import StageRow
from benchmarks.systems import PreviewCost

RESULTS_DIR = Path(__file__).parent / "results"
LABELS = {
    "triton": "Triton (perf_analyzer, gRPC, c=1)",
    "streaming": "Triton streaming (previews on), c=1",
    "bare_onnxruntime": "bare onnxruntime loop (same files, same pipeline code)",
    "diffusers_eager": "diffusers eager PyTorch",
}
# The goals (CPU: small preset, 256x256, 20 steps, InstructPix2Pix, guidance on), by the
# ratio they bound: its name and its upper limit.
GOALS = {
    "diffusers_eager": ("Triton / diffusers eager", 0.67),
    "bare_onnxruntime": ("Triton / bare onnxruntime loop", 1.05),
    "streaming": ("streaming / whole edit, end to end", 1.03),
}
PREVIEW_SHARE_MAX = 0.03


@dataclass(frozen=True)
class Ratio:
    """Triton's latency over another's, paired by round: the geometric mean over rounds
    of the ratio of medians within each (benchmarks/README.md: why)."""

    value: float
    per_round: tuple[float, ...]
    triton_median_ms: float
    other_median_ms: float

    @classmethod
    def paired(cls, triton: Sequence[Sequence[float]], other: Sequence[Sequence[float]]) -> Ratio:
        pairs = [(t, o) for t, o in zip(triton, other, strict=True) if t and o]
        if not pairs:
            raise ValueError("no round measured both systems")
        per_round = [statistics.median(t) / statistics.median(o) for t, o in pairs]
        return cls(
            value=geometric_mean(per_round),
            per_round=tuple(round(r, 4) for r in per_round),
            triton_median_ms=statistics.median(x for t, _ in pairs for x in t),
            other_median_ms=statistics.median(x for _, o in pairs for x in o),
        )


def geometric_mean(values: Sequence[float]) -> float:
    return round(math.exp(statistics.fmean(math.log(v) for v in values)), 4)


@dataclass(frozen=True)
class Target:
    name: str
    value: float
    limit: float
    met: bool

    def line(self) -> str:
        return f"{self.name}: {self.value:.3f} (limit {self.limit}) -> " + (
            "met" if self.met else "falls short"
        )


@dataclass(frozen=True)
class Timing:
    """Wall-clock milliseconds of repeated runs of an in-process system (after warm-up)."""

    runs_ms: tuple[float, ...]
    warmup_ms: float

    @property
    def median_ms(self) -> float:
        return statistics.median(self.runs_ms)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.runs_ms)


@dataclass(frozen=True)
class AblationResult:
    """One serving change against the configuration before it (both servers up at once)."""

    name: str
    kept: bool
    median_c1: float  # after / before, paired by round
    median_c1_rounds: tuple[float, ...]
    throughput_c2: float  # after / before, paired by round
    throughput_c2_rounds: tuple[float, ...]


@dataclass
class Results:
    date: str
    command: str
    machine: dict[str, Any]
    versions: dict[str, str]
    config: dict[str, Any]
    targets_apply: bool
    export: str
    levels: list[Level]
    stages: dict[int, list[StageRow]]
    streaming: Level | None = None
    baselines: dict[str, Timing] = field(default_factory=dict)
    ratios: dict[str, Ratio] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    agreement: dict[str, tuple[float, float]] = field(default_factory=dict)
    preview: PreviewCost | None = None
    loads: RoundLoads = field(default_factory=RoundLoads)
    ablation: list[AblationResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def evaluate_targets(self) -> None:
        """The goals, met or not; a goal with a missing measurement is left out."""
        self.targets = []
        for name, ratio in self.ratios.items():
            label, limit = GOALS[name]
            self.targets.append(Target(label, ratio.value, limit, ratio.value <= limit))
        throughput = {level.concurrency: level.throughput_per_s for level in self.levels}
        if 1 in throughput and 2 in throughput:
            gain = throughput[2] / throughput[1]
            self.targets.append(Target("edits/s at c=2 over c=1", gain, 1.0, gain >= 1.0))
        if self.preview is not None:
            share = self.preview.share
            self.targets.append(
                Target(
                    "latent preview / UNet step",
                    share,
                    PREVIEW_SHARE_MAX,
                    share <= PREVIEW_SHARE_MAX,
                )
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    import psutil

    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    gpus = []
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
        gpus = subprocess.run(query, capture_output=True, text=True).stdout.strip().splitlines()
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpus,
        "os": platform.platform(),
    }


def machine_slug(machine: dict[str, Any]) -> str:
    """A short file-name-safe name: the GPU's, or the CPU's plus its core count."""
    name = machine["gpus"][0].split(",")[0] if machine.get("gpus") else ""
    name = name or f"{machine['cpu']} {machine['logical_cores']}c"
    words = re.sub(r"\(.*?\)|\b(processor|cpu|core|\d+-core|nvidia)\b", " ", name, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", words.lower()).strip("-") or "machine"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "diffusers", "onnxruntime", "tritonclient", "nvidia-pytriton"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


# --------------------------------------------------------------------------- files


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _ms(value: float) -> str:
    return f"{value:,.0f}"


def latency_rows(results: Results) -> list[list[str]]:
    """One edit at a time: median, mean, spread, and Triton's paired ratio to it."""
    rows = []
    one = next((level for level in results.levels if level.concurrency == 1), None)
    if one is not None:
        rows.append(
            [
                LABELS["triton"],
                _ms(one.median_ms),
                _ms(one.mean_ms),
                f"p90 {_ms(one.p90_ms)}, p99 {_ms(one.p99_ms)}",
                "1.000",
            ]
        )
    if results.streaming is not None:
        stream = results.streaming
        rows.append(
            [
                LABELS["streaming"],
                _ms(stream.median_ms),
                _ms(stream.mean_ms),
                f"first event {_ms(stream.first_response_median_ms)}",
                _ratio_cell(results, "streaming"),
            ]
        )
    for name, timing in results.baselines.items():
        rows.append(
            [
                LABELS[name],
                _ms(timing.median_ms),
                _ms(timing.mean_ms),
                f"min {_ms(min(timing.runs_ms))}",
                _ratio_cell(results, name),
            ]
        )
    return rows


def _ratio_cell(results: Results, name: str) -> str:
    ratio = results.ratios.get(name)
    return "" if ratio is None else f"{ratio.value:.3f}"


def markdown(results: Results, plot_name: str | None) -> str:
    config, machine = results.config, results.machine
    lines = [
        f"# {config['pipeline']} on Triton: {config['preset']} preset, "
        f"{config['size']}x{config['size']}, {config['steps']} steps",
        "",
        f"Recorded {results.date} with `{results.command}`; how each figure is measured: "
        "[benchmarks/README.md](../README.md).",
        "",
        *_table(
            ["CPU", "cores", "RAM", "GPU", "OS"],
            [
                [
                    machine["cpu"],
                    f"{machine['logical_cores']} / {machine['physical_cores']}",
                    f"{machine['ram_gib']} GiB",
                    ", ".join(machine["gpus"]) or "none",
                    machine["os"],
                ]
            ],
        ),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results.versions.items()) + ".",
        "",
        "## Configuration",
        "",
        *_table(["setting", "value"], [[k, f"`{v}`"] for k, v in config.items()]),
        "",
        "## Latency of one edit (ms)",
        "",
        "Other processes' share of the machine per round: "
        + (", ".join(f"{x:.0%}" for x in results.loads.kept) or "n/a")
        + ".",
        "",
        *_table(
            ["system", "median", "mean", "spread", "Triton / this, paired"], latency_rows(results)
        ),
        "",
        "## Targets",
        "",
        *(
            []
            if results.targets_apply
            else ["Another configuration than the targets': informative only.", ""]
        ),
        *([f"- {t.line()}" for t in results.targets] or ["- (not measured)"]),
        "",
        "## Throughput and latency against concurrency",
        "",
        *_table(
            ["concurrency", "edits (rounds)", "edits/s", "p50 ms", "p90 ms", "p99 ms", "mean ms"],
            [
                [
                    lv.concurrency,
                    f"{lv.requests} ({lv.rounds})",
                    f"{lv.throughput_per_s:.3f}",
                    _ms(lv.p50_ms),
                    _ms(lv.p90_ms),
                    _ms(lv.p99_ms),
                    _ms(lv.mean_ms),
                ]
                for lv in results.levels
            ],
        ),
    ]
    if plot_name:
        lines += ["", f"![latency and throughput against concurrency]({plot_name})"]
    if results.preview is not None:
        p = results.preview
        lines += [
            "",
            f"Latent preview: {p.preview_ms:.2f} ms, {p.share:.1%} of a UNet step "
            f"({p.unet_step_ms:.0f} ms) in the bare loop.",
        ]
    lines += ["", "## Per stage (Triton statistics API, per edit)"]
    for level, rows in results.stages.items():
        lines += ["", f"Concurrency {level}:", ""]
        lines += _table(
            ["stage", "model", "calls", "executions", "ms / call", "ms / edit", "queued ms"],
            [
                [
                    r.stage,
                    f"`{r.model}`",
                    f"{r.calls_per_edit:.2f}",
                    f"{r.executions_per_edit:.2f}",
                    f"{r.ms_per_call:.1f}",
                    f"{r.ms_per_edit:.1f}",
                    f"{r.queue_ms_per_edit:.1f}",
                ]
                for r in rows
            ],
        )
    if results.agreement:
        lines += ["", "## Same output", ""]
        lines += _table(
            ["pair", "max abs diff (uint8)", "mean abs diff"],
            [[pair, f"{mx:.0f}", f"{mean:.4f}"] for pair, (mx, mean) in results.agreement.items()],
        )
    if results.ablation:
        lines += ["", "## What each optimisation bought (after / before, paired by round)", ""]
        lines += _table(
            ["change", "median c=1", "edits/s c=2", "kept"],
            [
                [
                    a.name,
                    _change(a.median_c1, a.median_c1_rounds),
                    _change(a.throughput_c2, a.throughput_c2_rounds),
                    "yes" if a.kept else "no",
                ]
                for a in results.ablation
            ],
        )
    lines += [""] + [f"{note}\n" for note in results.notes]
    return "\n".join(lines).rstrip() + "\n"


def _change(ratio: float, rounds: Sequence[float]) -> str:
    return f"{(ratio - 1) * 100:+.1f}% (" + ", ".join(f"{(r - 1) * 100:+.1f}" for r in rounds) + ")"


def console_summary(results: Results) -> str:
    """The table printed at the end of a run."""
    lines = [f"{'system':<56} {'median ms':>9} {'mean ms':>9} {'Triton/this':>11}"]
    lines += [f"{r[0]:<56} {r[1]:>9} {r[2]:>9} {r[4]:>11}" for r in latency_rows(results)]
    lines += ["", f"{'concurrency':>11} {'edits/s':>9} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9}"]
    lines += [
        f"{lv.concurrency:>11} {lv.throughput_per_s:>9.3f} {_ms(lv.p50_ms):>9} "
        f"{_ms(lv.p90_ms):>9} {_ms(lv.p99_ms):>9}"
        for lv in results.levels
    ]
    for level, rows in list(results.stages.items())[:1]:
        lines += ["", f"per stage at concurrency {level} (ms per edit):"]
        lines += [
            f"  {r.stage:<30} {r.ms_per_edit:>9.1f}  ({r.calls_per_edit:.0f} calls)" for r in rows
        ]
    for a in results.ablation:
        lines.append(
            f"  {a.name}: median c=1 {_change(a.median_c1, a.median_c1_rounds)}; "
            f"edits/s c=2 {_change(a.throughput_c2, a.throughput_c2_rounds)}"
        )
    return "\n".join([*lines, "", *(t.line() for t in results.targets)])


def plot(results: Results, path: Path) -> Path:
    """Latency percentiles and throughput against concurrency, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = results.levels
    concurrency = [lv.concurrency for lv in levels]
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("p50_ms", "p90_ms", "p99_ms"):
        latency.plot(
            concurrency,
            [getattr(lv, key) / 1000 for lv in levels],
            marker="o",
            label=key.removesuffix("_ms"),
        )
    for name, timing in results.baselines.items():
        latency.axhline(
            timing.median_ms / 1000, linestyle="--", linewidth=1, label=f"{name} median"
        )
    latency.set(xlabel="concurrency", ylabel="latency (s)", title="Triton latency", ylim=(0, None))
    latency.set_xticks(concurrency)
    latency.legend()
    throughput.plot(concurrency, [lv.throughput_per_s for lv in levels], marker="o")
    throughput.set(xlabel="concurrency", ylabel="edits / s", title="Triton throughput")
    throughput.set_xticks(concurrency)
    throughput.set_ylim(bottom=0)
    figure.suptitle(
        f"{results.config['pipeline']} {results.config['preset']}, {results.machine['cpu']}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write(results: Results, output_dir: Path, stem: str) -> dict[str, Path]:
    """<stem>.json, <stem>.png and <stem>.md (which shows the plot) in `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: output_dir / f"{stem}.{kind}" for kind in ("json", "png", "md")}
    paths["json"].write_text(results.to_json())
    plot(results, paths["png"])
    paths["md"].write_text(markdown(results, paths["png"].name))
    return paths
