"""The openvino flavours' components: OpenVINO compiled models of the plain ONNX export.

Real OpenVINO on the tiny preset: fp32 against onnxruntime, bf16 against fp32 and against
diffusers, and the bf16 check of the CPU with a fake /proc/cpuinfo and fake OpenVINO
capabilities standing in for a CPU without native bf16 (this one has it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.fidelity import psnr
from benchmarks.settings import BenchConfig
from benchmarks.systems import BareLoop
from edit_pipeline import openvino_component
from edit_pipeline.onnxruntime_component import OnnxComponent
from edit_pipeline.openvino_component import OpenVinoComponent, bf16_unsupported_reason
from edit_pipeline.preprocess import decode_image
from model_repository.builder import build_repository
from model_repository.configs import RepositoryOptions
from tests.memory import anonymous_resident_bytes
from tests.serving import photo, png_bytes
from tests.test_idle_release import wait_for
from tests.test_parity import CASES, PROMPT, SEED, Case, reference_image

# bf16 keeps 8 bits of mantissa (components a few % off fp32): the tiny preset's random
# weights, 6 steps, against fp32 diffusers, with headroom over what bf16 gives. The
# image-guided DDIM and DDPM cases are left out: with these random weights a 1%
# perturbation of the fp32 UNet's output already moves them by far more than bf16's
# bound, so they say nothing about bf16. The small preset's served fidelity gate
# (test_openvino_fidelity, slow) is the bar for real images.
BF16_MAX_ABS_DIFFERENCE = 16
BF16_MIN_PSNR_DB = 40.0
BF16_CASES = [
    case
    for case in CASES
    if case.name.startswith(("pix2pix-euler_a", "pix2pix-text-guidance-off", "img2img"))
]

native_bf16 = pytest.mark.skipif(
    bf16_unsupported_reason() is not None, reason="this CPU has no native bf16"
)


def unet_inputs(batch: int = 3) -> dict[str, np.ndarray]:
    generator = np.random.default_rng(0)
    return {
        "sample": generator.standard_normal((batch, 8, 8, 8), dtype=np.float32),
        "timestep": np.full((batch,), 500.0, dtype=np.float32),
        "encoder_hidden_states": generator.standard_normal((batch, 77, 32), dtype=np.float32),
    }


@pytest.fixture()
def cpu_without_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU like the ones before AVX512_BF16: its cpuinfo flags and OpenVINO's view."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    monkeypatch.setattr(openvino_component, "CPUINFO", cpuinfo)
    monkeypatch.setattr(openvino_component, "openvino_capabilities", lambda: ["FP32", "INT8"])


def test_fp32_computes_what_onnxruntime_computes(tiny_export: Path) -> None:
    model = tiny_export / "unet_pix2pix" / "model.onnx"
    inputs = unet_inputs()
    assert set(inputs) == set(OnnxComponent(model).input_names)
    expected = OnnxComponent(model, intra_op_threads=1).run(inputs)["noise_pred"]
    component = OpenVinoComponent(model, "fp32", threads=1)
    assert component.inference_precision == "fp32"
    actual = component.run(inputs)["noise_pred"]
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-4)
    component.close()


def test_releasing_working_memory_after_each_call_changes_no_result(tiny_export: Path) -> None:
    """What the components called once per edit do (release_activations): the next call
    allocates again and computes the same, in onnxruntime and in OpenVINO."""
    model = tiny_export / "vae_decoder" / "model.onnx"
    latents = {"latent": np.random.default_rng(3).standard_normal((1, 4, 8, 8), np.float32)}
    kept = OnnxComponent(model, intra_op_threads=1).run(latents)
    for component in (
        OnnxComponent(model, intra_op_threads=1, release_activations=True),
        OpenVinoComponent(model, "fp32", threads=1, release_activations=True),
    ):
        for _ in range(2):
            (name,) = component.output_names
            np.testing.assert_allclose(
                component.run(latents)[name], kept[name], atol=1e-4, rtol=1e-4
            )


def test_a_failed_call_leaves_the_next_calls_right(tiny_export: Path) -> None:
    """A call of a shape no edit sends (a 1x1 image) fails in OpenVINO with two threads;
    after it, with the working memory released, OpenVINO computed NaN latents for every
    later call of the good shape (until one of a third shape). The component compiles
    again after a failure, so the next call computes what the first did. (With one
    thread the same call returns, and the NaN follow all the same: the component models
    refuse such shapes before they run, tests/test_hardening.py.)"""
    component = OpenVinoComponent(
        tiny_export / "vae_encoder" / "model.onnx", "fp32", threads=2, release_activations=True
    )
    image = {"image": np.random.default_rng(4).random((1, 3, 64, 64), np.float32)}
    first = component.run(image)
    with pytest.raises(RuntimeError):
        component.run({"image": np.zeros((1, 3, 1, 1), np.float32)})
    for _ in range(2):
        again = component.run(image)
        for name, array in first.items():
            np.testing.assert_array_equal(again[name], array)


def test_a_compilation_that_fails_after_a_failed_call_is_tried_again(tiny_export: Path) -> None:
    """After a failed call the next call compiles the model again; where that fails too
    (no memory left for a moment), that call fails and the one after it compiles again.
    Meanwhile, with nothing compiled, the idle release keeps working."""
    component = OpenVinoComponent(
        tiny_export / "vae_encoder" / "model.onnx", "fp32", threads=2, release_after_idle_s=0.2
    )
    image = {"image": np.random.default_rng(4).random((1, 3, 64, 64), np.float32)}
    first = component.run(image)
    assert wait_for(lambda: component.idle_release.releases == 1)
    core = component._core
    failures = []

    class FailingOnce:
        def read_model(self, path: str) -> Any:
            return core.read_model(path)

        def compile_model(self, *args: Any) -> Any:
            if not failures:
                failures.append(args)
                raise MemoryError("std::bad_alloc")
            return core.compile_model(*args)

    component._core = FailingOnce()
    with pytest.raises(RuntimeError):
        component.run({"image": np.zeros((1, 3, 1, 1), np.float32)})
    assert wait_for(lambda: component.idle_release.releases == 2)  # nothing compiled
    with pytest.raises(MemoryError):
        component.run(image)
    assert len(failures) == 1
    assert wait_for(lambda: component.idle_release.releases == 3)
    for _ in range(2):
        again = component.run(image)
        for name, array in first.items():
            np.testing.assert_array_equal(again[name], array)
    component.close()


def test_an_idle_unet_gives_its_working_memory_back(tiny_export: Path) -> None:
    """The full UNet keeps its working memory from one call to the next, and gives it
    back once it has had no call for `release_after_idle_s`; the next call computes the
    same."""
    unet = OpenVinoComponent(
        tiny_export / "unet_pix2pix" / "model.onnx", "fp32", threads=1, release_after_idle_s=0.3
    )
    inputs = unet_inputs()
    inputs["sample"] = np.random.default_rng(1).standard_normal((3, 8, 48, 48), np.float32)
    first = unet.run(inputs)["noise_pred"]
    worked = anonymous_resident_bytes()
    assert wait_for(lambda: unet.idle_release.releases == 1)
    released = anonymous_resident_bytes()
    # The compiled model's working memory at 48x48 latents, and what compiling left: 53 MB.
    assert worked - released > 24 << 20
    np.testing.assert_array_equal(unet.run(inputs)["noise_pred"], first)
    unet.close()


# Two onnxruntime components of one UNet in a fresh process: the working memory (bytes of
# anonymous RSS) each one's first call at 48x48 latents added.
_SECOND_SESSION_GROWTH = """
import sys
from pathlib import Path
import numpy as np
from edit_pipeline.onnxruntime_component import OnnxComponent
from tests.memory import anonymous_resident_bytes as anonymous

