"""Presets, ONNX export and validation, on the tiny preset of the real architectures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.checkpoint import (
    PIX2PIX,
    UnsupportedCheckpointError,
    checkpoint_inputs,
    discover_pipelines,
    inspect_folder,
    load_pipeline,
)
from export.components import (
    COMPONENTS,
    UNET_FOR_PIPELINE,
    ComponentSpec,
    ModelDimensions,
    component_specs,
    shallow_unet,
)
from export.onnx_export import MANIFEST, format_table, load_manifest
from export.presets import IMG2IMG_FOLDER, PIX2PIX_FOLDER, build_preset, weights_hash
from export.sample_inputs import sample_inputs
from export.tensorrt_engines import engine_name, optimization_profile

# The five components, and each UNet's shallow pass (reused UNet work).
EXPORTED = (*COMPONENTS, *(shallow_unet(unet) for unet in UNET_FOR_PIPELINE.values()))


def test_preset_is_deterministic(tiny_preset: Path, tmp_path: Path) -> None:
    again = build_preset("tiny", tmp_path / "again", seed=0)
    assert again[PIX2PIX_FOLDER] == weights_hash(tiny_preset / PIX2PIX_FOLDER)
    assert again[IMG2IMG_FOLDER] == weights_hash(tiny_preset / IMG2IMG_FOLDER)
    other_seed = build_preset("tiny", tmp_path / "other", seed=1)
    assert other_seed[PIX2PIX_FOLDER] != again[PIX2PIX_FOLDER]


def test_preset_shares_text_encoder_and_vae_like_real_checkpoints(tiny_preset: Path) -> None:
    for component, weights in (
        ("text_encoder", "model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
    ):
        pix2pix = (tiny_preset / PIX2PIX_FOLDER / component / weights).read_bytes()
        img2img = (tiny_preset / IMG2IMG_FOLDER / component / weights).read_bytes()
        assert pix2pix == img2img
    pix2pix = load_pipeline(inspect_folder(tiny_preset / PIX2PIX_FOLDER))
    img2img = load_pipeline(inspect_folder(tiny_preset / IMG2IMG_FOLDER))
    assert pix2pix.unet.config.in_channels == 8
    assert img2img.unet.config.in_channels == 4
    assert type(pix2pix.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert type(img2img.scheduler).__name__ == "PNDMScheduler"
    assert pix2pix.vae_scale_factor == 8
    # The real CLIP vocabulary: "a photo" is 320, 1125 in Stable Diffusion's tokenizer.
    ids = pix2pix.tokenizer("a photo", padding="max_length", max_length=77).input_ids
    assert ids[:4] == [49406, 320, 1125, 49407] and len(ids) == 77


def test_export_writes_manifest_with_every_component(tiny_export: Path) -> None:
    manifest = load_manifest(tiny_export)
    assert set(manifest["components"]) == set(EXPORTED)
    assert manifest["precision"] == "fp32"
    assert set(manifest["pipelines"]) == {"instruct_pix2pix", "img2img"}
    for entry in manifest["components"].values():
        model = tiny_export / entry["model"]
        assert model.is_file()
        assert entry["files"][entry["model"]]["bytes"] == model.stat().st_size
        assert not entry["external_data"]
    rows = manifest["validation"]["rows"]
    assert len(rows) == 2 * len(EXPORTED)
    assert all(row["passed"] and row["max_rel"] < 1e-4 for row in rows)
    assert (tiny_export / "tokenizer" / "tokenizer_config.json").is_file()
    for pipeline, path in manifest["schedulers"].items():
        config = json.loads((tiny_export / path).read_text())
        expected = {
            "instruct_pix2pix": "EulerAncestralDiscreteScheduler",
            "img2img": "PNDMScheduler",
        }
        assert config["_class_name"] == expected[pipeline]


def test_onnx_inputs_and_outputs_follow_the_spec(tiny_export: Path) -> None:
    manifest = load_manifest(tiny_export)
    for name, entry in manifest["components"].items():
        session = ort.InferenceSession(str(tiny_export / entry["model"]))
        spec_inputs = [t["name"] for t in entry["spec"]["inputs"]]
        spec_outputs = [t["name"] for t in entry["spec"]["outputs"]]
        assert [i.name for i in session.get_inputs()] == spec_inputs, name
        assert [o.name for o in session.get_outputs()] == spec_outputs, name
        # every axis the spec calls dynamic is symbolic in the ONNX graph
        for tensor, declared in zip(session.get_inputs(), entry["spec"]["inputs"], strict=True):
            for axis, dim in enumerate(declared["dims"]):
                assert isinstance(tensor.shape[axis], str) == isinstance(dim, str), (name, tensor)


@pytest.mark.parametrize(
    ("batch", "height", "width"),
    [(1, 64, 64), (3, 72, 120), (2, 256, 96)],
    ids=["square-batch1", "non-square-batch3", "tall-batch2"],
)
def test_unet_dynamic_shapes_match_pytorch(
    tiny_preset: Path, tiny_export: Path, batch: int, height: int, width: int
) -> None:
    """Shapes never seen at export (odd latent sides, batch 1 and 3) match the torch UNet."""
    folder = inspect_folder(tiny_preset / PIX2PIX_FOLDER)
    pipeline = load_pipeline(folder)
    checkpoint = checkpoint_inputs({PIX2PIX: folder}, {PIX2PIX: pipeline})
    manifest = load_manifest(tiny_export)
    assert ModelDimensions(**manifest["dimensions"]) == checkpoint.dims
    spec = component_specs(checkpoint.dims)["unet_pix2pix"]
    inputs = sample_inputs(spec, checkpoint, batch, (height // 8, width // 8), seed=7)
    session = ort.InferenceSession(str(tiny_export / "unet_pix2pix" / "model.onnx"))
    (actual,) = session.run(["noise_pred"], inputs)
    with torch.inference_mode():
        expected = pipeline.unet(
            torch.from_numpy(inputs["sample"]),
            torch.from_numpy(inputs["timestep"]),
            torch.from_numpy(inputs["encoder_hidden_states"]),
        ).sample.numpy()
    assert actual.shape == (batch, 4, height // 8, width // 8)
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-4)


def test_vae_roundtrip_non_square(tiny_preset: Path, tiny_export: Path) -> None:
    pipeline = load_pipeline(inspect_folder(tiny_preset / IMG2IMG_FOLDER))
    image = np.random.default_rng(3).uniform(-1, 1, size=(1, 3, 48, 80)).astype(np.float32)
    encoder = ort.InferenceSession(str(tiny_export / "vae_encoder" / "model.onnx"))
    mean, std = encoder.run(None, {"image": image})
    with torch.inference_mode():
        distribution = pipeline.vae.encode(torch.from_numpy(image)).latent_dist
    np.testing.assert_allclose(mean, distribution.mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(std, distribution.std.numpy(), atol=1e-5)
    decoder = ort.InferenceSession(str(tiny_export / "vae_decoder" / "model.onnx"))
    (decoded,) = decoder.run(None, {"latent": mean})
    assert decoded.shape == (1, 3, 48, 80)


def test_validation_table_names_every_component(tiny_export: Path) -> None:
    from export.validation import ValidationRow

    rows = [
        ValidationRow(**{k: v for k, v in row.items() if k != "passed"})
        for row in load_manifest(tiny_export)["validation"]["rows"]
    ]
    table = format_table(rows)
    print("\n" + table)
    for component in EXPORTED:
        assert component in table
    failing = ValidationRow("unet_pix2pix", "sample 1x8x8x8", 0.5, 0.1, 1e-3)
    assert not failing.passed and "NO" in format_table([failing])


def _copy_pipeline(tiny_preset: Path, tmp_path: Path) -> Path:
    target = tmp_path / "pipeline"
    shutil.copytree(tiny_preset / PIX2PIX_FOLDER, target)
    return target


def _run_export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "export.onnx_export", *args],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda p: shutil.rmtree(p / "vae"), "component 'vae' is missing"),
        (
            lambda p: (p / "unet" / "diffusion_pytorch_model.safetensors").rename(
                p / "unet" / "diffusion_pytorch_model.bin"
            ),
            "unet weights load from safetensors only (found only diffusion_pytorch_model.bin)",
        ),
        (
            lambda p: _edit_json(p / "unet" / "config.json", in_channels=9),
            "unet has 9 input channels; supported: 8 (InstructPix2Pix) or 4 (img2img)",
        ),
        (
            lambda p: _edit_json(p / "model_index.json", _class_name="StableDiffusionXLPipeline"),
            "StableDiffusionXLPipeline is an SDXL pipeline",
        ),
        (lambda p: (p / "model_index.json").unlink(), "not a diffusers pipeline folder"),
        # Folders diffusers runs whose export would crash or differ from it (a helper's
        # probe of the family's configs found each).
        (
            lambda p: _edit_json(p / "model_index.json", vae=["diffusers", "AutoencoderTiny"]),
            "vae is AutoencoderTiny; supported: AutoencoderKL",
        ),
        (
            lambda p: _edit_json(
                p / "model_index.json", text_encoder=["transformers", "CLIPTextModelWithProjection"]
            ),
            "text_encoder is CLIPTextModelWithProjection; supported: CLIPTextModel",
        ),
        (
            lambda p: _edit_json(p / "text_encoder" / "config.json", use_attention_mask=True),
            "text_encoder masks the prompt's padding (use_attention_mask true)",
        ),
        (
            lambda p: _edit_json(p / "unet" / "config.json", num_class_embeds=10),
            "unet takes class labels (class_embed_type / num_class_embeds)",
        ),
        (
            lambda p: _edit_json(p / "unet" / "config.json", addition_embed_type="text"),
            "unet takes added embeddings (addition_embed_type 'text')",
        ),
        (
            lambda p: _edit_json(
                p / "unet" / "config.json",
                up_block_types=["ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"],
            ),
            "unet has ResnetUpsampleBlock2D, SimpleCrossAttnUpBlock2D blocks, which fail at odd",
        ),
    ],
    ids=[
        "missing-component",
        "pickle-only",
        "unexpected-channels",
        "sdxl",
        "not-diffusers",
        "tiny-vae",
        "text-projection",
        "attention-mask",
        "class-labels",
        "added-embeddings",
        "odd-side-blocks",
    ],
)
def test_unsupported_folder_fails_with_one_line(
    tiny_preset: Path, tmp_path: Path, break_it, message: str
) -> None:
    folder = _copy_pipeline(tiny_preset, tmp_path)
    break_it(folder)
    with pytest.raises(UnsupportedCheckpointError, match=None) as caught:
        discover_pipelines([folder])
    assert message in str(caught.value)
    result = _run_export(str(folder), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_a_guidance_embedding_is_refused_where_diffusers_would_use_it(
    tiny_preset: Path, tmp_path: Path
) -> None:
    """An LCM-distilled UNet (time_cond_proj_dim): diffusers' img2img embeds the guidance
    scale instead of guiding, so it is refused there; its InstructPix2Pix pipeline ignores
    the key, and so does the export."""
    for folder_name in (IMG2IMG_FOLDER, PIX2PIX_FOLDER):
        folder = tmp_path / folder_name
        shutil.copytree(tiny_preset / folder_name, folder)
        _edit_json(folder / "unet" / "config.json", time_cond_proj_dim=8)
    with pytest.raises(UnsupportedCheckpointError, match="unet takes a guidance embedding"):
        inspect_folder(tmp_path / IMG2IMG_FOLDER)
    assert inspect_folder(tmp_path / PIX2PIX_FOLDER).pipeline == PIX2PIX


def _as_variant(folder: Path, component: str, variant: str) -> None:
    for weights in (folder / component).glob("*.safetensors"):
        weights.rename(weights.with_name(f"{weights.stem}.{variant}.safetensors"))


def test_weights_only_in_a_variant_load_as_that_variant(tiny_preset: Path, tmp_path: Path) -> None:
    """A folder as diffusers' `variant="fp16"` downloads write it (model.fp16.safetensors,
    no plain file) loads with that variant; components with no variant in common are
    refused."""
    folder = _copy_pipeline(tiny_preset, tmp_path)
    plain = load_pipeline(inspect_folder(folder))
    for component in ("unet", "vae", "text_encoder"):
        _as_variant(folder, component, "fp16")
    found = inspect_folder(folder)
    assert found.variant == "fp16"
    loaded = load_pipeline(found)
    for name, weights in plain.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], weights), name

    for weights in (folder / "vae").glob("*.safetensors"):
        weights.rename(weights.with_name("diffusion_pytorch_model.ema.safetensors"))
    with pytest.raises(UnsupportedCheckpointError, match=r"no weights variant common .* vae: ema"):
        inspect_folder(folder)


def test_an_output_of_another_shape_than_the_pipelines_read_fails_the_export(
    tiny_export: Path, reference_pipelines: dict[str, Any]
) -> None:
    """Validation compares each output's shape with what the served pipelines read, not
    only with PyTorch (a text encoder with a projection returned one vector per prompt,
    and the export passed)."""
    from export.onnx_export import _wrappers
    from export.validation import validate_component

    manifest = load_manifest(tiny_export)
    spec = ComponentSpec.from_json(manifest["components"]["text_encoder"]["spec"])
    hidden = spec.outputs[0]
    claimed = replace(spec, outputs=(replace(hidden, dims=("batch", hidden.dims[-1])),))
    pipelines = {PIX2PIX: reference_pipelines["instruct_pix2pix"]}
    folders = {PIX2PIX: inspect_folder(Path(manifest["pipelines"][PIX2PIX]["source"]))}
    module = _wrappers(pipelines)["text_encoder"]
    path = tiny_export / "text_encoder" / "model.onnx"
    checkpoint = checkpoint_inputs(folders, pipelines)
    assert all(row.passed for row in validate_component(module, spec, path, checkpoint, 1e-3))
    with pytest.raises(UnsupportedCheckpointError, match=r"text_encoder: .* comes out"):
        validate_component(module, claimed, path, checkpoint, 1e-3)


def test_the_export_lets_each_torch_module_go_once_exported(
    tiny_preset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The torch weights are mapped from their files and stay resident while referenced:
    a component's module is released once it is exported and validated, so that at SD
    1.5 size one UNet's 3.4 GB, not both, is resident when the second is exported. When
    each component is exported, every module seen before is gone but the one it shares
    (a VAE's encoder and decoder; a UNet's full and shallow passes)."""
    import weakref

    from export import onnx_export

    export_component = onnx_export.export_component
    seen: dict[str, weakref.ref] = {}
    alive: dict[str, list[str]] = {}

    def watched(module: Any, spec: ComponentSpec, *args: Any, **kwargs: Any) -> Any:
        (wrapped,) = module.children()  # the diffusers module the wrapper calls
        alive[spec.name] = [name for name, ref in seen.items() if ref() not in (None, wrapped)]
        seen[spec.name] = weakref.ref(wrapped)
        return export_component(module, spec, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_component", watched)
    manifest, _ = onnx_export.export_checkpoint([tiny_preset], tmp_path / "export")
    assert manifest["validation"]["passed"]
    assert list(alive) == list(manifest["components"]) and len(alive) == 7
    assert alive == {name: [] for name in alive}


def test_the_printed_peak_is_the_exports_not_what_ran_before_it(
    tiny_preset: Path, tmp_path: Path
) -> None:
    """`make serve` builds a preset and exports it in one process: the export's peak RSS,
    recorded in the manifest and printed, starts when the export does. A process that held
    3 GB before exporting the tiny preset records far less, and says so on one line."""
    ballast_mb = 3072
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from export.onnx_export import ensure_export\n"
        f"ballast = b'x' * ({ballast_mb} * 2**20)\n"
        "del ballast\n"
        "ensure_export([Path(sys.argv[1])], Path(sys.argv[2]))\n"
    )
    output = tmp_path / "export"
    command = [sys.executable, "-c", script, str(tiny_preset), str(output)]
    printed = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    peak_mb = load_manifest(output)["peak_rss_mb"]
    assert 0 < peak_mb < ballast_mb * 0.6, peak_mb
    assert f"s, peak RSS {peak_mb:.0f} MB" in printed.splitlines()[-1]


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# Stable Diffusion 1.5's numbers.
SD15_DIMS = ModelDimensions(
    text_vocab_size=49408,
    text_hidden_size=768,
    text_max_length=77,
    latent_channels=4,
    vae_scale_factor=8,
    unet_sample_size=64,
)


