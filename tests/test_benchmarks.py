"""The benchmark harness: its parts on real captures, and one scaled-down run end to end.

No timing is asserted here: the figures of a run are recorded in benchmarks/results/.
The perf_analyzer CSV and profile export, and the statistics, are real captures
(benchmarks/testdata/README.md says from what).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import report
from benchmarks.config import BenchConfig
from benchmarks.perf_analyzer import (
    LevelResult,
    ProfiledLevel,
    decode_bytes_element,
    library_folder,
    parse_csv,
    percentile,
    read_profile_export,
    write_input_data,
)
from benchmarks.photo import photo, photo_png
from benchmarks.run import paired_changes, write_results
from benchmarks.server_stats import (
    ModelCounters,
    combine,
    counters_from_json,
    stage_rows,
    window,
)
from pix2pix_client.contract import IMG2IMG, INSTRUCT_PIX2PIX, PARAMETERS_BY_NAME, parameters_for

TESTDATA = Path(__file__).parent.parent / "benchmarks" / "testdata"


# --------------------------------------------------------------------------- input data


@pytest.mark.parametrize("pipeline", [INSTRUCT_PIX2PIX, IMG2IMG])
def test_input_data_carries_the_photo_and_explicit_parameters(
    pipeline: str, tmp_path: Path
) -> None:
    config = BenchConfig(pipeline=pipeline, size=64, steps=7, scheduler="ddim", seed=99)
    path = write_input_data(tmp_path / "input.json", photo_png(64), config.request())
    data = json.loads(path.read_text())

    assert len(data["data"]) == 1
    entry = data["data"][0]
    allowed = {p.name for p in parameters_for(pipeline)}
    required = {p.name for p in parameters_for(pipeline) if p.required}
    assert required <= set(entry) <= allowed
    for name, tensor in entry.items():
        assert tensor["shape"] == [1], name

    # The image is one BYTES element: a 4-byte length, then a PNG of the photo.
    encoded = decode_bytes_element(entry["image"]["content"]["b64"])
    decoded = Image.open(io.BytesIO(encoded))
    assert decoded.format == "PNG"
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(photo(64)))

    assert entry["prompt"]["content"] == [config.prompt]
    assert entry["num_inference_steps"]["content"] == [7]
    assert entry["seed"]["content"] == [99]
    assert entry["scheduler"]["content"] == ["ddim"]
    assert ("image_guidance_scale" in entry) == (pipeline == INSTRUCT_PIX2PIX)
    for name in entry:
        assert name in PARAMETERS_BY_NAME


def test_bytes_element_length_prefix_is_checked() -> None:
    import base64

    with pytest.raises(ValueError, match="length prefix"):
        decode_bytes_element(base64.b64encode(b"\x05\x00\x00\x00abc").decode())


def test_photo_is_the_astronaut_at_the_requested_size() -> None:
    image = Image.open(io.BytesIO(photo_png(96)))
    assert image.size == (96, 96)
    assert np.asarray(image).std() > 20  # a photograph, not a flat fill


# --------------------------------------------------------------------------- perf_analyzer


def test_csv_of_a_real_run_parses_to_milliseconds() -> None:
    (row,) = parse_csv((TESTDATA / "perf_analyzer_c2.csv").read_text())
    assert row.concurrency == 2
    assert row.throughput_per_s == pytest.approx(0.0784173)
    assert row.p50_ms == pytest.approx(34014.560)
    assert row.p90_ms == pytest.approx(34507.725)
    assert row.p99_ms == pytest.approx(34507.725)
    assert row.server_queue_ms == pytest.approx(0.002)
    assert row.server_compute_ms == pytest.approx((505 + 24731999 + 5124) / 1000)


def test_csv_followed_by_metrics_keeps_only_the_table() -> None:
    text = (TESTDATA / "perf_analyzer_c2.csv").read_text() + "\n\nMetric,Value\ngpu,0\n"
    assert len(parse_csv(text)) == 1


def test_profile_export_of_a_real_run_gives_latencies_and_span_throughput() -> None:
    # The capture's outputs hold PNG bytes that are not valid UTF-8, as perf_analyzer writes.
    with pytest.raises(UnicodeDecodeError):
        (TESTDATA / "perf_analyzer_c2.profile.json").read_bytes().decode("utf-8")
    (level,) = read_profile_export(TESTDATA / "perf_analyzer_c2.profile.json")
    assert level.concurrency == 2
    assert level.latencies_ms == pytest.approx(
        [15941.663, 34507.726, 13929.518, 34014.560], abs=1e-3
    )
    span_s = (1795568947751960391 - 1795568897302538916) / 1e9
    assert level.span_s == pytest.approx(span_s)
    assert level.throughput_per_s == pytest.approx(4 / span_s)


def test_levels_pool_rounds_with_perf_analyzers_percentiles() -> None:
    (row,) = parse_csv((TESTDATA / "perf_analyzer_c2.csv").read_text())
    (level,) = read_profile_export(TESTDATA / "perf_analyzer_c2.profile.json")

    one = LevelResult.aggregate([(row, level)])
    # From the raw latencies, the percentiles come out as perf_analyzer printed them.
    assert (one.p50_ms, one.p90_ms, one.p99_ms) == pytest.approx(
        (row.p50_ms, row.p90_ms, row.p99_ms), abs=1e-3
    )
    assert one.requests == 4 and one.rounds == 1
    assert one.mean_ms == pytest.approx(sum(level.latencies_ms) / 4)
    assert one.throughput_per_s == pytest.approx(level.throughput_per_s)

    two = LevelResult.aggregate([(row, level), (row, level)])
    assert two.requests == 8 and two.rounds == 2
    assert two.throughput_per_s == pytest.approx(level.throughput_per_s)  # 8 over twice the span
    assert two.p50_ms == pytest.approx(34014.560, abs=1e-3)
    data = json.loads(json.dumps(two.to_json()))
    assert data["latencies_ms"][:2] == pytest.approx([15941.7, 34507.7])
    # perf_analyzer's own throughput divides by a duration rounded to whole seconds.
    assert data["perf_analyzer_rounds"][0]["throughput_per_s"] == pytest.approx(0.0784173)
    with pytest.raises(ValueError, match="one concurrency level"):
        LevelResult.aggregate([])


def test_percentile_is_perf_analyzers_index_rule() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [percentile(values, q) for q in (0, 50, 90, 99, 100)] == [1.0, 3.0, 5.0, 5.0, 5.0]


def test_library_folder_links_the_sonames_perf_analyzer_needs(tmp_path: Path) -> None:
    folder = library_folder(tmp_path / "lib")
    for soname in ("libb64.so.0d", "libcudart.so.12"):
        link = folder / soname
        assert link.is_symlink() and link.resolve().is_file(), soname
        assert link.resolve().name != soname  # the bundled copy has a hashed name


# --------------------------------------------------------------------------- statistics


def _raw(snapshot: dict, model: str) -> dict[str, int]:
    """One model's counters read straight off the captured JSON."""
    (stats,) = [m for m in snapshot["model_stats"] if m["name"] == model]
    inference = stats["inference_stats"]
    return {
        "requests": int(inference["success"]["count"]),
        "executions": int(stats["execution_count"]),
        "success_ns": int(inference["success"]["ns"]),
        "queue_ns": int(inference["queue"]["ns"]),
        "compute_input_ns": int(inference["compute_input"]["ns"]),
        "compute_infer_ns": int(inference["compute_infer"]["ns"]),
        "compute_output_ns": int(inference["compute_output"]["ns"]),
    }


