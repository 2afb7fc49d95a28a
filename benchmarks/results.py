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

from benchmarks.fidelity import Agreement
from benchmarks.perf_analyzer import Level
from benchmarks.rounds import RoundLoads
from benchmarks.server_stats import StageRow
from benchmarks.systems import DEEPCACHE_PREFIX, PreviewCost
from edit_pipeline.openvino_component import cpu_fields, feature_flags

RESULTS_DIR = Path(__file__).parent / "results"
LABELS = {
    "triton": "Triton (perf_analyzer, gRPC, c=1)",
    "streaming": "Triton streaming (previews on), c=1",
    "bare_onnxruntime": "bare onnxruntime loop (same files, same pipeline code)",
    "bare_openvino_fp32": "bare OpenVINO fp32 loop (same files, same pipeline code)",
    "bare_openvino_bf16": "bare OpenVINO bf16 loop (same files, same pipeline code)",
    "diffusers_eager": "diffusers eager PyTorch",
    "diffusers_eager_bf16": "diffusers eager PyTorch, bf16 (torch_dtype=torch.bfloat16)",
}
# The goals (CPU: small preset, 256x256, 20 steps, InstructPix2Pix, guidance on), by the
# precision served and the ratio they bound: its name and its upper limit.
_SERVING_GOALS = {
    "streaming": ("streaming / whole edit, end to end", 1.03),
    "bare_onnxruntime": ("Triton / bare onnxruntime loop", 1.05),
    "bare_openvino_fp32": ("Triton / bare OpenVINO fp32 loop", 1.05),
}
GOALS = {
    "fp32": {"diffusers_eager": ("Triton / diffusers eager", 0.67), **_SERVING_GOALS},
    "bf16": {
        "diffusers_eager": ("Triton bf16 / diffusers eager fp32", 0.40),
        "diffusers_eager_bf16": ("Triton bf16 / diffusers eager bf16", 0.70),
        "bare_openvino_bf16": ("Triton bf16 / bare OpenVINO bf16 loop", 1.05),
        "streaming": _SERVING_GOALS["streaming"],
    },
}
PREVIEW_SHARE_MAX = 0.03
# The speed switches' goals, against diffusers fp32 eager when Triton serves fp32 without
# reused UNet work (the fidelity reference): the fastest served system within
# DEFAULT_QUALITY_DB of it, and each served int8 with reused UNet work (the fast switch).
DEFAULT_QUALITY_DB = 40.0
SPEED_GOALS = {"default quality": 0.30, "fast": 0.15}


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
    agreement: dict[str, Agreement] = field(default_factory=dict)
    # Each system's latency over diffusers fp32 eager's, paired by round ("triton": c=1).
    against_diffusers: dict[str, Ratio] = field(default_factory=dict)
    preview: PreviewCost | None = None
    loads: RoundLoads = field(default_factory=RoundLoads)
    ablation: list[AblationResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def evaluate_targets(self) -> None:
        """The goals, met or not; a goal with a missing measurement is left out."""
        self.targets = []
        goals = GOALS.get(self.config["options"]["precision"], {})
        for name, ratio in self.ratios.items():
            if name in goals:
                label, limit = goals[name]
                self.targets.append(Target(label, ratio.value, limit, ratio.value <= limit))
        throughput = {level.concurrency: level.throughput_per_s for level in self.levels}
        if 1 in throughput and 2 in throughput:
            gain = throughput[2] / throughput[1]
            self.targets.append(Target("edits/s at c=2 over c=1", gain, 1.0, gain >= 1.0))
        if self.preview is not None:
            share, limit = self.preview.share, PREVIEW_SHARE_MAX
            self.targets.append(Target("latent preview / UNet step", share, limit, share <= limit))
        self.targets += self._speed_targets()

    def psnr_db(self, name: str) -> float:
        """A system's PSNR against Triton's edit of the same request (Triton: inf)."""
        agreement = self.agreement.get(f"Triton vs {name}")
        return math.inf if name == "triton" else agreement.psnr_db if agreement else math.nan

    def _speed_targets(self) -> list[Target]:
        reference = (self.config["options"]["precision"], self.config["cache_interval"])
        if reference != ("fp32", 1) or "triton" not in self.against_diffusers:
            return []
        served = {
            name: ratio.value
            for name, ratio in self.against_diffusers.items()
            if name == "triton" or name.startswith("triton_")
        }
        faithful = [
            value for name, value in served.items() if self.psnr_db(name) >= DEFAULT_QUALITY_DB
        ]
        limit = SPEED_GOALS["default quality"]
        targets = [
            Target(
                f"default quality (fastest served within {DEFAULT_QUALITY_DB:.0f} dB of served "
                "fp32) / diffusers fp32 eager",
                min(faithful),
                limit,
                min(faithful) <= limit,
            )
        ]
        limit = SPEED_GOALS["fast"]
        for name, value in served.items():
            if "int8" in name and "_reuse" in name:
                targets.append(
                    Target(
                        f"fast ({label(name)}) / diffusers fp32 eager", value, limit, value <= limit
                    )
                )
        return targets

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


# --------------------------------------------------------------------------- machine


# What identifies a CPU where its name does not (a virtual machine's "AMD EPYC"): the
# generation, and the features that decide which precision pays (docs/flavours.md).
CPU_ID_FIELDS = ("cpu family", "model", "stepping")
SPEED_FLAGS = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def machine_info() -> dict[str, Any]:
    import psutil

    fields = cpu_fields() or {}
    flags = feature_flags(fields)
    gpus = []
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
        gpus = subprocess.run(query, capture_output=True, text=True).stdout.strip().splitlines()
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "cpu_id": ", ".join(f"{key} {fields[key]}" for key in CPU_ID_FIELDS if key in fields),
        "cpu_features": [flag for flag in SPEED_FLAGS if flag in flags],
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpus,
        "os": platform.platform(),
    }


