"""What each serving optimisation bought: each change against the configuration before it
(the onnxruntime flavours' steps, or the openvino flavours' own).

For every step both servers are up at once and perf_analyzer alternates between them
round after round (concurrency 1 and 2), so drift hits both alike; the change is the
geometric mean over rounds of after/before within each. What each step changes, and why,
is in benchmarks/README.md ("The ablation").
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.perf_analyzer import PerfAnalyzer, Profiled
from benchmarks.results import AblationResult, geometric_mean
from benchmarks.rounds import RoundLoads, undisturbed_rounds
from benchmarks.serving import build, serving, warm_up
from benchmarks.settings import BenchConfig
from model_repository.chain import BuiltModel
from model_repository.configs import OPENVINO_FLAVOURS

# (name, serving options before, after, kept): each step starts where the last ended.
PLAIN = {"onnxruntime_fusions": False, "cpu_rate_limit": False, "unet_split_threads": False}
STEPS: tuple[tuple[str, dict[str, Any], dict[str, Any], bool], ...] = (
    ("onnxruntime fusions", PLAIN, {**PLAIN, "onnxruntime_fusions": True}, True),
    (
        "rate limiter",
        {**PLAIN, "onnxruntime_fusions": True},
        {**PLAIN, "onnxruntime_fusions": True, "cpu_rate_limit": True},
        True,
    ),
    (
        "UNet side by side",
        {"onnxruntime_fusions": True, "cpu_rate_limit": True, "unet_split_threads": False},
        {"onnxruntime_fusions": True, "cpu_rate_limit": True, "unet_split_threads": True},
        False,
    ),
    ("no spinning", {"allow_spinning": True}, {"allow_spinning": False}, False),
)
# The openvino flavours' settings, each against the run's own configuration.
OPENVINO_STEPS: tuple[tuple[str, dict[str, Any], dict[str, Any], bool], ...] = (
    ("bf16", {"precision": "fp32"}, {"precision": "bf16"}, True),
    ("rate limiter", {"cpu_rate_limit": False}, {"cpu_rate_limit": True}, True),
    ("two OpenVINO streams", {"openvino_streams": 1}, {"openvino_streams": 2}, False),
)


def _variant(config: BenchConfig, changes: dict[str, Any]) -> BenchConfig:
    return dataclasses.replace(config, options=dataclasses.replace(config.options, **changes))


def measure_ablation(
    config: BenchConfig,
    build_dir: Path,
    perf: PerfAnalyzer,
    data_file: Path,
    image: bytes,
    rounds: int,
    log: Callable[[str], None],
) -> list[AblationResult]:
    results = []
    steps = OPENVINO_STEPS if config.options.flavour in OPENVINO_FLAVOURS else STEPS
    for index, (name, before, after, kept) in enumerate(steps, start=1):
        log(f"ablation {index}: {name}")
        sides = {"before": _variant(config, before), "after": _variant(config, after)}
        built = {side: build(c, build_dir, f"ablation-{index}-{side}") for side, c in sides.items()}
        with contextlib.ExitStack() as stack:
            urls = {
                side: stack.enter_context(serving(b.repository, None)) for side, b in built.items()
            }
            for side, url in urls.items():
                warm_up(url, sides[side], image, built[side].repository)

            def one_round(
                attempt: int, urls: dict[str, str] = urls, built: dict[str, BuiltModel] = built
            ) -> dict[tuple[str, int], Profiled]:
                measured = {}
                for concurrency in (1, 2):
                    for side, url in urls.items():
                        measured[(side, concurrency)] = perf.run(
                            config.pipeline,
                            url,
                            data_file,
                            concurrency,
                            config.requests_per_round * concurrency,
                            built[side].repository.parent,
                            tag=f"_a{attempt}",
                        )
                return measured

            kept_rounds = undisturbed_rounds(rounds, one_round, RoundLoads(), log)
        result = paired_change(name, kept, kept_rounds)
        log(f"  median c=1 x{result.median_c1:.3f}; edits/s c=2 x{result.throughput_c2:.3f}")
        results.append(result)
    return results


def paired_change(
    name: str, kept: bool, rounds: list[dict[tuple[str, int], Profiled]]
) -> AblationResult:
    """After against before within each round: the c=1 median and the c=2 throughput."""
    latency = [
        statistics.median(r[("after", 1)].latencies_ms)
        / statistics.median(r[("before", 1)].latencies_ms)
        for r in rounds
    ]
    throughput = [
        r[("after", 2)].throughput_per_s / r[("before", 2)].throughput_per_s for r in rounds
    ]
    return AblationResult(
        name=name,
        kept=kept,
        median_c1=geometric_mean(latency),
        median_c1_rounds=tuple(round(x, 4) for x in latency),
        throughput_c2=geometric_mean(throughput),
        throughput_c2_rounds=tuple(round(x, 4) for x in throughput),
    )