def test_statistics_delta_and_stage_table_from_a_real_capture() -> None:
    captured = json.loads((TESTDATA / "inference_statistics.json").read_text())
    delta = window(counters_from_json(captured["before"]), counters_from_json(captured["after"]))

    def raw_delta(model: str) -> dict[str, int]:
        before, after = _raw(captured["before"], model), _raw(captured["after"], model)
        return {key: after[key] - before[key] for key in after}

    # Two edits of 3 steps each happened between the snapshots.
    assert delta["instruct_pix2pix"].requests == 2
    unet = raw_delta("unet_pix2pix")
    assert unet["requests"] == 6
    assert delta["unet_pix2pix"] == ModelCounters(**unet)

    rows = {row.stage: row for row in stage_rows(delta, INSTRUCT_PIX2PIX)}
    assert list(rows) == [
        "text encoder",
        "VAE encoder",
        "UNet x N",
        "VAE decoder",
        "edit model (w/o components)",
        "end to end (server)",
    ]
    unet_row = rows["UNet x N"]
    assert unet_row.calls_per_edit == 3
    assert unet_row.executions_per_edit == 3  # one edit at a time: nothing to merge
    assert unet_row.ms_per_call == pytest.approx(unet["compute_infer_ns"] / 6 / 1e6)
    assert unet_row.ms_per_edit == pytest.approx(unet["compute_infer_ns"] / 2 / 1e6)
    edit = raw_delta("instruct_pix2pix")
    components_ns = sum(
        raw_delta(model)["success_ns"]
        for model in ("text_encoder", "vae_encoder", "unet_pix2pix", "vae_decoder")
    )
    own = rows["edit model (w/o components)"]
    assert own.ms_per_edit == pytest.approx((edit["compute_infer_ns"] - components_ns) / 2 / 1e6)
    end_to_end = rows["end to end (server)"]
    assert end_to_end.ms_per_edit == pytest.approx(edit["success_ns"] / 2 / 1e6)
    # The stages inside the edit take less than the whole.
    inner = sum(r.ms_per_edit for stage, r in rows.items() if stage != "end to end (server)")
    assert inner < end_to_end.ms_per_edit


