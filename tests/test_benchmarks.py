"""The benchmark harness: its parts on real captures, and one scaled-down run end to end.

No timing is asserted here: the figures of a run are recorded in benchmarks/results/.
The perf_analyzer profile export (and its CSV, to check the percentile rule), and the
statistics, are real captures (benchmarks/testdata/README.md says from what).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import results as report
from benchmarks.ablation import paired_change
from benchmarks.fidelity import Agreement
from benchmarks.perf_analyzer import (
    Level,
    Profiled,
    library_folder,
    percentile,
    read_profile_export,
    write_input_data,
)
from benchmarks.photo import photo, photo_png
from benchmarks.server_stats import (
    ModelCounters,
    combine,
    counters_from_json,
    stage_rows,
    window,
)
from benchmarks.settings import BenchConfig
from benchmarks.systems import PreviewCost
from edit_pipeline import openvino_component
from edit_pipeline.openvino_component import bf16_unsupported_reason
from model_repository.configs import RepositoryOptions
from pix2pix_client.contract import IMG2IMG, INSTRUCT_PIX2PIX, PARAMETERS_BY_NAME, parameters_for


def decode_bytes_element(encoded: str) -> bytes:
    """perf_analyzer's base64 BYTES element back to the bytes, its length prefix checked."""
    raw = base64.b64decode(encoded)
    (length,) = struct.unpack("<I", raw[:4])
    if length != len(raw) - 4:
        raise ValueError(f"length prefix {length} != {len(raw) - 4} bytes that follow")
    return raw[4:]


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
    with pytest.raises(ValueError, match="length prefix"):
        decode_bytes_element(base64.b64encode(b"\x05\x00\x00\x00abc").decode())


def test_photo_is_the_astronaut_at_the_requested_size() -> None:
    image = Image.open(io.BytesIO(photo_png(96)))
    assert image.size == (96, 96)
    assert np.asarray(image).std() > 20  # a photograph, not a flat fill


# --------------------------------------------------------------------------- perf_analyzer


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


def _csv_percentiles_ms() -> tuple[float, float, float]:
    """p50, p90, p99 as perf_analyzer itself printed them in the same run's CSV (us)."""
    (row,) = csv.DictReader(io.StringIO((TESTDATA / "perf_analyzer_c2.csv").read_text()))
    return tuple(float(row[f"p{q} latency"]) / 1000 for q in (50, 90, 99))  # type: ignore[return-value]


def test_levels_pool_rounds_with_perf_analyzers_percentiles() -> None:
    (level,) = read_profile_export(TESTDATA / "perf_analyzer_c2.profile.json")

    one = Level.aggregate([level])
    # From the raw latencies, the percentiles come out as perf_analyzer printed them.
    assert (one.p50_ms, one.p90_ms, one.p99_ms) == pytest.approx(_csv_percentiles_ms(), abs=1e-3)
    assert one.requests == 4 and one.rounds == 1
    assert one.mean_ms == pytest.approx(sum(level.latencies_ms) / 4)
    assert one.throughput_per_s == pytest.approx(level.throughput_per_s)

    two = Level.aggregate([level, level])
    assert two.requests == 8 and two.rounds == 2
    assert two.throughput_per_s == pytest.approx(level.throughput_per_s)  # 8 over twice the span
    assert two.p50_ms == pytest.approx(34014.560, abs=1e-3)
    assert list(two.latencies_ms[:2]) == pytest.approx([15941.7, 34507.7])
    with pytest.raises(ValueError, match="one concurrency level"):
        Level.aggregate([])


def test_a_streams_first_response_is_its_first_event() -> None:
    streamed = Profiled(
        1, starts_ns=(0, 10**9), firsts_ns=(10**8, 12 * 10**8), ends_ns=(2 * 10**9, 3 * 10**9)
    )
    assert streamed.first_response_ms == [100.0, 200.0]
    assert streamed.latencies_ms == [2000.0, 2000.0]
    assert Level.aggregate([streamed]).first_response_median_ms == 150.0


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
        "compute_infer_ns": int(inference["compute_infer"]["ns"]),
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


def _level(concurrency: int, throughput: float, p50: float) -> Level:
    latencies = (p50,) * 4 * concurrency
    return Level(
        concurrency,
        len(latencies),
        2,
        throughput,
        p50,
        p50,
        p50,
        p50 * 1.1,
        p50 * 1.2,
        p50 / 10,
        latencies,
    )