def cpu_description(machine: dict[str, Any]) -> str:
    """The CPU's name, with its generation and speed features where recorded: "AMD EPYC
    (cpu family 25, model 17, stepping 1; avx2 avx512f avx512_vnni avx512_bf16)"."""
    detail = "; ".join(
        part
        for part in (machine.get("cpu_id", ""), " ".join(machine.get("cpu_features", [])))
        if part
    )
    return f"{machine['cpu']} ({detail})" if detail else machine["cpu"]


def machine_slug(machine: dict[str, Any]) -> str:
    """A short file-name-safe name: the GPU's, or the CPU's plus its core count."""
    name = machine["gpus"][0].split(",")[0] if machine.get("gpus") else ""
    name = name or f"{machine['cpu']} {machine['logical_cores']}c"
    words = re.sub(r"\(.*?\)|\b(processor|cpu|core|\d+-core|nvidia)\b", " ", name, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", words.lower()).strip("-") or "machine"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in (
        "torch",
        "diffusers",
        "onnxruntime",
        "openvino",
        "tritonclient",
        "nvidia-pytriton",
    ):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


# --------------------------------------------------------------------------- files


def _table(header: str, rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table: `header` is its cells joined by " | "."""
    return [f"| {header} |", "|" + "---|" * (header.count("|") + 1)] + [
        "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows
    ]


def _rows(items: Sequence[Any], *cells: str) -> list[list[str]]:
    """Table rows from records: each cell a format string over the record's fields."""
    return [[cell.format(**asdict(item)) for cell in cells] for item in items]


def _ms(value: float) -> str:
    return f"{value:,.0f}"


def label(name: str) -> str:
    """A system's row label; another served configuration is named by flavour and precision."""
    if name in LABELS:
        return LABELS[name]
    if name.startswith(DEEPCACHE_PREFIX):
        interval = name.removeprefix(DEEPCACHE_PREFIX)
        return f"diffusers eager PyTorch with DeepCache's helper, interval {interval}"
    served = name.removeprefix("triton_").replace("_", " ")
    return f"Triton {served} (client library, c=1)"


def latency_rows(results: Results) -> list[list[str]]:
    """One edit at a time: median, mean, spread, and Triton's paired ratio to it."""

    def ratio(name: str) -> str:
        return f"{results.ratios[name].value:.3f}" if name in results.ratios else ""

    rows = [
        [
            LABELS["triton"],
            _ms(lv.median_ms),
            _ms(lv.mean_ms),
            f"p90 {_ms(lv.p90_ms)}, p99 {_ms(lv.p99_ms)}",
            "1.000",
        ]
        for lv in results.levels
        if lv.concurrency == 1
    ]
    if (stream := results.streaming) is not None:
        rows.append(
            [
                LABELS["streaming"],
                _ms(stream.median_ms),
                _ms(stream.mean_ms),
                f"first event {_ms(stream.first_response_median_ms)}",
                ratio("streaming"),
            ]
        )
    rows += [
        [label(name), _ms(t.median_ms), _ms(t.mean_ms), f"min {_ms(min(t.runs_ms))}", ratio(name)]
        for name, t in results.baselines.items()
    ]
    return rows


def _change(ratio: float, rounds: Sequence[float]) -> str:
    return f"{(ratio - 1) * 100:+.1f}% (" + ", ".join(f"{(r - 1) * 100:+.1f}" for r in rounds) + ")"


def _sections(results: Results) -> dict[str, list[str]]:
    """The report's tables, by heading."""
    level = "{concurrency} | {requests} ({rounds}) | {throughput_per_s:.3f} | {p50_ms:,.0f} | "
    level += "{p90_ms:,.0f} | {p99_ms:,.0f} | {mean_ms:,.0f}"
    stage = "{stage} | `{model}` | {calls_per_edit:.2f} | {executions_per_edit:.2f} | "
    stage += "{ms_per_call:.1f} | {ms_per_edit:.1f} | {queue_ms_per_edit:.1f}"
    sections = {
        "Latency of one edit (ms)": _table(
            "system | median | mean | spread | Triton / this, paired", latency_rows(results)
        ),
        "Targets": [f"- {t.line()}" for t in results.targets] or ["- (not measured)"],
    }
    if results.against_diffusers:  # runs without the diffusers baseline have no ratios
        sections["Speed switches: time against diffusers fp32 eager, fidelity to Triton"] = _table(
            "system | time / diffusers fp32 eager, paired (rounds) | PSNR against Triton (dB)",
            [
                [
                    label(name),
                    f"{ratio.value:.3f} ({', '.join(f'{r:.3f}' for r in ratio.per_round)})",
                    f"{results.psnr_db(name):.1f}",
                ]
                for name, ratio in results.against_diffusers.items()
            ],
        )
    sections["Throughput and latency against concurrency"] = _table(
        "concurrency | edits (rounds) | edits/s | p50 ms | p90 ms | p99 ms | mean ms",
        _rows(results.levels, *level.split(" | ")),
    )
    for concurrency, rows in results.stages.items():
        sections[f"Per stage at concurrency {concurrency} (statistics API, per edit)"] = _table(
            "stage | model | calls | executions | ms / call | ms / edit | queued ms",
            _rows(rows, *stage.split(" | ")),
        )
    if results.ablation:
        sections["What each optimisation bought (after / before, paired by round)"] = _table(
            "change | median c=1 | edits/s c=2 | kept",
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
    return sections


def markdown(results: Results, plot_name: str) -> str:
    config, machine = results.config, results.machine
    lines = [
        f"# {config['pipeline']} on Triton ({config['options']['flavour']}, "
        f"{config['options']['precision']}): {config['preset']} preset, "
        f"{config['size']}x{config['size']}, {config['steps']} steps",
        "",
        f"Recorded {results.date} with `{results.command}`; what each figure means and how it "
        "is measured: [benchmarks/README.md](../README.md).",
        "",
        f"Machine: {cpu_description(machine)}, {machine['logical_cores']} logical / "
        f"{machine['physical_cores']} physical cores, {machine['ram_gib']} GiB, GPU "
        f"{', '.join(machine['gpus']) or 'none'}, {machine['os']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in results.versions.items())
        + ". Other processes' share of the machine per round: "
        + (", ".join(f"{x:.0%}" for x in results.loads.kept) or "n/a")
        + ".",
        "",
        *_table("setting | value", [[k, f"`{v}`"] for k, v in config.items()]),
    ]
    notes = [] if results.targets_apply else ["Not the targets' configuration: informative only."]
    if results.preview is not None:
        p = results.preview
        notes.append(
            f"Latent preview: {p.preview_ms:.2f} ms, {p.share:.1%} of a UNet step "
            f"({p.unet_step_ms:.0f} ms) in the bare loop."
        )
    notes += [
        f"Same request, {pair}: max {a.max_difference:.0f}, mean {a.mean_difference:.4f} grey "
        f"levels, PSNR {a.psnr_db:.1f} dB."
        for pair, a in results.agreement.items()
    ]
    for heading, table in _sections(results).items():
        lines += ["", f"## {heading}", "", *table]
    lines += ["", f"![latency and throughput against concurrency]({plot_name})", ""]
    return "\n".join(lines + [f"{note}\n" for note in [*notes, *results.notes]])


def console_summary(results: Results) -> str:
    """What a run prints at its end: the report's tables."""
    lines = []
    for heading, table in _sections(results).items():
        lines += ["", heading, *table]
    return "\n".join(lines)


def plot(results: Results, path: Path) -> Path:
    """Latency percentiles and throughput against concurrency, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = results.levels
    concurrency = [lv.concurrency for lv in levels]
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("p50", "p90", "p99"):
        latency.plot(
            concurrency, [getattr(lv, f"{key}_ms") / 1000 for lv in levels], marker="o", label=key
        )
    for name, timing in results.baselines.items():
        latency.axhline(timing.median_ms / 1000, linestyle="--", label=f"{name} median")
    throughput.plot(concurrency, [lv.throughput_per_s for lv in levels], marker="o")
    latency.set(xlabel="concurrency", ylabel="latency (s)", title="Triton latency")
    throughput.set(xlabel="concurrency", ylabel="edits / s", title="Triton throughput")
    for axes in (latency, throughput):
        axes.set_xticks(concurrency)
        axes.set_ylim(bottom=0)
    latency.legend()
    figure.suptitle(f"{results.config['preset']}, {results.machine['cpu']}", fontsize=9)
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
