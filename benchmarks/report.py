"""Results: the machine, the targets, and the .json / .md / .png files of a run."""

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pix2pix_client.contract import INSTRUCT_PIX2PIX

RESULTS_DIR = Path(__file__).parent / "results"

# The goals on CPU: small preset, 256x256, 20 steps, InstructPix2Pix, guidance on.
TRITON_OVER_DIFFUSERS_MAX = 0.67
TRITON_OVER_BARE_MAX = 1.05


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    result = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    )
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def machine_info() -> dict[str, Any]:
    import psutil

    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": _gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def machine_slug(machine: dict[str, Any]) -> str:
    """A short file-name-safe name: the GPU's, or the CPU's plus its core count."""
    if machine.get("gpus"):
        name = machine["gpus"][0].split(",")[0]
    else:
        name = f"{machine['cpu']} {machine['logical_cores']}c"
    words = re.sub(r"\(.*?\)|\b(processor|cpu|core|\d+-core|nvidia)\b", " ", name, flags=re.I)
    slug = re.sub(r"[^a-z0-9]+", "-", words.lower()).strip("-")
    return slug or "machine"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in (
        "torch",
        "diffusers",
        "transformers",
        "onnxruntime",
        "tritonclient",
        "nvidia-pytriton",
    ):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    name: str
    value: float
    limit: float
    met: bool
    detail: str

    def line(self) -> str:
        verdict = "met" if self.met else "falls short"
        return f"{self.name}: {self.detail} -> {verdict}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def targets_apply(config: dict[str, Any]) -> bool:
    """Whether a run has the configuration the CPU targets are defined for."""
    guided = config["guidance_scale"] > 1.0 and config["image_guidance_scale"] >= 1.0
    return (
        config["preset"] == "small"
        and config["size"] == 256
        and config["steps"] == 20
        and config["pipeline"] == INSTRUCT_PIX2PIX
        and guided
    )


def geometric_mean_ratio(per_round: Sequence[float]) -> dict[str, Any]:
    """One ratio from per-round ratios: their geometric mean, with the rounds kept."""
    if not per_round:
        raise ValueError("no round to pair")
    return {
        "value": round(math.exp(statistics.fmean(math.log(r) for r in per_round)), 4),
        "per_round": [round(r, 4) for r in per_round],
    }


def paired_ratio(
    triton_rounds: Sequence[Sequence[float]], baseline_rounds: Sequence[Sequence[float]]
) -> dict[str, Any]:
    """Triton's latency over a baseline's, compared round by round.

    The rounds interleave the systems, so within one round they ran at the same speed of
    the machine; across rounds that speed drifts by several percent. So the estimate is the
    geometric mean of the per-round ratios of medians, not a ratio of pooled percentiles.
    """
    pairs = [(t, b) for t, b in zip(triton_rounds, baseline_rounds, strict=True) if t and b]
    if not pairs:
        raise ValueError("no round measured both systems")
    per_round = [statistics.median(t) / statistics.median(b) for t, b in pairs]
    return {
        **geometric_mean_ratio(per_round),
        "triton_median_ms": round(statistics.median([x for t, _ in pairs for x in t]), 1),
        "baseline_median_ms": round(statistics.median([x for _, b in pairs for x in b]), 1),
    }


def _ratio_detail(ratio: dict[str, Any], limit: float) -> str:
    rounds = ", ".join(f"{r:.3f}" for r in ratio["per_round"])
    return (
        f"{ratio['value']:.3f}, geometric mean of {len(ratio['per_round'])} rounds ({rounds}); "
        f"medians {ratio['triton_median_ms']:.0f} ms / {ratio['baseline_median_ms']:.0f} ms "
        f"(limit {limit})"
    )


def evaluate_targets(
    ratios: dict[str, dict[str, Any]], throughput: dict[int, float]
) -> list[Target]:
    """The three goals, each met or not; a goal with a missing measurement is left out.

    `ratios` holds `paired_ratio` results under the baselines' names.
    """
    targets = []
    for name, label, limit in (
        (
            "diffusers_eager",
            "Triton end to end <= 0.67 x diffusers eager",
            TRITON_OVER_DIFFUSERS_MAX,
        ),
        ("bare_onnxruntime", "Triton <= 1.05 x bare onnxruntime loop", TRITON_OVER_BARE_MAX),
    ):
        ratio = ratios.get(name)
        if ratio:
            targets.append(
                Target(
                    label,
                    ratio["value"],
                    limit,
                    ratio["value"] <= limit,
                    _ratio_detail(ratio, limit),
                )
            )
    if 1 in throughput and 2 in throughput:
        one, two = throughput[1], throughput[2]
        targets.append(
            Target(
                "throughput at concurrency 2 >= at concurrency 1",
                two / one,
                1.0,
                two >= one,
                f"{two:.3f} vs {one:.3f} edits/s = {two / one:.3f}x",
            )
        )
    return targets


# --------------------------------------------------------------------------- files


def result_stem(date: str, machine: dict[str, Any]) -> str:
    return f"{date}-{machine_slug(machine)}"