def _results() -> report.Results:
    # fp32 in python-onnxruntime whatever this CPU computes: the goals below are fp32's.
    config = BenchConfig(options=RepositoryOptions(flavour="python-onnxruntime", precision="fp32"))
    captured = json.loads((TESTDATA / "inference_statistics.json").read_text())
    delta = window(counters_from_json(captured["before"]), counters_from_json(captured["after"]))
    results = report.Results(
        date="2026-12-01T01:00:00+00:00",
        command="python -m benchmarks.run",
        machine={
            "cpu": "AMD EPYC",
            "logical_cores": 2,
            "physical_cores": 2,
            "ram_gib": 23.5,
            "gpus": [],
            "os": "Linux",
        },
        versions={"onnxruntime": "1.32.0"},
        config=config.to_json(),
        targets_apply=config.targets_apply,
        export="build/onnx/small-fused",
        levels=[_level(1, 0.2, 5000.0), _level(2, 0.21, 9500.0), _level(4, 0.21, 19000.0)],
        stages={1: stage_rows(delta, INSTRUCT_PIX2PIX)},
        streaming=_level(1, 0.2, 5050.0),
        baselines={
            "bare_onnxruntime": report.Timing((4900.0, 4950.0, 4800.0)),
            "diffusers_eager": report.Timing((8000.0, 8100.0, 8200.0)),
        },
        agreement={"Triton vs bare_onnxruntime": Agreement(0.0, 0.0, math.inf)},
        preview=PreviewCost(preview_ms=2.0, unet_step_ms=280.0),
        ablation=[
            paired_change(
                "fusions", True, [_ablation_round(0.8, 1.25), _ablation_round(0.882, 1.152)]
            )
        ],
    )
    results.ratios = {
        "bare_onnxruntime": report.Ratio.paired([[5000.0], [5000.0]], [[4900.0], [4900.0]]),
        "diffusers_eager": report.Ratio.paired([[5000.0], [5000.0]], [[8000.0], [8000.0]]),
        "streaming": report.Ratio.paired([[5050.0], [5050.0]], [[5000.0], [5000.0]]),
    }
    results.evaluate_targets()
    return results


def _ablation_round(latency_ratio: float, throughput_ratio: float) -> dict:
    """One ablation round: before and after at c=1 (latency) and c=2 (throughput)."""

    def profiled(concurrency: int, latency_ms: float, span_s: float) -> Profiled:
        ends = (int(latency_ms * 1e6), int(span_s * 1e9))
        return Profiled(concurrency, (0, 0), ends, ends)

    return {
        ("before", 1): profiled(1, 1000.0, 1.0),
        ("after", 1): profiled(1, 1000.0 * latency_ratio, 1.0 * latency_ratio),
        ("before", 2): profiled(2, 1.0, 2.0),
        ("after", 2): profiled(2, 1.0, 2.0 / throughput_ratio),
    }


def test_ratios_are_paired_by_round() -> None:
    # The machine is 10% slower in the second round: every system is.
    triton = [[5000.0, 5200.0], [5500.0, 5720.0]]
    diffusers = [[8000.0, 8400.0], [8800.0, 9240.0]]
    ratio = report.Ratio.paired(triton, diffusers)
    assert ratio.per_round == pytest.approx((5100 / 8200, 5610 / 9020), abs=1e-4)
    assert ratio.value == pytest.approx(5100 / 8200, abs=1e-4)
    assert ratio.triton_median_ms == pytest.approx(5350.0)
    assert ratio.other_median_ms == pytest.approx(8600.0)
    # A round in which either system has no edit pairs nothing.
    assert report.Ratio.paired([[1.0], []], [[2.0], [9.0]]).per_round == (0.5,)
    with pytest.raises(ValueError, match="no round"):
        report.Ratio.paired([[]], [[1.0]])


def test_ablation_changes_are_paired_by_round() -> None:
    # Within each round "after" is 5% faster at c=1 and has 10% more throughput at c=2,
    # though the second round ran on a machine 10% slower.
    slower = {
        key: Profiled(
            p.concurrency,
            p.starts_ns,
            tuple(int(e * 1.1) for e in p.ends_ns),
            tuple(int(e * 1.1) for e in p.ends_ns),
        )
        for key, p in _ablation_round(0.95, 1.1).items()
    }
    change = paired_change("x", True, [_ablation_round(0.95, 1.1), slower])
    assert change.median_c1_rounds == pytest.approx((0.95, 0.95), abs=1e-4)
    assert change.median_c1 == pytest.approx(0.95, abs=1e-4)
    assert change.throughput_c2_rounds == pytest.approx((1.1, 1.1), abs=1e-4)