def test_a_model_first_seen_after_the_window_started_counts_from_zero() -> None:
    after = {"m": ModelCounters(requests=2, compute_infer_ns=10)}
    assert window({}, after)["m"] == after["m"]


def test_windows_of_several_rounds_add_up() -> None:
    first = {"m": ModelCounters(requests=2, compute_infer_ns=10), "n": ModelCounters(requests=1)}
    second = {"m": ModelCounters(requests=3, compute_infer_ns=5)}
    total = combine(first, second)
    assert total["m"] == ModelCounters(requests=5, compute_infer_ns=15)
    assert total["n"] == ModelCounters(requests=1)


def test_stage_table_needs_edits_in_the_window() -> None:
    with pytest.raises(ValueError, match="no instruct_pix2pix requests"):
        stage_rows({"instruct_pix2pix": ModelCounters()}, INSTRUCT_PIX2PIX)


# --------------------------------------------------------------------------- results


def _results() -> dict:
    config = BenchConfig()
    levels = [
        {
            "concurrency": c,
            "requests": 4 * c,
            "rounds": 2,
            "throughput_per_s": t,
            "mean_ms": p,
            "median_ms": p,
            "p50_ms": p,
            "p90_ms": p * 1.1,
            "p95_ms": p * 1.1,
            "p99_ms": p * 1.2,
            "latencies_ms": [p] * 4 * c,
            "perf_analyzer_rounds": [],
        }
        for c, t, p in ((1, 0.2, 5000.0), (2, 0.21, 9500.0), (4, 0.21, 19000.0))
    ]
    captured = json.loads((TESTDATA / "inference_statistics.json").read_text())
    delta = window(counters_from_json(captured["before"]), counters_from_json(captured["after"]))
    stages = [row.to_json() for row in stage_rows(delta, INSTRUCT_PIX2PIX)]
    ratios = {
        "diffusers_eager": report.paired_ratio([[5000.0], [5000.0]], [[8000.0], [8000.0]]),
        "bare_onnxruntime": report.paired_ratio([[5000.0], [5000.0]], [[4900.0], [4900.0]]),
    }
    targets = report.evaluate_targets(ratios, {1: 0.2, 2: 0.21, 4: 0.21})
    return {
        "date": "2026-11-25T01:00:00+00:00",
        "command": "python -m benchmarks.run",
        "machine": {
            "cpu": "AMD EPYC",
            "logical_cores": 2,
            "physical_cores": 2,
            "ram_gib": 23.5,
            "gpus": [],
            "os": "Linux",
            "python": "3.11.7",
        },
        "versions": {"onnxruntime": "1.32.0"},
        "config": config.to_json(),
        "request_description": "the astronaut",
        "triton": {"levels": levels, "stages": {"1": stages}},
        "baselines": {
            "diffusers_eager": {"p50_ms": 8000.0, "mean_ms": 8100.0, "min_ms": 7900.0},
            "bare_onnxruntime": {"p50_ms": 4900.0, "mean_ms": 4950.0, "min_ms": 4800.0},
        },
        "ratios": ratios,
        "targets_apply": report.targets_apply(config.to_json()),
        "targets": [t.to_json() for t in targets],
        "agreement": {"Triton vs bare onnxruntime": {"max_abs": 0.0, "mean_abs": 0.0}},
        "latency_note": "note on latency",
        "stages_note": "note on stages",
        "notes": [],
        "optimisations": [
            _optimisation(
                "fusions",
                "MHA",
                c1=((6000.0, 0.16), (5000.0, 0.2)),
                c2=((12000.0, 0.17), (9500.0, 0.21)),
                paired={
                    "median_ms_c1": {"value": 0.84, "per_round": [0.8, 0.882]},
                    "throughput_c2": {"value": 1.2, "per_round": [1.25, 1.152]},
                },
            ),
            # written before the ablation paired its rounds: no "paired"
            _optimisation(
                "rate limiter",
                "one session at a time",
                c1=((5000.0, 0.2), (5100.0, 0.19)),
                c2=((9500.0, 0.21), (9000.0, 0.22)),
            ),
        ],
    }


