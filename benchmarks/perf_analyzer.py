"""perf_analyzer: finding (or installing) it, its input data, running a level, its CSV.

The `tritonclient==2.51.0` manylinux wheel ships `bin/perf_analyzer` (newer versions are
pure Python wheels without it). It links `libb64.so.0d` and `libcudart.so.12`; the
`nvidia-pytriton` wheel bundles both under hashed names in `nvidia_pytriton.libs/`, so a
folder of symlinks with the expected sonames goes on perf_analyzer's LD_LIBRARY_PATH.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import statistics
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.config import admin_key
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
    """perf_analyzer, reinstalling the pinned tritonclient wheel when it is missing."""
    path = binary_path()
    if path.is_file():
        return path
    print(f"perf_analyzer not found at {path}: installing {TRITONCLIENT_PIN} ...", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--force-reinstall",
            "--no-deps",
            "--only-binary",
            ":all:",
            TRITONCLIENT_PIN,
        ],
        check=True,
    )
    if not path.is_file():
        raise PerfAnalyzerError(
            f"{TRITONCLIENT_PIN} installed no perf_analyzer at {path}: only its manylinux "
            "x86_64/aarch64 wheels ship it"
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


def decode_bytes_element(encoded: str) -> bytes:
    """Inverse of `bytes_element`, for checks."""
    raw = base64.b64decode(encoded)
    (length,) = struct.unpack("<I", raw[:4])
    if length != len(raw) - 4:
        raise ValueError(f"length prefix {length} != {len(raw) - 4} bytes that follow")
    return raw[4:]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class CsvLevel:
    """One row of perf_analyzer's `-f` CSV (latencies converted to ms)."""

    concurrency: int
    throughput_per_s: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    server_queue_ms: float
    server_compute_ms: float


def _column(row: dict[str, str], name: str) -> float:
    if name not in row or row[name].strip() == "":
        raise KeyError(f"no {name!r} column in the perf_analyzer CSV: {sorted(row)}")
    return float(row[name])


def parse_csv(text: str) -> list[CsvLevel]:
    """perf_analyzer's `-f` CSV (latencies in microseconds) as one result per row."""
    # Metrics (--collect-metrics) may follow the table after a blank line.
    table = text.strip().split("\n\n")[0]
    results = []
    for row in csv.DictReader(io.StringIO(table)):
        compute = sum(
            _column(row, name)
            for name in ("Server Compute Input", "Server Compute Infer", "Server Compute Output")
        )
        results.append(
            CsvLevel(
                concurrency=int(float(row["Concurrency"])),
                throughput_per_s=_column(row, "Inferences/Second"),
                p50_ms=_column(row, "p50 latency") / 1000,
                p90_ms=_column(row, "p90 latency") / 1000,
                p95_ms=_column(row, "p95 latency") / 1000,
                p99_ms=_column(row, "p99 latency") / 1000,
                server_queue_ms=_column(row, "Server Queue") / 1000,
                server_compute_ms=compute / 1000,
            )
        )
    return results


@dataclass(frozen=True)
class ProfiledLevel:
    """Per-request timestamps of one level from `--profile-export-file` (ns)."""

    concurrency: int
    starts_ns: tuple[int, ...]
    ends_ns: tuple[int, ...]

    @property
    def latencies_ms(self) -> list[float]:
        return [
            (end - start) / 1e6 for start, end in zip(self.starts_ns, self.ends_ns, strict=True)
        ]

    @property
    def span_s(self) -> float:
        return (max(self.ends_ns) - min(self.starts_ns)) / 1e9

    @property
    def throughput_per_s(self) -> float:
        """Completed requests over the span from the first send to the last response."""
        return len(self.starts_ns) / self.span_s


def parse_profile_export(text: str) -> list[ProfiledLevel]:
    """perf_analyzer's profile export (2.51 layout: experiments -> requests -> timestamps)."""
    levels = []
    for experiment in json.loads(text)["experiments"]:
        if experiment["experiment"]["mode"] != "concurrency":
            continue
        requests = [r for r in experiment["requests"] if r.get("response_timestamps")]
        levels.append(
            ProfiledLevel(
                concurrency=int(experiment["experiment"]["value"]),
                starts_ns=tuple(int(r["timestamp"]) for r in requests),
                ends_ns=tuple(int(r["response_timestamps"][-1]) for r in requests),
            )
        )
    return levels


def read_profile_export(path: Path) -> list[ProfiledLevel]:
    # Outputs are stored as text, so the PNG bytes in them are not valid UTF-8.
    return parse_profile_export(path.read_bytes().decode("utf-8", errors="replace"))