def test_targets_are_met_or_fall_short_with_their_numbers() -> None:
    results = _results()
    lines = {t.name: t for t in results.targets}
    assert lines["Triton / diffusers eager"].value == pytest.approx(0.625)
    assert lines["Triton / diffusers eager"].line() == (
        "Triton / diffusers eager: 0.625 (limit 0.67) -> met"
    )
    assert lines["streaming / whole edit, end to end"].met  # 1.01 <= 1.03
    assert lines["latent preview / UNet step"].value == pytest.approx(2 / 280)
    assert lines["edits/s at c=2 over c=1"].met
    results.ratios["diffusers_eager"] = report.Ratio.paired([[6000.0]], [[8000.0]])
    results.levels[1] = _level(2, 0.19, 9500.0)
    results.evaluate_targets()
    short = {t.name: t for t in results.targets}
    assert not short["Triton / diffusers eager"].met and not short["edits/s at c=2 over c=1"].met
    assert short["Triton / diffusers eager"].line().endswith("falls short")


DEFAULT_QUALITY_TARGET = (
    "default quality (fastest served within 40 dB of served fp32) / diffusers fp32 eager"
)


def test_speed_switches_are_held_to_their_goals_against_diffusers_fp32() -> None:
    """The fastest served system within 40 dB of served fp32 <= 0.30x diffusers fp32; each
    int8 with reused UNet work (the fast switch) <= 0.15x, whatever its PSNR."""
    results = _results()
    fast = "triton_python-openvino_int8_reuse3"
    results.agreement |= {
        "Triton vs triton_python-openvino_int8": Agreement(9.0, 0.5, 41.0),
        f"Triton vs {fast}": Agreement(40.0, 2.0, 30.0),
    }
    results.against_diffusers = {
        "triton": report.Ratio.paired([[5000.0]], [[8000.0]]),
        "triton_python-openvino_int8": report.Ratio.paired([[2000.0]], [[8000.0]]),
        fast: report.Ratio.paired([[1000.0]], [[8000.0]]),
        "diffusers_eager_deepcache3": report.Ratio.paired([[400.0]], [[8000.0]]),
    }
    results.evaluate_targets()
    lines = {t.name: t.line() for t in results.targets}
    # int8 is within 40 dB and the fastest such; the faster fast switch is not; diffusers
    # with DeepCache is not a served system.
    assert lines[DEFAULT_QUALITY_TARGET].endswith(": 0.250 (limit 0.3) -> met")
    fast_line = f"fast ({report.label(fast)}) / diffusers fp32 eager"
    assert lines[fast_line].endswith(": 0.125 (limit 0.15) -> met")
    results.agreement["Triton vs triton_python-openvino_int8"] = Agreement(20.0, 1.0, 39.9)
    results.evaluate_targets()
    lines = {t.name: t.line() for t in results.targets}
    assert lines[DEFAULT_QUALITY_TARGET].endswith(": 0.625 (limit 0.3) -> falls short")
    # Served bf16 or reused work is no fidelity reference: the goals are left out.
    results.config["cache_interval"] = 3
    results.evaluate_targets()
    assert DEFAULT_QUALITY_TARGET not in {t.name for t in results.targets}
    assert "PSNR against Triton (dB)" in report.markdown(results, "plot.png")
    # A run without the diffusers baseline (--skip-baselines) has no such table to show.
    results.against_diffusers = {}
    assert "PSNR against Triton (dB)" not in report.markdown(results, "plot.png")


def test_targets_apply_only_to_the_cpu_goal_configuration() -> None:
    assert BenchConfig().targets_apply
    assert not BenchConfig(preset="tiny").targets_apply
    assert not BenchConfig(image_guidance_scale=0.5).targets_apply
    assert not BenchConfig(steps=10).targets_apply


def test_the_benchmark_serves_what_make_serve_serves() -> None:
    serves = RepositoryOptions().for_this_machine()
    assert BenchConfig().options == serves
    assert BenchConfig().to_json()["options"] == dataclasses.asdict(serves)