def test_tensorrt_profiles_come_from_the_specs() -> None:
    specs = component_specs(SD15_DIMS)
    profile = optimization_profile(specs["unet_pix2pix"])
    assert profile["sample"] == ((1, 8, 32, 32), (3, 8, 64, 64), (6, 8, 128, 128))
    assert profile["timestep"] == ((1,), (3,), (6,))
    assert profile["encoder_hidden_states"] == ((1, 77, 768), (3, 77, 768), (6, 77, 768))
    assert optimization_profile(specs["vae_decoder"])["latent"][1] == (1, 4, 64, 64)
    assert optimization_profile(specs["vae_encoder"])["image"][2] == (4, 3, 1024, 1024)
    assert optimization_profile(specs["text_encoder"])["input_ids"][0] == (1, 77)
    assert engine_name("unet_pix2pix", "10.5.0", "sm90") == "unet_pix2pix.trt10.5.0.sm90.plan"


@pytest.mark.parametrize("scale", [4, 8, 16])
@pytest.mark.parametrize(("trained_side", "opt_side"), [(512, 512), (128, 256), (2048, 1024)])
def test_profiles_scale_latents_by_the_vae_factor(
    scale: int, trained_side: int, opt_side: int
) -> None:
    """Pixel range 256..1024 whatever the VAE depth; opt is the trained side, within range."""
    dims = replace(SD15_DIMS, vae_scale_factor=scale, unet_sample_size=trained_side // scale)
    specs = component_specs(dims)
    sides = (256, opt_side, 1024)
    latents = tuple(side // scale for side in sides)
    unet = optimization_profile(specs["unet_pix2pix"])["sample"]
    assert [shape[2:] for shape in unet] == [(side, side) for side in latents]
    assert [shape[2:] for shape in optimization_profile(specs["vae_encoder"])["image"]] == [
        (side, side) for side in sides
    ]
    assert [shape[2:] for shape in optimization_profile(specs["vae_decoder"])["latent"]] == [
        (side, side) for side in latents
    ]


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def test_engine_builder_says_why_it_cannot_run(tiny_export: Path, tmp_path: Path) -> None:
    if _has_gpu():
        pytest.skip("this machine has a GPU; the gpu test builds engines instead")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "export.tensorrt_engines",
            str(tiny_export),
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0
    assert "cannot build TensorRT engines here: no NVIDIA GPU" in result.stderr


@pytest.mark.gpu
def test_tensorrt_engines_build_and_match_onnx(tiny_export: Path, tmp_path: Path) -> None:
    if not _has_gpu():
        pytest.skip("needs an NVIDIA GPU (nvidia-smi not found)")
    trt = pytest.importorskip("tensorrt", reason="needs the tensorrt extra")
    from export.tensorrt_engines import build_engines

    record = build_engines(tiny_export, tmp_path, fp16=True)
    assert set(record["components"]) == set(EXPORTED)
    for entry in record["components"].values():
        assert (tmp_path / entry["engine"]).stat().st_size > 0
        assert f"trt{trt.__version__}" in entry["engine"]
    assert (tmp_path / "timing.cache").stat().st_size > 0


@pytest.mark.slow
def test_sd15_export_with_external_data_validates(tmp_path: Path) -> None:
    """The full SD 1.5 shapes: UNet over 2 GB needs ONNX external data (several minutes)."""
    from export.onnx_export import export_checkpoint

    root = tmp_path / "sd15"
    # A separate process, so the 7 GB of freshly initialised weights are gone before export.
    command = [sys.executable, "-m", "export.presets", "sd15", "--output", str(root)]
    subprocess.run(command, check=True)
    manifest, rows = export_checkpoint([root], tmp_path / "onnx")
    print("\n" + format_table(rows))
    assert manifest["validation"]["passed"]
    for unet in ("unet_pix2pix", "unet_img2img"):
        entry = manifest["components"][unet]
        assert entry["external_data"]
        assert entry["files"][f"{unet}/model.onnx.data"]["bytes"] > 3_000_000_000


def test_fp16_export_keeps_fp32_io_and_validates(tiny_preset: Path, tmp_path: Path) -> None:
    import onnx

    from export.onnx_export import export_checkpoint

    manifest, rows = export_checkpoint([tiny_preset / PIX2PIX_FOLDER], tmp_path, fp16=True)
    assert manifest["precision"] == "fp16" and manifest["validation"]["passed"], rows
    model = onnx.load(str(tmp_path / "unet_pix2pix" / "model.onnx"))
    weights = {init.data_type for init in model.graph.initializer if len(init.dims) > 1}
    assert weights == {onnx.TensorProto.FLOAT16}
    # The served contract does not change with precision.
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {onnx.TensorProto.FLOAT}


def test_optimized_export_splits_every_geglu_and_validates(
    tiny_preset: Path, tmp_path: Path
) -> None:
    """`--optimize`: onnxruntime's fusions plus ours, checked against PyTorch like any export."""
    import onnx
    from diffusers import UNet2DConditionModel
    from diffusers.models.activations import GEGLU

    from export.onnx_export import export_checkpoint

    manifest, rows = export_checkpoint([tiny_preset / PIX2PIX_FOLDER], tmp_path, optimize=True)
    assert manifest["optimized"] and manifest["validation"]["passed"], rows
    unet = UNet2DConditionModel.from_pretrained(tiny_preset / PIX2PIX_FOLDER / "unet")
    geglus = sum(isinstance(module, GEGLU) for module in unet.modules())
    assert geglus > 0
    fused = manifest["components"]["unet_pix2pix"]["fused_ops"]
    assert fused["BiasGelu"] == geglus
    assert fused["MultiHeadAttention"] > 0
    # Slower than LayerNormalization + Add on CPU, so left unfused in the UNet.
    assert "SkipLayerNormalization" not in fused
    graph = onnx.load(str(tmp_path / "unet_pix2pix" / "model.onnx")).graph
    ops = [node.op_type for node in graph.node]
    assert "Gelu" not in ops and "Attention" not in ops
    # The text encoder keeps its own fusions.
    assert manifest["components"]["text_encoder"]["fused_ops"]


def test_fusing_a_graph_with_external_weights_gives_the_same_graph(
    tiny_export: Path, tmp_path: Path
) -> None:
    """A UNet over 2 GB is traced with its weights in files of their own, one per tensor;
    the fusions leave them there and read only those they rewrite (export/onnx_optimize.py).
    The result is the graph fused from the weights in memory, with every weight loaded."""
    import os

    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    from export.onnx_optimize import optimize_component

    single = tiny_export / "unet_pix2pix" / "model.onnx"
    split = tmp_path / "traced" / "model.onnx"
    split.parent.mkdir()
    onnx.save_model(
        onnx.load(str(single)),
        str(split),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=1024,
    )
    assert len(list(split.parent.iterdir())) > 10
    working_directory = os.getcwd()

    from_memory, counts = optimize_component(single, "unet_pix2pix")
    from_files, counts_from_files = optimize_component(split, "unet_pix2pix")

    assert os.getcwd() == working_directory
    assert counts_from_files == counts and counts["MultiHeadAttention"] > 0
    assert [n.SerializeToString() for n in from_files.graph.node] == [
        n.SerializeToString() for n in from_memory.graph.node
    ]
    weights = {i.name: i for i in from_memory.graph.initializer}
    assert sorted(weights) == sorted(i.name for i in from_files.graph.initializer)
    for tensor in from_files.graph.initializer:
        assert not uses_external_data(tensor), tensor.name
        expected = numpy_helper.to_array(weights[tensor.name])
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), expected)