Level = tuple[float, float]  # (p50 ms, edits/s)


def _optimisation(
    name: str,
    change: str,
    c1: tuple[Level, Level],
    c2: tuple[Level, Level],
    paired: dict | None = None,
) -> dict:
    """One ablation entry; c1 and c2 hold (before, after) at that concurrency."""
    entry: dict = {"name": name, "change": change, "kept": True}
    for level, pair in (("c1", c1), ("c2", c2)):
        for side, (p50_ms, throughput) in zip(("before", "after"), pair, strict=True):
            entry[f"{side}_{level}"] = {"p50_ms": p50_ms, "throughput_per_s": throughput}
    if paired is not None:
        entry["paired"] = paired
    return entry


def test_ratios_are_paired_by_round() -> None:
    # The machine is 10% slower in the second round: every system is.
    triton = [[5000.0, 5200.0], [5500.0, 5720.0]]
    diffusers = [[8000.0, 8400.0], [8800.0, 9240.0]]
    ratio = report.paired_ratio(triton, diffusers)
    assert ratio["per_round"] == pytest.approx([5100 / 8200, 5610 / 9020], abs=1e-4)
    assert ratio["value"] == pytest.approx(5100 / 8200, abs=1e-4)
    assert ratio["triton_median_ms"] == pytest.approx(5350.0)
    assert ratio["baseline_median_ms"] == pytest.approx(8600.0)
    # A round in which either system has no edit pairs nothing.
    assert report.paired_ratio([[1.0], []], [[2.0], [9.0]])["per_round"] == [0.5]
    with pytest.raises(ValueError, match="no round"):
        report.paired_ratio([[]], [[1.0]])