def test_results_are_written_as_json_markdown_and_plot(tmp_path: Path) -> None:
    results = _results()
    paths = report.write(results, tmp_path, "2026-12-01-amd-epyc-2c")
    assert {p.name for p in paths.values()} == {
        "2026-12-01-amd-epyc-2c.json",
        "2026-12-01-amd-epyc-2c.md",
        "2026-12-01-amd-epyc-2c.png",
    }
    written = json.loads(paths["json"].read_text())
    assert written["ratios"]["diffusers_eager"]["value"] == pytest.approx(0.625)
    assert written["levels"][1]["throughput_per_s"] == 0.21
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(paths["png"]).size[0] > 500

    text = paths["md"].read_text()
    assert "![latency and throughput against concurrency](2026-12-01-amd-epyc-2c.png)" in text
    assert (
        "| Triton (perf_analyzer, gRPC, c=1) | 5,000 | 5,000 | p90 5,500, p99 6,000 | 1.000 |"
        in text
    )
    assert "| diffusers eager PyTorch | 8,100 | 8,100 | min 8,000 | 0.625 |" in text
    assert (
        "| Triton streaming (previews on), c=1 | 5,050 | 5,050 | first event 505 | 1.010 |" in text
    )
    assert "| 2 | 8 (2) | 0.210 | 9,500 |" in text
    assert "- Triton / diffusers eager: 0.625 (limit 0.67) -> met" in text
    assert "| UNet x N | `unet_pix2pix` | 3.00 | 3.00 |" in text
    assert "Latent preview: 2.00 ms, 0.7% of a UNet step (280 ms)" in text
    assert "| fusions | -16.0% (-20.0, -11.8) | +20.0% (+25.0, +15.2) | yes |" in text

    summary = report.console_summary(results)
    assert "| fusions | -16.0% (-20.0, -11.8) | +20.0% (+25.0, +15.2) | yes |" in summary
    assert "edits/s at c=2 over c=1: 1.050 (limit 1.0) -> met" in summary
    assert "UNet x N" in summary


def test_machine_slug_is_a_safe_file_name() -> None:
    machine = {"cpu": "AMD EPYC 7B13 64-Core Processor", "logical_cores": 2, "gpus": []}
    assert report.machine_slug(machine) == "amd-epyc-7b13-2c"
    gpu = {"cpu": "x", "logical_cores": 16, "gpus": ["NVIDIA H100 80GB HBM3, 81559 MiB"]}
    assert report.machine_slug(gpu) == "h100-80gb-hbm3"


def test_machine_names_the_cpus_generation_and_speed_features(monkeypatch, tmp_path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
        "model name\t: AMD EPYC\nstepping\t: 1\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
        "processor\t: 1\nmodel name\t: another\nflags\t\t: amx_bf16\n"
    )
    monkeypatch.setattr(openvino_component, "CPUINFO", cpuinfo)
    machine = report.machine_info()
    assert report.cpu_description(machine) == (
        "AMD EPYC (cpu family 25, model 17, stepping 1; avx2 avx512f avx512_bf16)"
    )
    # Results recorded before the CPU's generation was.
    assert report.cpu_description({"cpu": "AMD EPYC 7B13"}) == "AMD EPYC 7B13"


def test_bf16_is_held_to_its_own_goals() -> None:
    results = _results()
    results.config["options"]["precision"] = "bf16"
    results.ratios = {
        "diffusers_eager": report.Ratio.paired([[3000.0]], [[8000.0]]),
        "diffusers_eager_bf16": report.Ratio.paired([[3000.0]], [[4000.0]]),
        "bare_openvino_bf16": report.Ratio.paired([[3000.0]], [[2950.0]]),
        "triton_python-openvino_fp32": report.Ratio.paired([[3000.0]], [[5000.0]]),
    }
    results.evaluate_targets()
    lines = {t.name: t.line() for t in results.targets}
    assert lines["Triton bf16 / diffusers eager fp32"] == (
        "Triton bf16 / diffusers eager fp32: 0.375 (limit 0.4) -> met"
    )
    assert lines["Triton bf16 / diffusers eager bf16"].endswith("(limit 0.7) -> falls short")
    assert lines["Triton bf16 / bare OpenVINO bf16 loop"].endswith("-> met")
    # Another served configuration is compared, not held to a goal.
    assert len(lines) == 5  # the three, c=2 over c=1 and the preview
    assert report.label("triton_python-openvino_fp32") == (
        "Triton python-openvino fp32 (client library, c=1)"
    )


