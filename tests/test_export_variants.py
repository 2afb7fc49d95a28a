"""The export on randomly configured Stable Diffusion family checkpoints (tests/variants.py).

Each variant is built, exported and validated once per module; the tests then read what
the export derived against the variant's own configs, feed the exported text encoder what
the server's tokenizer emits, run the variant's diffusers pipelines, and serve it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tritonclient.grpc import InferenceServerClient

from edit_pipeline.preprocess import decode_image
from export.checkpoint import UnsupportedCheckpointError, inspect_folder, load_pipeline
from export.components import COMPONENTS, ComponentSpec
from export.onnx_export import MANIFEST, export_checkpoint, load_manifest
from export.presets import IMG2IMG_FOLDER, PIX2PIX_FOLDER, Preset, write_pipelines
from export.tokenizer import VOCAB_SIZE, save_clip_tokenizer
from export.validation import TOLERANCE, onnx_session
from model_repository.builder import build_repository
from model_repository.configs import RepositoryOptions
from serving.tritonserver import TritonServer
from tests.conftest import LEAN, TEST_OPTIONS
from tests.serving import edit, photo, png_bytes
from tests.variants import (
    VARIANT_SEEDS,
    ExportedVariant,
    build_and_export,
    describe,
    draw_variant,
    vae_scale_factor,
)

# Long enough to be truncated at every drawn prompt length; accents are byte-level tokens.
PROMPTS = [
    "turn the lighthouse into a watercolour painting at dusk, " * 6,
    "",
    "façade in crème brûlée colours",
]


@pytest.fixture(scope="module", params=VARIANT_SEEDS, ids=lambda seed: f"seed{seed}")
def exported_variant(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    summary: Callable[[str, str], None],
) -> ExportedVariant:
    """One variant's diffusers folders (`root`) and its validated export (`export_dir`)."""
    seed = request.param
    variant = build_and_export(seed, tmp_path_factory.mktemp(f"variant{seed}"))
    worst = max(row.max_rel for row in variant.rows)
    summary(
        "ONNX export of randomly configured SD-family variants",
        f"seed {seed}: build {variant.build_seconds:.1f} s, export + validation "
        f"{variant.export_seconds:.1f} s, worst max rel {worst:.1e}; {describe(variant.preset)}",
    )
    return variant


def _config(pipeline_dir: Path, component: str) -> dict:
    return json.loads((pipeline_dir / component / "config.json").read_text())


def test_variant_exports_and_validates(exported_variant: ExportedVariant) -> None:
    manifest = load_manifest(exported_variant.export_dir)  # refuses a failed validation
    rows = manifest["validation"]["rows"]
    shallow = [e["shallow_unet"] for e in manifest["pipelines"].values() if e["shallow_unet"]]
    assert sorted(row["component"] for row in rows) == sorted(2 * (*COMPONENTS, *shallow))
    failing = [row for row in rows if not row["max_rel"] <= TOLERANCE["fp32"]]
    assert not failing, failing
    for name, entry in manifest["components"].items():
        assert (exported_variant.export_dir / entry["model"]).is_file(), name


def test_manifest_dimensions_match_the_configs(exported_variant: ExportedVariant) -> None:
    """Dimensions and tensor shapes read back against the variant's own config files."""
    from transformers import CLIPTokenizer

    manifest = exported_variant.manifest
    pix2pix_dir = exported_variant.root / PIX2PIX_FOLDER
    text = _config(pix2pix_dir, "text_encoder")
    vae = _config(pix2pix_dir, "vae")
    unets = {
        "unet_pix2pix": _config(pix2pix_dir, "unet"),
        "unet_img2img": _config(exported_variant.root / IMG2IMG_FOLDER, "unet"),
    }
    tokenizer = CLIPTokenizer.from_pretrained(exported_variant.export_dir / "tokenizer")
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    assert manifest["dimensions"] == {
        "text_vocab_size": text["vocab_size"],
        "text_hidden_size": text["hidden_size"],
        "text_max_length": tokenizer.model_max_length,
        "latent_channels": vae["latent_channels"],
        "vae_scale_factor": scale,
        "unet_sample_size": unets["unet_pix2pix"]["sample_size"],
    }
    assert len(tokenizer) == text["vocab_size"]
    assert tokenizer.model_max_length <= text["max_position_embeddings"]

    specs = {
        name: ComponentSpec.from_json(entry["spec"])
        for name, entry in manifest["components"].items()
    }
    for name, unet in unets.items():
        sample, _, context = specs[name].inputs
        assert sample.dims[1] == unet["in_channels"]
        assert specs[name].outputs[0].dims[1] == unet["out_channels"] == vae["latent_channels"]
        assert context.dims[1:] == (tokenizer.model_max_length, text["hidden_size"])
        width = unet["cross_attention_dim"]
        widths = {width} if isinstance(width, int) else set(width)
        assert widths == {text["hidden_size"]}
    assert unets["unet_pix2pix"]["in_channels"] == 2 * vae["latent_channels"]

    # The exported VAE maps latents of 5x7 to images of 5x7 times the scale factor and back.
    export_dir = exported_variant.export_dir
    image = np.zeros((1, 3, 5 * scale, 7 * scale), np.float32)
    mean, _ = onnx_session(export_dir / "vae_encoder" / "model.onnx").run(None, {"image": image})
    assert mean.shape == (1, vae["latent_channels"], 5, 7)
    (decoded,) = onnx_session(export_dir / "vae_decoder" / "model.onnx").run(None, {"latent": mean})
    assert decoded.shape == image.shape