def write_json(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def plot(results: dict[str, Any], path: Path) -> Path:
    """Latency percentiles and throughput against concurrency, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = results["triton"]["levels"]
    concurrency = [level["concurrency"] for level in levels]
    figure, (latency_axes, throughput_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99")):
        latency_axes.plot(concurrency, [lv[key] / 1000 for lv in levels], marker="o", label=label)
    for name, label, colour in (
        ("diffusers_eager", "diffusers eager median", "tab:red"),
        ("bare_onnxruntime", "bare ORT loop median", "tab:grey"),
    ):
        baseline = results["baselines"].get(name)
        if baseline:
            latency_axes.axhline(
                baseline["p50_ms"] / 1000, color=colour, linestyle="--", linewidth=1, label=label
            )
    latency_axes.set(xlabel="concurrency", ylabel="latency (s)", title="Triton latency")
    latency_axes.set_ylim(bottom=0)
    latency_axes.set_xticks(concurrency)
    latency_axes.legend()
    throughput_axes.plot(concurrency, [lv["throughput_per_s"] for lv in levels], marker="o")
    throughput_axes.set(xlabel="concurrency", ylabel="edits / s", title="Triton throughput")
    throughput_axes.set_xticks(concurrency)
    throughput_axes.set_ylim(bottom=0)
    config = results["config"]
    figure.suptitle(
        f"{config['pipeline']} {config['preset']} {config['size']}x{config['size']}, "
        f"{config['steps']} steps, {config['flavour']} - {results['machine']['cpu']}",
        fontsize=9,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"


def latency_rows(results: dict[str, Any]) -> list[list[Any]]:
    """Systems at one edit at a time: median, mean, spread, and Triton's paired ratio."""
    rows = []
    triton = results["triton"]
    one = next((lv for lv in triton["levels"] if lv["concurrency"] == 1), None)
    if one:
        rows.append(
            [
                "Triton (perf_analyzer, gRPC, c=1)",
                _ms(one["median_ms"]),
                _ms(one["mean_ms"]),
                f"p90 {_ms(one['p90_ms'])}, p99 {_ms(one['p99_ms'])}",
                "1.000",
            ]
        )
    for name, label in (
        ("bare_onnxruntime", "bare onnxruntime loop (same ONNX, same sampler)"),
        ("diffusers_eager", "diffusers eager PyTorch"),
    ):
        baseline = results["baselines"].get(name)
        if baseline:
            ratio = results.get("ratios", {}).get(name)
            rows.append(
                [
                    label,
                    _ms(baseline["p50_ms"]),
                    _ms(baseline["mean_ms"]),
                    f"min {_ms(baseline['min_ms'])}",
                    "" if ratio is None else f"{ratio['value']:.3f}",
                ]
            )
    return rows


def markdown(results: dict[str, Any], plot_name: str | None) -> str:
    config, machine = results["config"], results["machine"]
    lines = [
        f"# {config['pipeline']} on Triton: {config['preset']} preset, "
        f"{config['size']}x{config['size']}, {config['steps']} steps",
        "",
        f"Recorded {results['date']} with `{results['command']}`.",
        "",
        "## Machine",
        "",
        *_table(
            ["CPU", "cores (logical / physical)", "RAM", "GPU", "OS"],
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
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".",
        "",
        "## Configuration",
        "",
        *_table(
            ["setting", "value"],
            [[key, f"`{value}`"] for key, value in config.items() if key != "extra"],
        ),
        "",
        f"Request: {results['request_description']}",
        "",
        "## Latency of one edit (ms)",
        "",
        "Other processes' share of the machine per round: "
        + (", ".join(f"{x:.0%}" for x in results["triton"].get("foreign_load", [])) or "n/a")
        + ".",
        "",
        *_table(
            ["system", "median", "mean", "spread", "Triton / this (paired by round)"],
            latency_rows(results),
        ),
        "",
        results["latency_note"],
        "",
        "## Targets",
        "",
    ]
    if not results["targets_apply"]:
        lines += [
            "The targets are defined for the small preset, 256x256, 20 steps, InstructPix2Pix "
            "with guidance on; this run has another configuration, so they are informative only.",
            "",
        ]
    lines += [f"- {Target(**t).line()}" for t in results["targets"]] or ["- (not measured)"]
    lines += ["", "## Throughput and latency against concurrency", ""]
    lines += _table(
        ["concurrency", "edits (rounds)", "edits/s", "p50 ms", "p90 ms", "p99 ms", "mean ms"],
        [
            [
                lv["concurrency"],
                f"{lv['requests']} ({lv['rounds']})",
                f"{lv['throughput_per_s']:.3f}",
                _ms(lv["p50_ms"]),
                _ms(lv["p90_ms"]),
                _ms(lv["p99_ms"]),
                _ms(lv["mean_ms"]),
            ]
            for lv in results["triton"]["levels"]
        ],
    )
    if plot_name:
        lines += ["", f"![latency and throughput against concurrency]({plot_name})"]
    lines += ["", "## Per stage (Triton statistics API, per edit)", ""]
    for level, rows in results["triton"]["stages"].items():
        lines += [f"Concurrency {level}:", ""]
        lines += _table(
            [
                "stage",
                "model",
                "calls / edit",
                "executions / edit",
                "ms / call",
                "ms / edit",
                "queued ms / edit",
            ],
            [
                [
                    r["stage"],
                    f"`{r['model']}`",
                    f"{r['calls_per_edit']:.2f}",
                    f"{r.get('executions_per_edit', 0.0):.2f}",
                    f"{r['ms_per_call']:.1f}",
                    f"{r['ms_per_edit']:.1f}",
                    f"{r['queue_ms_per_edit']:.1f}",
                ]
                for r in rows
            ],
        )
        lines.append("")
    lines += [results["stages_note"], ""]
    agreement = results.get("agreement") or {}
    if agreement:
        lines += ["## Same output", ""]
        lines += _table(
            ["pair", "max abs diff (uint8)", "mean abs diff"],
            [
                [pair, f"{d['max_abs']:.0f}", f"{d['mean_abs']:.4f}"]
                for pair, d in agreement.items()
            ],
        )
        lines.append("")
    if results.get("optimisations"):
        lines += [
            "## What each optimisation bought",
            "",
            "Each change against the configuration before it: both servers up at once, "
            "perf_analyzer alternating between them in the same rounds (Triton, gRPC).",
            "",
        ]
        lines += _table(
            [
                "change",
                "what",
                "median c=1, paired",
                "edits/s c=2, paired",
                "p50 c=1 ms, pooled",
                "edits/s c=2, pooled",
                "kept",
            ],
            [optimisation_row(o) for o in results["optimisations"]],
        )
        lines += [
            "",
            "Paired: the geometric mean over rounds of after/before within each round (each "
            "round's value in brackets), as for the latency ratios above; pooled: all rounds' "
            "requests together.",
        ]
        lines.append("")
    for note in results.get("notes", []):
        lines += [note, ""]
    return "\n".join(lines).rstrip() + "\n"


def _before_after(before: float, after: float, digits: int, lower_is_better: bool) -> str:
    change = (after / before - 1) * 100
    better = change < 0 if lower_is_better else change > 0
    sign = "+" if change >= 0 else ""
    verdict = "better" if better else "worse"
    return f"{before:,.{digits}f} -> {after:,.{digits}f} ({sign}{change:.1f}%, {verdict})"


def _paired_change(ratio: dict[str, Any] | None, lower_is_better: bool) -> str:
    if ratio is None:  # results written before the ablation paired its rounds
        return "-"
    change = (ratio["value"] - 1) * 100
    better = change < 0 if lower_is_better else change > 0
    rounds = ", ".join(f"{(r - 1) * 100:+.1f}" for r in ratio["per_round"])
    return f"{change:+.1f}% ({rounds}), {'better' if better else 'worse'}"


def optimisation_row(o: dict[str, Any]) -> list[str]:
    """One ablation step: the paired change, then before -> after of the pooled figures."""
    paired = o.get("paired", {})
    return [
        o["name"],
        o["change"],
        _paired_change(paired.get("median_ms_c1"), lower_is_better=True),
        _paired_change(paired.get("throughput_c2"), lower_is_better=False),
        _before_after(o["before_c1"]["p50_ms"], o["after_c1"]["p50_ms"], 0, True),
        _before_after(
            o["before_c2"]["throughput_per_s"], o["after_c2"]["throughput_per_s"], 3, False
        ),
        "yes" if o["kept"] else "no",
    ]


def write_markdown(results: dict[str, Any], path: Path, plot_name: str | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(results, plot_name))
    return path


def console_summary(results: dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    header = f"{'system':<52} {'median ms':>9} {'mean ms':>9}  {'Triton/this':>11}"
    lines = [header, "-" * len(header)]
    for row in latency_rows(results):
        lines.append(f"{row[0]:<52} {row[1]:>9} {row[2]:>9}  {row[4]:>11}")
    lines += ["", f"{'concurrency':>11} {'edits/s':>9} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9}"]
    for lv in results["triton"]["levels"]:
        lines.append(
            f"{lv['concurrency']:>11} {lv['throughput_per_s']:>9.3f} {_ms(lv['p50_ms']):>9} "
            f"{_ms(lv['p90_ms']):>9} {_ms(lv['p99_ms']):>9}"
        )
    first_level = next(iter(results["triton"]["stages"]), None)
    if first_level is not None:
        lines += ["", f"per stage at concurrency {first_level} (ms per edit):"]
        for r in results["triton"]["stages"][first_level]:
            lines.append(
                f"  {r['stage']:<26} {r['ms_per_edit']:>9.1f}  ({r['calls_per_edit']:.0f} calls)"
            )
    if results.get("optimisations"):
        lines += ["", "optimisations (Triton, after against before, paired by round):"]
        for o in results["optimisations"]:
            row = optimisation_row(o)
            lines.append(f"  {row[0]}: median c=1 {row[2]}; edits/s c=2 {row[3]}")
    lines.append("")
    if not results["targets_apply"]:
        lines.append(
            "(targets are defined for small/256/20 steps/pix2pix guided: informative only)"
        )
    lines += [Target(**t).line() for t in results["targets"]]
    return "\n".join(lines)