def test_other_served_configurations_are_python_flavours() -> None:
    config = BenchConfig(served=("python-openvino:fp32", "python-onnxruntime:fp32"))
    variants = config.served_variants()
    assert [(v.options.flavour, v.options.precision) for v in variants] == [
        ("python-openvino", "fp32"),
        ("python-onnxruntime", "fp32"),
    ]
    assert variants[0].name == "small-python-openvino-fp32" and not variants[0].served
    with pytest.raises(ValueError, match="served='openvino:bf16'"):
        BenchConfig(served=("openvino:bf16",))
    with pytest.raises(ValueError, match="precision=bf16 with flavour=python-onnxruntime"):
        BenchConfig(served=("python-onnxruntime:bf16",))
    for malformed in ("nope", "python-openvino:int8:2:4", "python-openvino:"):
        with pytest.raises(ValueError, match=f"served='{malformed}': allowed FLAVOUR:PRECISION"):
            BenchConfig(served=(malformed,))
    with pytest.raises(ValueError, match="cache_interval=11 is out of range"):
        BenchConfig(served=("python-openvino:int8:11",))


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"steps": 0}, "num_inference_steps=0 is out of range: allowed 2..1000"),
        ({"guidance_scale": float("nan")}, "guidance_scale=nan is not a finite number"),
        ({"temperature": float("inf")}, "temperature=inf is not a finite number"),
        ({"cache_interval": -1}, "cache_interval=-1 is out of range: allowed 1..10"),
        ({"seed": -1}, "seed=-1 is out of range"),
    ],
)
def test_the_benchmarks_request_is_checked_with_the_contract(settings: dict, words: str) -> None:
    """What every system would be sent, refused before anything is built."""
    with pytest.raises(ValueError, match=re.escape(words)):
        BenchConfig(**settings)