def _geglu_graph(approximate: str) -> Any:
    """x @ W + b, chunked in two on the last axis, value * gelu(gate): diffusers' GEGLU."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    width = 6
    constants = {
        "W": rng.standard_normal((4, 2 * width)).astype(np.float32),
        "b": rng.standard_normal(2 * width).astype(np.float32),
        "zero": np.array([0], np.int64),
        "half": np.array([width], np.int64),
        "whole": np.array([2 * width], np.int64),
        "last": np.array([-1], np.int64),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xW"], "proj"),
        helper.make_node("Add", ["b", "xW"], ["h"], "bias"),
        helper.make_node("Slice", ["h", "zero", "half", "last"], ["value"], "value"),
        helper.make_node("Slice", ["h", "half", "whole", "last"], ["gate"], "gate"),
        helper.make_node("Gelu", ["gate"], ["gelu"], "gelu", approximate=approximate),
        helper.make_node("Mul", ["value", "gelu"], ["y"], "mul"),
    ]
    graph = helper.make_graph(
        nodes,
        "geglu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, width])],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


@pytest.mark.parametrize(("approximate", "rewritten"), [("none", 1), ("tanh", 0)])
def test_geglu_split_computes_the_same(approximate: str, rewritten: int) -> None:
    from onnx import helper
    from onnxruntime.transformers.onnx_model import OnnxModel

    from export.onnx_optimize import MS_DOMAIN, split_geglu

    original = _geglu_graph(approximate)
    model = OnnxModel(_geglu_graph(approximate))
    assert split_geglu(model) == rewritten
    ops = sorted(node.op_type for node in model.nodes())
    if rewritten:
        model.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        assert ops == ["Add", "BiasGelu", "MatMul", "MatMul", "Mul"]
    else:  # BiasGelu is the exact Gelu: the tanh approximation stays as it is
        assert ops == ["Add", "Gelu", "MatMul", "Mul", "Slice", "Slice"]
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    want, got = (
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x}
        )[0]
        for m in (original, model.model)
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_preset_command_writes_over_its_own_folder_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder of someone's files is refused and kept; a damaged preset record is a
    preset to build again; a seed torch cannot take is refused by name."""
    from export import presets

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    assert presets.main(["tiny", "--output", str(theirs)]) == 2
    assert "holds files that are not a preset (no preset.json)" in capsys.readouterr().err
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / presets.PRESET_RECORD).write_text('{"preset": "ti')
    assert presets.main(["tiny", "--output", str(damaged)]) == 0
    assert (presets.preset_record(damaged) or {}).get("preset") == "tiny"

    with pytest.raises(SystemExit):
        presets.main(["tiny", "--output", str(damaged), "--seed", str(2**70)])
    assert f"--seed {2**70}: allowed 0..{2**63 - 1}" in capsys.readouterr().err