def test_ablation_changes_are_paired_by_round() -> None:
    # Round 2 ran on a machine 10% slower; within each round "after" is 5% faster at c=1
    # and has 10% more throughput at c=2. Pooled percentiles would mix the two speeds.
    def level(concurrency: int, latencies_ms: list[float], span_s: float) -> tuple:
        starts = [0] * len(latencies_ms)
        ends = [int(ms * 1e6) for ms in latencies_ms]
        ends[-1] = int(span_s * 1e9)  # the level's span: first send to last response
        profiled = ProfiledLevel(concurrency, tuple(starts), tuple(ends))
        return (None, profiled)

    measured = {
        ("before", 1): [level(1, [1000.0, 1000.0, 1000.0], 1.0), level(1, [1100.0] * 3, 1.1)],
        ("after", 1): [level(1, [950.0, 950.0, 950.0], 0.95), level(1, [1045.0] * 3, 1.045)],
        ("before", 2): [level(2, [1.0, 1.0], 2.0), level(2, [1.0, 1.0], 2.2)],
        ("after", 2): [level(2, [1.0, 1.0], 2.0 / 1.1), level(2, [1.0, 1.0], 2.0)],
    }
    paired = paired_changes(measured)
    assert paired["median_ms_c1"]["per_round"] == pytest.approx([0.95, 0.95])
    assert paired["median_ms_c1"]["value"] == pytest.approx(0.95)
    assert paired["throughput_c2"]["per_round"] == pytest.approx([1.1, 1.1], abs=1e-4)


def test_targets_are_met_or_fall_short_with_their_numbers() -> None:
    def ratios(triton: float, diffusers: float, bare: float) -> dict:
        return {
            "diffusers_eager": report.paired_ratio([[triton]], [[diffusers]]),
            "bare_onnxruntime": report.paired_ratio([[triton]], [[bare]]),
        }

    met = report.evaluate_targets(ratios(5000.0, 8000.0, 4900.0), {1: 0.2, 2: 0.21})
    assert [t.met for t in met] == [True, True, True]
    assert met[0].value == pytest.approx(0.625)
    assert "0.625, geometric mean of 1 rounds (0.625); medians 5000 ms / 8000 ms" in met[0].line()
    assert met[0].line().endswith("met")

    short = report.evaluate_targets(ratios(6000.0, 8000.0, 5000.0), {1: 0.2, 2: 0.19})
    assert [t.met for t in short] == [False, False, False]
    assert all(t.line().endswith("falls short") for t in short)
    # A goal whose measurement is missing is left out, not guessed.
    assert report.evaluate_targets({}, {1: 0.2}) == []


def test_targets_apply_only_to_the_cpu_goal_configuration() -> None:
    assert report.targets_apply(BenchConfig().to_json())
    assert not report.targets_apply(BenchConfig(preset="tiny").to_json())
    assert not report.targets_apply(BenchConfig(image_guidance_scale=0.5).to_json())
    assert not report.targets_apply(BenchConfig(steps=10).to_json())


def test_results_are_written_as_json_markdown_and_plot(tmp_path: Path) -> None:
    results = _results()
    paths = write_results(results, tmp_path, "2026-11-25-amd-epyc-2c")
    assert {p.name for p in paths.values()} == {
        "2026-11-25-amd-epyc-2c.json",
        "2026-11-25-amd-epyc-2c.md",
        "2026-11-25-amd-epyc-2c.png",
    }
    assert json.loads(paths["json"].read_text()) == results
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(paths["png"]).size[0] > 500

    text = paths["md"].read_text()
    assert "![latency and throughput against concurrency](2026-11-25-amd-epyc-2c.png)" in text
    assert (
        "| Triton (perf_analyzer, gRPC, c=1) | 5,000 | 5,000 | p90 5,500, p99 6,000 | 1.000 |"
        in text
    )
    assert "| diffusers eager PyTorch | 8,000 | 8,100 | min 7,900 | 0.625 |" in text
    assert "| 2 | 8 (2) | 0.210 | 9,500 |" in text
    assert "Triton end to end <= 0.67 x diffusers eager: 0.625, geometric mean of 2" in text
    assert "| UNet x N | `unet_pix2pix` | 3.00 | 3.00 |" in text
    assert "## What each optimisation bought" in text
    assert (
        "| fusions | MHA | -16.0% (-20.0, -11.8), better | +20.0% (+25.0, +15.2), better "
        "| 6,000 -> 5,000 (-16.7%, better) | 0.170 -> 0.210 (+23.5%, better) | yes |"
    ) in text
    assert (
        "| rate limiter | one session at a time | - | - | 5,000 -> 5,100 (+2.0%, worse) |" in text
    )

    summary = report.console_summary(results)
    assert "fusions: median c=1 -16.0% (-20.0, -11.8), better; edits/s c=2 +20.0%" in summary
    assert "throughput at concurrency 2 >= at concurrency 1" in summary
    assert "UNet x N" in summary