generator = np.random.default_rng(0)
inputs = {
    "sample": generator.standard_normal((3, 8, 48, 48), dtype=np.float32),
    "timestep": np.full((3,), 500.0, dtype=np.float32),
    "encoder_hidden_states": generator.standard_normal((3, 77, 32), dtype=np.float32),
}
first, second = (OnnxComponent(Path(sys.argv[1]), intra_op_threads=1) for _ in range(2))
before = anonymous()
first.run(inputs)
between = anonymous()
second.run(inputs)
print(between - before, anonymous() - between)
"""


def test_onnxruntime_sessions_of_a_process_share_one_arena(tiny_export: Path) -> None:
    """A second session (a UNet's shallow pass, a one-thread session) computes in the
    chunks the first one freed instead of growing an arena of its own."""
    unet = tiny_export / "unet_pix2pix" / "model.onnx"
    printed = subprocess.run(
        [sys.executable, "-c", _SECOND_SESSION_GROWTH, str(unet)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    first, second = (int(word) for word in printed.split())
    assert first > 32 << 20  # each arena of its own: the second grew as much (68 MB)
    assert second < first / 8


def test_merged_requests_equal_separate_calls(tiny_export: Path) -> None:
    component = OpenVinoComponent(tiny_export / "unet_pix2pix" / "model.onnx", threads=1)
    first, second = unet_inputs(3), unet_inputs(2)
    # Triton's [batch, 1] timestep reaches the model as [batch].
    second["timestep"] = second["timestep"][:, None]
    merged = component.run_merged([first, second])
    for request, outputs in zip((first, second), merged, strict=True):
        np.testing.assert_allclose(
            outputs["noise_pred"], component.run(request)["noise_pred"], atol=1e-5
        )


@native_bf16
def test_bf16_compiles_in_bf16_and_stays_close_to_fp32(tiny_export: Path) -> None:
    model = tiny_export / "unet_pix2pix" / "model.onnx"
    inputs = unet_inputs()
    bf16 = OpenVinoComponent(model, "bf16", threads=1)
    assert bf16.fallback_reason is None and bf16.inference_precision == "bf16"
    fp32 = OpenVinoComponent(model, "fp32", threads=1).run(inputs)["noise_pred"]
    difference = np.abs(bf16.run(inputs)["noise_pred"] - fp32)
    assert 0 < difference.max() < 0.1 * np.abs(fp32).max()


def test_bf16_is_refused_where_the_cpu_lacks_it(cpu_without_bf16, tiny_export: Path) -> None:
    options = RepositoryOptions(flavour="python-openvino", precision="bf16")
    with pytest.raises(ValueError) as raised:
        build_repository(tiny_export, Path("/nonexistent/repository"), options)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("precision=bf16: this CPU has neither avx512_bf16 nor amx_bf16")
    assert message.endswith("use precision fp32")


def test_bf16_needs_both_the_cpu_flags_and_openvino(monkeypatch, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: avx512f avx512_bf16\n")
    monkeypatch.setattr(openvino_component, "CPUINFO", cpuinfo)
    assert bf16_unsupported_reason(capabilities=["FP32", "BF16"]) is None
    assert "OpenVINO lists no BF16" in bf16_unsupported_reason(capabilities=["FP32"])
    # Without a cpuinfo (not Linux) OpenVINO's word decides.
    monkeypatch.setattr(openvino_component, "CPUINFO", tmp_path / "missing")
    assert bf16_unsupported_reason(capabilities=["FP32", "BF16"]) is None


def test_an_arm_cpus_features_are_its_flags(monkeypatch, tmp_path: Path) -> None:
    """Arm's cpuinfo names them Features (what a saved CPU graph is made for)."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve bf16\n\n")
    monkeypatch.setattr(openvino_component, "CPUINFO", cpuinfo)
    assert openvino_component.cpu_flags() == {"fp", "asimd", "sve", "bf16"}


def test_a_bf16_repository_served_on_a_cpu_without_it_computes_fp32(
    cpu_without_bf16, tiny_export: Path
) -> None:
    """A repository built elsewhere (copied, or on shared storage) still loads: the
    component logs why and computes in fp32 (edit_pipeline/triton/openvino_model.py)."""
    component = OpenVinoComponent(tiny_export / "vae_decoder" / "model.onnx", "bf16", threads=1)
    assert component.precision == "fp32" and component.inference_precision == "fp32"
    assert "neither avx512_bf16 nor amx_bf16" in component.fallback_reason


def test_the_openvino_flavours_refuse_a_fused_export(tiny_export: Path, tmp_path: Path) -> None:
    fused = tmp_path / "fused"
    fused.mkdir()
    for entry in tiny_export.iterdir():
        if entry.name != "manifest.json":
            (fused / entry.name).symlink_to(entry)
    manifest = (tiny_export / "manifest.json").read_text()
    (fused / "manifest.json").write_text(
        manifest.replace('"optimized": false', '"optimized": true')
    )
    with pytest.raises(ValueError, match="OpenVINO cannot read; the openvino flavour needs"):
        build_repository(fused, tmp_path / "repository", RepositoryOptions(flavour="openvino"))


@pytest.fixture(scope="module")
def bf16_loops(tiny_export: Path) -> dict[str, BareLoop]:
    """The served pipeline code on bf16 components, per pipeline (the bare loop: the served
    models' code and component settings without Triton, which the fp32 parity suite covers)."""
    options = RepositoryOptions(flavour="python-openvino", precision="bf16", intra_op_threads=1)
    return {
        pipeline: BareLoop(
            tiny_export, BenchConfig(preset="tiny", pipeline=pipeline, options=options)
        )
        for pipeline in ("instruct_pix2pix", "img2img")
    }


@native_bf16
@pytest.mark.parametrize("case", BF16_CASES, ids=[case.name for case in BF16_CASES])
def test_bf16_edits_stay_close_to_diffusers(
    bf16_loops, reference_pipelines, summary, case: Case
) -> None:
    pipeline = bf16_loops[case.model].pipeline
    encoded = png_bytes(photo(*case.size))
    request = {"prompt": PROMPT, "num_inference_steps": case.steps, "seed": SEED}
    output = pipeline.run(pipeline.prepare({"image": encoded, **request, **case.arguments}))
    actual = np.asarray(decode_image(output.png))
    expected = reference_image(reference_pipelines[case.model], case, decode_image(encoded))
    difference = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    quality = psnr(actual, expected)
    summary(
        "bf16 (python-openvino components) vs diffusers fp32, uint8 (tiny preset)",
        f"{case.name:<34} max {difference.max()}  mean {difference.mean():.4f}  "
        f"PSNR {quality:.1f} dB",
    )
    assert difference.max() <= BF16_MAX_ABS_DIFFERENCE
    assert quality >= BF16_MIN_PSNR_DB
