"""perf_analyzer: finding (or installing) it, its input data, running a level, its results.

The `tritonclient==2.51.0` manylinux wheel ships `bin/perf_analyzer` (newer versions are
pure Python wheels without it). It links `libb64.so.0d` and `libcudart.so.12`; the
`nvidia-pytriton` wheel bundles both under hashed names in `nvidia_pytriton.libs/`, so a
folder of symlinks with the expected sonames goes on perf_analyzer's LD_LIBRARY_PATH.
"""

from __future__ import annotations

import base64
import json
import os
import re
import statistics
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.settings import admin_key
from pix2pix_client.contract import ADMIN_GRPC_HEADER, PARAMETERS_BY_NAME

TRITONCLIENT_PIN = "tritonclient==2.51.0"
# soname perf_analyzer links -> the start of the bundled file's hashed name
NEEDED_LIBRARIES = {"libb64.so.0d": "libb64-", "libcudart.so.12": "libcudart-"}


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer is missing, cannot start, or failed a measurement."""


# --------------------------------------------------------------------------- install


def binary_path() -> Path:
    """Where pip puts perf_analyzer: the virtualenv's bin/, beside this interpreter."""
    return Path(sys.executable).parent / "perf_analyzer"


def ensure_binary() -> Path:
    """perf_analyzer as the pinned tritonclient wheel installs it (`make setup`)."""
    path = binary_path()
    if not path.is_file():
        raise PerfAnalyzerError(
            f"no perf_analyzer at {path}: `make setup` installs {TRITONCLIENT_PIN}, whose "
            "manylinux x86_64/aarch64 wheels ship it"
        )
    return path


def _bundled_libraries() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))).parent / "nvidia_pytriton.libs"
    return folder if folder.is_dir() else None


def library_folder(target: Path) -> Path:
    """A folder of symlinks named as perf_analyzer's missing sonames expect.

    Takes the copies bundled with nvidia-pytriton; with none there, the system's own
    (Debian: `apt-get install libb64-0d`, CUDA runtime) have to be on the loader path.
    """
    target.mkdir(parents=True, exist_ok=True)
    bundled = _bundled_libraries()
    for soname, prefix in NEEDED_LIBRARIES.items():
        link = target / soname
        if link.is_symlink() and link.exists():
            continue
        candidates = sorted(bundled.glob(f"{prefix}*")) if bundled else []
        if candidates:
            link.unlink(missing_ok=True)
            link.symlink_to(candidates[0].resolve())
    return target


def environment(libraries: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(
        p for p in (str(libraries), env.get("LD_LIBRARY_PATH", "")) if p
    )
    return env


def check_runs(binary: Path, libraries: Path) -> str:
    """perf_analyzer's version line; raises with the loader's complaint when it cannot start."""
    result = subprocess.run(
        [str(binary), "--version"], env=environment(libraries), capture_output=True, text=True
    )
    if result.returncode != 0:
        raise PerfAnalyzerError(
            f"{binary} does not start (libraries in {libraries}):\n{result.stderr.strip()}"
        )
    return (result.stdout.strip() or result.stderr.strip()).splitlines()[0]


# --------------------------------------------------------------------------- input data


def bytes_element(data: bytes) -> str:
    """One BYTES element as perf_analyzer wants it in base64: 4-byte length, then the bytes."""
    return base64.b64encode(struct.pack("<I", len(data)) + data).decode("ascii")


def input_data(image: bytes, request: dict[str, Any]) -> dict[str, Any]:
    """perf_analyzer `--input-data` JSON: one request, every contract input of shape [1]."""
    entry: dict[str, Any] = {
        "image": {"content": {"b64": bytes_element(image)}, "shape": [1]},
    }
    for name, value in request.items():
        wire = PARAMETERS_BY_NAME[name].wire_type
        entry[name] = {"content": [value], "shape": [1]}
        if wire == "BYTES" and not isinstance(value, str):
            raise TypeError(f"{name}: text expected, got {type(value).__name__}")
    return {"data": [entry]}


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Profiled:
    """One level's requests from `--profile-export-file`: when each was sent, when its
    first response came (a stream's first progress event) and its last (ns)."""

    concurrency: int
    starts_ns: tuple[int, ...]
    firsts_ns: tuple[int, ...]
    ends_ns: tuple[int, ...]

    @property
    def latencies_ms(self) -> list[float]:
        return [(e - s) / 1e6 for s, e in zip(self.starts_ns, self.ends_ns, strict=True)]

    @property
    def first_response_ms(self) -> list[float]:
        return [(f - s) / 1e6 for s, f in zip(self.starts_ns, self.firsts_ns, strict=True)]

    @property
    def span_s(self) -> float:
        return (max(self.ends_ns) - min(self.starts_ns)) / 1e9

    @property
    def throughput_per_s(self) -> float:
        """Completed requests over the span from the first send to the last response."""
        return len(self.starts_ns) / self.span_s


def parse_profile_export(text: str) -> list[Profiled]:
    """perf_analyzer's profile export (2.51 layout: experiments -> requests -> timestamps)."""
    levels = []
    for experiment in json.loads(text)["experiments"]:
        if experiment["experiment"]["mode"] != "concurrency":
            continue
        requests = [r for r in experiment["requests"] if r.get("response_timestamps")]
        levels.append(
            Profiled(
                concurrency=int(experiment["experiment"]["value"]),
                starts_ns=tuple(int(r["timestamp"]) for r in requests),
                firsts_ns=tuple(int(r["response_timestamps"][0]) for r in requests),
                ends_ns=tuple(int(r["response_timestamps"][-1]) for r in requests),
            )
        )
    return levels


def read_profile_export(path: Path) -> list[Profiled]:
    # Outputs are stored as text, so the PNG bytes in them are not valid UTF-8.
    return parse_profile_export(path.read_bytes().decode("utf-8", errors="replace"))


def percentile(values: list[float], q: float) -> float:
    """perf_analyzer's percentile: the sorted value at index int(n * q / 100)."""
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * q / 100), len(ordered) - 1)]