def test_machine_slug_is_a_safe_file_name() -> None:
    machine = {"cpu": "AMD EPYC 7B13 64-Core Processor", "logical_cores": 2, "gpus": []}
    assert report.machine_slug(machine) == "amd-epyc-7b13-2c"
    gpu = {"cpu": "x", "logical_cores": 16, "gpus": ["NVIDIA H100 80GB HBM3, 81559 MiB"]}
    assert report.machine_slug(gpu) == "h100-80gb-hbm3"


def test_configuration_errors_name_the_setting() -> None:
    with pytest.raises(ValueError, match="size=100"):
        BenchConfig(size=100)
    with pytest.raises(ValueError, match="concurrency"):
        BenchConfig(concurrency=(0,))
    with pytest.raises(ValueError, match="tensorrt"):
        BenchConfig(flavour="tensorrt", optimize=True)
    assert not BenchConfig(image_guidance_scale=0.5).guided


# --------------------------------------------------------------------------- end to end


def test_the_harness_runs_end_to_end_on_the_tiny_preset(
    tiny_preset: Path, tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A whole `make bench` run, scaled down: real tritonserver, perf_analyzer, baselines.

    One round of two edits per level keeps it quick; the figures are not asserted, only that
    every part of a run was measured, agrees on the output and lands in the result files.
    """
    from benchmarks.run import main

    build = tmp_path / "build"
    (build / "presets").mkdir(parents=True)
    (build / "presets" / "tiny").symlink_to(tiny_preset)
    (build / "onnx").mkdir()
    (build / "onnx" / "tiny").symlink_to(tiny_export)  # the plain export: --no-optimize
    steps = 3
    argv = ["--preset", "tiny", "--size", "64", "--steps", str(steps), "--no-optimize"]
    # Two edits per level: with one, perf_analyzer 2.51 sometimes exits 99 ("failed to find
    # the requested model version") after a tiny edit.
    argv += ["--concurrency", "1", "2", "--rounds", "1", "--requests", "2"]
    argv += ["--build-dir", str(build), "--output-dir", str(tmp_path / "results")]
    assert main([*argv, "--stem", "tiny"]) == 0

    results = json.loads((tmp_path / "results" / "tiny.json").read_text())
    levels = {level["concurrency"]: level for level in results["triton"]["levels"]}
    assert [levels[1]["requests"], levels[2]["requests"]] == [2, 4]
    assert all(level["p50_ms"] > 0 and level["throughput_per_s"] > 0 for level in levels.values())
    stages = {row["stage"]: row for row in results["triton"]["stages"]["1"]}
    assert stages["UNet x N"]["calls_per_edit"] == steps
    assert stages["end to end (server)"]["calls_per_edit"] == 1
    for name in ("bare_onnxruntime", "diffusers_eager"):
        assert results["baselines"][name]["p50_ms"] > 0, name
    # The same request gives the same picture on all three systems.
    assert set(results["agreement"]) == {
        "Triton vs bare onnxruntime loop",
        "Triton vs diffusers eager",
    }
    assert all(pair["max_abs"] <= 2 for pair in results["agreement"].values())
    assert not results["targets_apply"]
    assert len(results["targets"]) == 3

    markdown = (tmp_path / "results" / "tiny.md").read_text()
    assert "informative only" in markdown and "## Per stage" in markdown
    assert (tmp_path / "results" / "tiny.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "throughput at concurrency 2 >= at concurrency 1" in printed