def test_served_tokenizer_feeds_the_exported_text_encoder(
    exported_variant: ExportedVariant,
) -> None:
    """Ids of the exported tokenizer, as the server loads it, give diffusers' prompt embeddings."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(exported_variant.export_dir / "tokenizer")
    ids = tokenizer(
        PROMPTS,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="np",
    ).input_ids
    assert ids.max() < exported_variant.manifest["dimensions"]["text_vocab_size"]
    session = onnx_session(exported_variant.export_dir / "text_encoder" / "model.onnx")
    (embeddings,) = session.run(None, {"input_ids": ids.astype(np.int32)})
    pipeline = load_pipeline(inspect_folder(exported_variant.root / IMG2IMG_FOLDER))
    with torch.inference_mode():
        expected, _ = pipeline.encode_prompt(PROMPTS, "cpu", 1, False)
    np.testing.assert_allclose(embeddings, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_variant_pipelines_run_in_diffusers(exported_variant: ExportedVariant) -> None:
    """diffusers edits at sides floored to the manifest's VAE scale factor."""
    scale = exported_variant.manifest["dimensions"]["vae_scale_factor"]
    # Sides 7 and 5 latents plus a remainder that diffusers floors away.
    width, height = 7 * scale + scale // 2, 5 * scale + 1
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    pix2pix = load_pipeline(inspect_folder(exported_variant.root / PIX2PIX_FOLDER))
    img2img = load_pipeline(inspect_folder(exported_variant.root / IMG2IMG_FOLDER))
    assert pix2pix.vae_scale_factor == img2img.vae_scale_factor == scale
    common = {"image": image, "output_type": "np", "num_inference_steps": 3}
    edits = {
        "instruct_pix2pix": pix2pix(
            PROMPTS[0], generator=torch.Generator().manual_seed(0), **common
        ).images,
        "img2img": img2img(
            PROMPTS[2], strength=0.7, generator=torch.Generator().manual_seed(0), **common
        ).images,
    }
    for name, edited in edits.items():
        assert edited.shape == (1, 5 * scale, 7 * scale, 3), name
        assert np.isfinite(edited).all(), name


def test_a_served_edit_equals_diffusers(
    exported_variant: ExportedVariant, tmp_path: Path, summary: Callable[[str, str], None]
) -> None:
    """Both pipelines of the variant through a real tritonserver, against its diffusers
    pipelines on the same seed: the same image within 2 grey levels, at the size the
    server floors to the variant's VAE factor."""

    factor = vae_scale_factor(exported_variant.preset)
    repository = tmp_path / "repository"
    # Unary edits only: no streaming models, one edit at a time.
    options = RepositoryOptions(**{**TEST_OPTIONS, **LEAN, "pipelines": ()})
    build_repository(exported_variant.export_dir, repository, options)
    upload = png_bytes(photo(70, 54))
    expected_image = decode_image(upload, options.image_limits(factor))
    differences = {}
    with TritonServer(repository, log_file=tmp_path / "tritonserver.log") as server:
        server.wait_ready(timeout_s=300)
        client = InferenceServerClient(server.grpc_url)
        for pipeline, folder in (("instruct_pix2pix", PIX2PIX_FOLDER), ("img2img", IMG2IMG_FOLDER)):
            served = edit(
                client, pipeline, image=upload, prompt=PROMPTS[2], num_inference_steps=4, seed=8
            )
            reference = load_pipeline(inspect_folder(exported_variant.root / folder))
            strength = {} if pipeline == "instruct_pix2pix" else {"strength": 0.8}
            expected = reference(
                PROMPTS[2],
                image=expected_image,
                num_inference_steps=4,
                generator=torch.Generator("cpu").manual_seed(8),
                **strength,
            ).images[0]
            want = np.asarray(expected, dtype=np.int16)
            got = served.pixels.astype(np.int16)
            assert got.shape == want.shape == (expected_image.height, expected_image.width, 3)
            differences[pipeline] = int(np.abs(got - want).max())
        client.close()
    summary(
        "served edits of SD-family variants against diffusers (max |difference|, grey levels)",
        f"VAE x{factor}, {expected_image.width}x{expected_image.height}: "
        + ", ".join(f"{p} {d}" for p, d in differences.items()),
    )
    assert max(differences.values()) <= 2