@dataclass(frozen=True)
class Level:
    """One concurrency level over one or more rounds (latencies in ms).

    Percentiles and the mean come from every request's latency in the profile exports,
    pooled over the rounds, computed as perf_analyzer computes them; throughput is the
    requests over the summed spans from each round's first send to its last response.
    """

    concurrency: int
    requests: int
    rounds: int
    throughput_per_s: float
    mean_ms: float
    median_ms: float  # the middle of the pooled latencies (interpolated), as for baselines
    p50_ms: float
    p90_ms: float
    p99_ms: float
    first_response_median_ms: float
    latencies_ms: tuple[float, ...]

    @classmethod
    def aggregate(cls, rounds: list[Profiled]) -> Level:
        if not rounds or len({level.concurrency for level in rounds}) != 1:
            raise ValueError("rounds of one concurrency level expected")
        latencies = [x for level in rounds for x in level.latencies_ms]
        return cls(
            concurrency=rounds[0].concurrency,
            requests=len(latencies),
            rounds=len(rounds),
            throughput_per_s=len(latencies) / sum(level.span_s for level in rounds),
            mean_ms=statistics.fmean(latencies),
            median_ms=statistics.median(latencies),
            p50_ms=percentile(latencies, 50),
            p90_ms=percentile(latencies, 90),
            p99_ms=percentile(latencies, 99),
            first_response_median_ms=statistics.median(
                x for level in rounds for x in level.first_response_ms
            ),
            latencies_ms=tuple(round(x, 1) for x in latencies),
        )


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    libraries: Path

    def run(
        self,
        model: str,
        url: str,
        data_file: Path,
        concurrency: int,
        request_count: int,
        workdir: Path,
        *,
        streaming: bool = False,
        tag: str = "",
        timeout_s: float = 3600,
    ) -> Profiled:
        """Measures one concurrency level once; perf_analyzer's files stay in `workdir`."""
        stem = workdir / f"perf_analyzer_{model}_c{concurrency}{tag}"
        profile_file = stem.with_suffix(".profile.json")
        profile_file.unlink(missing_ok=True)
        command = [
            str(self.binary),
            "-m", model,
            "-i", "grpc",
            "-u", url,
            "--input-data", str(data_file),
            "--concurrency-range", f"{concurrency}:{concurrency}",
            # A fixed number of requests per level: an edit takes seconds on CPU, so
            # perf_analyzer's default stability windows would run for many minutes.
            "--request-count", str(request_count),
            "--max-threads", str(max(concurrency, 4)),
            "--profile-export-file", str(profile_file),
            # It reads the model config and statistics, which the server restricts.
            "-H", f"{ADMIN_GRPC_HEADER}:{admin_key()}",
            *(["--streaming"] if streaming else []),
        ]  # fmt: skip
        result = subprocess.run(
            command,
            env=environment(self.libraries),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        output = result.stdout + result.stderr
        stem.with_suffix(".log").write_text(output)
        if result.returncode != 0 or not profile_file.is_file():
            raise PerfAnalyzerError(
                f"perf_analyzer failed on {model} at concurrency {concurrency} "
                f"(exit {result.returncode}):\n" + "\n".join(output.strip().splitlines()[-20:])
            )
        (profiled,) = read_profile_export(profile_file)
        return profiled


def write_input_data(path: Path, image: bytes, request: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(input_data(image, request), indent=1) + "\n")
    return path


def version_number(version_line: str) -> str:
    match = re.search(r"(\d+\.\d+(\.\d+)?)", version_line)
    return match.group(1) if match else version_line