def test_the_footprint_command_checks_its_counts(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import footprint

    assert footprint.main(["--concurrent", "0"]) == 2
    assert capsys.readouterr().err == "error: concurrent=0: allowed >= 1\n"
    assert footprint.main(["--memory-steps", "1"]) == 2
    assert "memory_steps=1: allowed >= 2" in capsys.readouterr().err
    assert footprint.main(["--size", "0"]) == 2
    assert "size=0: allowed a multiple of 8" in capsys.readouterr().err


def test_configuration_errors_name_the_setting() -> None:
    with pytest.raises(ValueError, match="size=100"):
        BenchConfig(size=100)
    with pytest.raises(ValueError, match="concurrency"):
        BenchConfig(concurrency=(0,))
    with pytest.raises(ValueError, match="max_edits"):
        BenchConfig(options=RepositoryOptions(max_edits=1))
    assert not BenchConfig(image_guidance_scale=0.5).guided


def test_deepcache_shares_the_plain_pipeline_and_leaves_it_plain(tiny_preset: Path) -> None:
    """DeepCache's helper wraps the fp32 pipeline's UNet for its own edits only: the plain
    system's edits around them stay the plain pipeline's, on one copy of the weights."""
    from benchmarks.systems import DiffusersDeepCache, DiffusersEager

    config = BenchConfig(preset="tiny", size=64, steps=3)
    plain = DiffusersEager(tiny_preset, config)
    deepcache = DiffusersDeepCache(plain, cache_interval=3)
    image = photo_png(64)
    before = plain(image)
    reused = deepcache(image)
    assert plain(image) == before
    assert reused != before  # steps 1 and 2 reused step 0's deep features
    assert deepcache(image) == reused  # its step count starts again with each edit
    assert deepcache.eager.pipeline is plain.pipeline


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
    (build / "onnx" / "tiny").symlink_to(tiny_export)  # the plain export: no fusions
    steps = 3
    argv = ["--preset", "tiny", "--size", "64", "--steps", str(steps), "--no-onnxruntime-fusions"]
    # The fp32 systems agree within 2 levels whatever the CPU (auto may pick bf16).
    argv += ["--flavour", "python-onnxruntime", "--precision", "fp32"]
    # The pipeline measured, one edit per model at a time: what the run needs of a server.
    argv += ["--pipelines", "instruct_pix2pix", "--edit-instances", "1"]
    # Two edits per level: with one, perf_analyzer 2.51 sometimes exits 99 ("failed to find
    # the requested model version") after a tiny edit.
    argv += ["--concurrency", "1", "2", "--rounds", "1", "--requests-per-round", "2"]
    # What is served, with reused UNet work: the measured server answers it too.
    argv += ["--served", "python-onnxruntime:fp32:2"]
    argv += ["--build-dir", str(build), "--output-dir", str(tmp_path / "results")]
    assert main([*argv, "--stem", "tiny"]) == 0

    results = json.loads((tmp_path / "results" / "tiny.json").read_text())
    levels = {level["concurrency"]: level for level in results["levels"]}
    assert [levels[1]["requests"], levels[2]["requests"]] == [2, 4]
    assert all(level["p50_ms"] > 0 and level["throughput_per_s"] > 0 for level in levels.values())
    streaming = results["streaming"]
    assert streaming["requests"] == 2
    assert 0 < streaming["first_response_median_ms"] < streaming["median_ms"]
    stages = {row["stage"]: row for row in results["stages"]["1"]}
    assert stages["UNet x N"]["calls_per_edit"] == steps
    assert stages["end to end (server)"]["calls_per_edit"] == 1
    # diffusers in bf16 only where the CPU computes bf16: emulated, it is far slower.
    bf16 = ["diffusers_eager_bf16"] if bf16_unsupported_reason() is None else []
    in_process = ["bare_onnxruntime", "diffusers_eager", *bf16, "diffusers_eager_deepcache3"]
    served = ["triton_python-onnxruntime_fp32_reuse2"]
    for name in [*in_process, *served]:
        assert min(results["baselines"][name]["runs_ms"]) > 0, name
    # The same request gives the same picture on the fp32 systems; bf16 weights come close.
    agreement = results["agreement"]
    assert set(agreement) == {f"Triton vs {name}" for name in [*in_process, *served]}
    assert agreement["Triton vs bare_onnxruntime"]["max_difference"] <= 2
    assert agreement["Triton vs diffusers_eager"]["max_difference"] <= 2
    if bf16:
        assert agreement["Triton vs diffusers_eager_bf16"]["mean_difference"] <= 4
    else:
        assert any("diffusers eager bf16 was left out" in note for note in results["notes"])
    # Reused UNet work, DeepCache's (interval 3: a full pass, then two reusing it) and
    # ours, moves the picture.
    assert agreement["Triton vs diffusers_eager_deepcache3"]["max_difference"] > 2
    for name in ("diffusers_eager_deepcache3", *served):
        assert 10 < agreement[f"Triton vs {name}"]["psnr_db"] < math.inf, name
    # Every system but diffusers fp32 itself, against diffusers fp32.
    assert set(results["against_diffusers"]) == {"triton", *in_process, *served} - {
        "diffusers_eager"
    }
    # One server: the run started none for the served configuration.
    assert len(list((build / "bench").iterdir())) == 1
    assert results["preview"]["preview_ms"] > 0
    assert not results["targets_apply"]
    assert {t["name"] for t in results["targets"]} == {
        "Triton / diffusers eager",
        "Triton / bare onnxruntime loop",
        "streaming / whole edit, end to end",
        "edits/s at c=2 over c=1",
        "latent preview / UNet step",
        DEFAULT_QUALITY_TARGET,
    }
    assert results["config"]["options"]["onnxruntime_fusions"] is False

    markdown = (tmp_path / "results" / "tiny.md").read_text()
    assert "informative only" in markdown and "## Per stage" in markdown
    assert "| diffusers eager PyTorch with DeepCache's helper, interval 3 | " in markdown
    assert (tmp_path / "results" / "tiny.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "edits/s at c=2 over c=1" in printed


def test_the_footprint_measures_every_process_and_the_admission_on_the_tiny_preset(
    tiny_preset: Path, tiny_export: Path, tmp_path: Path
) -> None:
    """`make bench-footprint`, scaled down: a real `serve --repository` process tree and
    diffusers in a process of its own; the figures are the machine's, the shape is checked."""
    from benchmarks.footprint import main

    build = tmp_path / "build"
    (build / "presets").mkdir(parents=True)
    (build / "presets" / "tiny").symlink_to(tiny_preset)
    (build / "onnx").mkdir()
    (build / "onnx" / "tiny").symlink_to(tiny_export)
    argv = ["--preset", "tiny", "--size", "64", "--steps", "3", "--no-onnxruntime-fusions"]
    argv += ["--flavour", "python-onnxruntime", "--precision", "fp32", "--intra-op-threads", "1"]
    argv += ["--edits", "2", "--memory-steps", "2", "--timed-edits", "1", "--concurrent", "3"]
    argv += ["--no-from-checkpoint", "--build-dir", str(build)]
    argv += ["--output-dir", str(tmp_path / "results"), "--stem", "tiny"]
    assert main(argv) == 0

    results = json.loads((tmp_path / "results" / "tiny.json").read_text())
    (served,) = results["served"]
    assert served["name"] == "python-onnxruntime:fp32"
    assert served["ready_s"] > 0 and served["stop_s"] > 0
    # Every process of the tree is counted under its own name: each model instance, the
    # server and the serving parent; both pipelines' models (edits took both in turn).
    processes = set(served["pss_after_edits"])
    assert {"tritonserver", "serve (builds, supervises)"} <= processes
    for model in ("instruct_pix2pix", "img2img", "unet_pix2pix", "unet_img2img", "vae_decoder"):
        assert f"{model}_0_0" in processes, model
    assert all(value > 0 for value in served["pss_after_edits"].values())
    assert served["peak_pss"] >= sum(served["pss_after_edits"].values())
    # Only python-openvino's UNets give their working memory back when idle.
    assert served["pss_at_rest"] is None
    exported = sum(p.stat().st_size for p in tiny_export.glob("*/model.onnx*"))
    assert 0 < served["weights_bytes"] <= exported
    # Three edits sent at once to a server that holds eight: none refused, none failed.
    assert served["concurrent"] == {"completed": 3, "refused": 0, "failed": 0}
    assert served["concurrent_peak_pss"] > 0
    (timed,) = served["edit_s"]
    assert timed > 0
    diffusers = results["diffusers"]["float32"]
    assert diffusers["load_s"] > 0 and diffusers["pss_after_edits"] > 0
    markdown = (tmp_path / "results" / "tiny.md").read_text()
    assert "## Edits sent at once (admission)" in markdown and "| budget |" in markdown


def test_a_served_variant_may_reuse_unet_work() -> None:
    config = BenchConfig(served=("python-onnxruntime:fp32:3", "python-onnxruntime:fp32"))
    reused, plain = config.served_variants()
    assert reused.request()["cache_interval"] == 3 and "cache_interval" not in plain.request()
    assert reused.served_name == "triton_python-onnxruntime_fp32_reuse3"
    assert plain.served_name == "triton_python-onnxruntime_fp32"
    for bad in ("python-onnxruntime:fp32:three", "python-onnxruntime:fp32:3:4"):
        with pytest.raises(ValueError, match="CACHE_INTERVAL"):
            BenchConfig(served=(bad,))


def test_the_operation_profile_splits_a_served_components_call(
    tiny_export: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The served UNet file, called at an edit's shape, with its time split by operation
    kind and kernel, compiled for dynamic shapes as served or for that one shape; a
    component the export lacks is named with the ones it has."""
    from benchmarks import op_profile

    result = op_profile.profile(tiny_export, "unet_pix2pix", "fp32", side=64, batch=3, calls=2)
    assert result.model_file == tiny_export / "unet_pix2pix" / "model.onnx"
    assert result.computes_in == "fp32" and len(result.call_s) == 2
    assert result.shapes == "dynamic"
    assert "Convolution" in result.by_kind
    assert math.isclose(sum(result.by_kind.values()), sum(result.by_kernel.values()))
    arguments = ["--component", "unet_pix2pix", "--precision", "fp32", "--side", "64"]
    assert op_profile.main([str(tiny_export), *arguments, "--calls", "1"]) == 0
    printed = capsys.readouterr().out
    assert "last call by operation" in printed and "Convolution" in printed
    assert "dynamic shapes" in printed
    assert op_profile.main([str(tiny_export), *arguments, "--calls", "1", "--static-shape"]) == 0
    assert "static shapes" in capsys.readouterr().out

    assert op_profile.main([str(tiny_export), "--component", "unet"]) == 2
    assert "component='unet': allowed one of text_encoder," in capsys.readouterr().err
    assert op_profile.main([str(tiny_export), "--side", "60"]) == 2
    assert "side=60: allowed a multiple of" in capsys.readouterr().err