def percentile(values: list[float], q: float) -> float:
    """perf_analyzer's percentile: the sorted value at index int(n * q / 100)."""
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * q / 100), len(ordered) - 1)]


@dataclass(frozen=True)
class LevelResult:
    """One concurrency level over one or more rounds of perf_analyzer (latencies in ms).

    Percentiles and the mean come from every request's latency in the profile exports,
    pooled over the rounds, computed as perf_analyzer computes them; throughput is the
    requests over the summed spans from each round's first send to its last response.
    perf_analyzer's own per-round CSV figures are kept in `perf_analyzer_rounds` (its
    throughput divides by a duration rounded to whole seconds: coarse for long requests).
    """

    concurrency: int
    requests: int
    rounds: int
    throughput_per_s: float
    mean_ms: float
    median_ms: float  # the middle of the pooled latencies (interpolated), as for baselines
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    latencies_ms: tuple[float, ...]
    perf_analyzer_rounds: tuple[CsvLevel, ...]

    @classmethod
    def aggregate(cls, rounds: list[tuple[CsvLevel, ProfiledLevel]]) -> LevelResult:
        if not rounds or len({row.concurrency for row, _ in rounds}) != 1:
            raise ValueError("rounds of one concurrency level expected")
        latencies = [x for _, profiled in rounds for x in profiled.latencies_ms]
        span_s = sum(profiled.span_s for _, profiled in rounds)
        return cls(
            concurrency=rounds[0][0].concurrency,
            requests=len(latencies),
            rounds=len(rounds),
            throughput_per_s=len(latencies) / span_s,
            mean_ms=sum(latencies) / len(latencies),
            median_ms=statistics.median(latencies),
            p50_ms=percentile(latencies, 50),
            p90_ms=percentile(latencies, 90),
            p95_ms=percentile(latencies, 95),
            p99_ms=percentile(latencies, 99),
            latencies_ms=tuple(round(x, 1) for x in latencies),
            perf_analyzer_rounds=tuple(row for row, _ in rounds),
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["latencies_ms"] = list(self.latencies_ms)
        data["perf_analyzer_rounds"] = [asdict(row) for row in self.perf_analyzer_rounds]
        return data


# --------------------------------------------------------------------------- running


def admin_header_flags() -> list[str]:
    """perf_analyzer reads the model config and statistics, which the server restricts:
    the admin key goes with every call."""
    return ["-H", f"{ADMIN_GRPC_HEADER}:{admin_key()}"]


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    libraries: Path

    def command(
        self,
        model: str,
        url: str,
        data_file: Path,
        concurrency: int,
        request_count: int,
        csv_file: Path,
        profile_file: Path,
    ) -> list[str]:
        return [
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
            "-f", str(csv_file),
            "--profile-export-file", str(profile_file),
            *admin_header_flags(),
        ]  # fmt: skip

    def run_level(
        self,
        model: str,
        url: str,
        data_file: Path,
        concurrency: int,
        request_count: int,
        workdir: Path,
        timeout_s: float = 3600,
        tag: str = "",
    ) -> tuple[CsvLevel, ProfiledLevel]:
        """Measures one concurrency level once; perf_analyzer's files stay in `workdir`."""
        csv_file = workdir / f"perf_analyzer_c{concurrency}{tag}.csv"
        profile_file = workdir / f"perf_analyzer_c{concurrency}{tag}.profile.json"
        for stale in (csv_file, profile_file):
            stale.unlink(missing_ok=True)
        command = self.command(
            model, url, data_file, concurrency, request_count, csv_file, profile_file
        )
        result = subprocess.run(
            command,
            env=environment(self.libraries),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        output = result.stdout + result.stderr
        (workdir / f"perf_analyzer_c{concurrency}{tag}.log").write_text(output)
        if result.returncode != 0 or not csv_file.is_file() or not profile_file.is_file():
            raise PerfAnalyzerError(
                f"perf_analyzer failed at concurrency {concurrency} (exit {result.returncode}):\n"
                + "\n".join(output.strip().splitlines()[-20:])
            )
        rows = parse_csv(csv_file.read_text())
        profiled = read_profile_export(profile_file)
        if len(rows) != 1 or len(profiled) != 1:
            raise PerfAnalyzerError(f"{csv_file}: expected one level, got {len(rows)}")
        return rows[0], profiled[0]


def write_input_data(path: Path, image: bytes, request: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(input_data(image, request), indent=1) + "\n")
    return path


def version_number(version_line: str) -> str:
    match = re.search(r"(\d+\.\d+(\.\d+)?)", version_line)
    return match.group(1) if match else version_line