def test_variants_cover_the_family() -> None:
    """The seeds' draws span what the export must not assume (sizes, ids, depths)."""
    presets = [draw_variant(seed) for seed in VARIANT_SEEDS]

    def drawn(value: Callable[[Preset], object]) -> set[object]:
        return {value(p) for p in presets}

    assert len(presets) >= 4
    assert drawn(vae_scale_factor) >= {4, 8, 16}
    assert drawn(lambda p: len(p.unet["block_out_channels"])) == {2, 3, 4}
    assert drawn(lambda p: p.unet["layers_per_block"]) == {1, 2}
    assert drawn(lambda p: p.vae["layers_per_block"]) == {1, 2}
    assert len(drawn(lambda p: p.vae["latent_channels"])) >= 2
    vocab_sizes = drawn(lambda p: p.text_encoder["vocab_size"])
    assert len(vocab_sizes) >= 3 and VOCAB_SIZE in vocab_sizes and min(vocab_sizes) <= 1000
    assert len(drawn(lambda p: p.text_encoder["hidden_size"])) >= 3
    # Heads as one number and as different numbers per block.
    heads = [p.unet["attention_head_dim"] for p in presets]
    assert any(isinstance(h, int) for h in heads)
    assert any(isinstance(h, list) and len(set(h)) > 1 for h in heads)
    assert drawn(lambda p: isinstance(p.unet["cross_attention_dim"], list)) == {True, False}
    assert drawn(lambda p: p.unet["use_linear_projection"]) == {True, False}
    assert any(p.tokenizer_max_length < p.text_encoder["max_position_embeddings"] for p in presets)
    assert len(drawn(lambda p: p.pad_token)) == 2
    # SD 1.5's legacy special ids in the text encoder config, and the tokenizer's own.
    assert drawn(lambda p: p.text_encoder["bos_token_id"] == 0) == {True, False}


@pytest.fixture(scope="module")
def base_variant(tmp_path_factory: pytest.TempPathFactory) -> tuple[Preset, Path]:
    """The first variant's diffusers folders, for copies that break one thing."""
    preset = draw_variant(VARIANT_SEEDS[0])
    root = tmp_path_factory.mktemp("base-variant") / preset.name
    write_pipelines(preset, root, seed=VARIANT_SEEDS[0])
    return preset, root


def test_cross_attention_width_other_than_the_text_encoders_fails_in_one_line(
    base_variant: tuple[Preset, Path], tmp_path: Path
) -> None:
    preset, _ = base_variant
    width = preset.text_encoder["hidden_size"]
    mismatched = replace(preset, unet={**preset.unet, "cross_attention_dim": width + 8})
    root = tmp_path / "mismatched"
    write_pipelines(mismatched, root, seed=0)

    # diffusers loads it and fails only when the UNet meets the prompt embeddings.
    from diffusers import StableDiffusionImg2ImgPipeline

    pipeline = StableDiffusionImg2ImgPipeline.from_pretrained(root / IMG2IMG_FOLDER)
    side = 8 * vae_scale_factor(preset)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        pipeline(
            "a photo", image=Image.new("RGB", (side, side)), num_inference_steps=2, strength=1.0
        )

    message = f"cross-attention width {width + 8} differs from the text encoder's hidden size"
    result = subprocess.run(
        [sys.executable, "-m", "export.onnx_export", str(root), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "out" / MANIFEST).exists()


def _lengthen_tokenizer(pipeline_dir: Path, preset: Preset) -> None:
    config_path = pipeline_dir / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["model_max_length"] = preset.text_encoder["max_position_embeddings"] + 1
    config_path.write_text(json.dumps(config))


def _widen_tokenizer(pipeline_dir: Path, preset: Preset) -> None:
    shutil.rmtree(pipeline_dir / "tokenizer")
    save_clip_tokenizer(
        pipeline_dir / "tokenizer",
        vocab_size=preset.text_encoder["vocab_size"] + 10,
        model_max_length=preset.tokenizer_max_length,
        pad_token=preset.pad_token,
    )


@pytest.mark.parametrize(
    ("break_tokenizer", "message"),
    [
        (_lengthen_tokenizer, "the tokenizer pads prompts to {positions_plus_one} tokens"),
        (_widen_tokenizer, "the tokenizer has {vocab_plus_ten} tokens but the text encoder"),
    ],
    ids=["longer-than-positions", "more-ids-than-embeddings"],
)
def test_tokenizer_that_the_text_encoder_cannot_take_fails_in_one_line(
    base_variant: tuple[Preset, Path], tmp_path: Path, break_tokenizer, message: str
) -> None:
    preset, base_root = base_variant
    root = tmp_path / "broken"
    shutil.copytree(base_root, root)
    for folder in (PIX2PIX_FOLDER, IMG2IMG_FOLDER):
        break_tokenizer(root / folder, preset)
    expected = message.format(
        positions_plus_one=preset.text_encoder["max_position_embeddings"] + 1,
        vocab_plus_ten=preset.text_encoder["vocab_size"] + 10,
    )
    with pytest.raises(UnsupportedCheckpointError) as caught:
        export_checkpoint([root], tmp_path / "out")
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out" / MANIFEST).exists()
