"""Reused UNet work (DeepCache; export/unet_reuse.py, `cache_interval`).

The cut is checked where it can be exact: a shallow pass fed the deep features of a full
pass on the same inputs returns that pass's prediction, in PyTorch bit for bit and in the
exported ONNX files within float error, on three UNet architectures. The sampler's
schedule is checked with a recording UNet; the served edits through a real tritonserver:
interval 1 is today's output byte for byte, longer intervals stay close to it, and edits
at different intervals sent together each get their own result.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from benchmarks.fidelity import psnr
from edit_pipeline.sampler import ReusedUNet, Sampler, SamplerInputs
from export import unet_reuse
from export.components import DEEP_FEATURES, UNET_FOR_PIPELINE, shallow_unet
from export.onnx_export import load_manifest
from export.presets import IMG2IMG_FOLDER, PIX2PIX_FOLDER
from pix2pix_client.contract import INSTRUCT_PIX2PIX
from tests.serving import edit, photo, png_bytes
from tests.variants import VARIANT_SEEDS, build_and_export, draw_variant

TOY_UNET = Path(__file__).resolve().parents[1] / "models" / "toy" / "instruct-pix2pix" / "unet"


def _unet(folder: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder).eval()


@pytest.mark.parametrize("which", ["tiny-pix2pix", "tiny-img2img", "toy"])
def test_shallow_pass_on_a_full_pass_features_is_that_pass(tiny_preset: Path, which: str) -> None:
    folder = {
        "tiny-pix2pix": tiny_preset / PIX2PIX_FOLDER / "unet",
        "tiny-img2img": tiny_preset / IMG2IMG_FOLDER / "unet",
        "toy": TOY_UNET,  # one sub-block per level, three levels, attention at the top
    }[which]
    unet = _unet(folder)
    assert unet_reuse.reuse_unsupported_reason(unet) is None
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(3, unet.config.in_channels, 13, 17, generator=generator)
    timestep = torch.tensor([981.0, 500.0, 21.0])
    context = torch.randn(3, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.inference_mode():
        reference = unet(sample, timestep, context, return_dict=False)[0]
        noise_pred, deep = unet_reuse.full_pass(unet, sample, timestep, context)
        shallow = unet_reuse.shallow_pass(unet, sample, timestep, context, deep)
    inputs = unet_reuse.shallow_pass_inputs(unet)
    assert deep.shape == (3, inputs.deep_channels, 13, 17)
    torch.testing.assert_close(noise_pred, reference, rtol=0, atol=0)
    torch.testing.assert_close(shallow, reference, rtol=0, atol=0)


def _two_level_unet(down: tuple[str, str], up: tuple[str, str]):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=1,
        attention_head_dim=4,
        cross_attention_dim=16,
        norm_num_groups=8,
    ).eval()


def test_the_cut_runs_attention_to_the_picture_as_its_block_does() -> None:
    """A UNet whose outermost blocks attend to the picture itself (AttnDownBlock2D,
    AttnUpBlock2D) and not to the prompt: its shallow pass runs that attention and takes no
    prompt embeddings."""
    unet = _two_level_unet(
        ("AttnDownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "AttnUpBlock2D")
    )
    assert unet_reuse.reuse_unsupported_reason(unet) is None
    assert not unet_reuse.shallow_pass_inputs(unet).cross_attends
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 12, generator=generator)
    timestep = torch.tensor([700.0, 30.0])
    context = torch.randn(2, 7, 16, generator=generator)
    with torch.inference_mode():
        reference = unet(sample, timestep, context, return_dict=False)[0]
        _, deep = unet_reuse.full_pass(unet, sample, timestep, context)
        shallow = unet_reuse.shallow_pass(unet, sample, timestep, None, deep)
    torch.testing.assert_close(shallow, reference, rtol=0, atol=0)


def test_a_checkpoint_attending_to_the_picture_exports_and_validates_both_passes(
    tmp_path: Path,
) -> None:
    """A randomly sized checkpoint of the family whose outermost UNet blocks attend to the
    picture: the export cuts both UNets, validates every pass against PyTorch, and the
    exported shallow pass takes no prompt embeddings."""
    seed = VARIANT_SEEDS[0]
    preset = draw_variant(seed)
    down, up = list(preset.unet["down_block_types"]), list(preset.unet["up_block_types"])
    down[0], up[-1] = "AttnDownBlock2D", "AttnUpBlock2D"
    unet = preset.unet | {"down_block_types": down, "up_block_types": up}
    variant = build_and_export(seed, tmp_path, replace(preset, unet=unet))
    manifest = load_manifest(variant.export_dir)  # refuses a failed validation
    shallow = [entry["shallow_unet"] for entry in manifest["pipelines"].values()]
    assert sorted(shallow) == sorted(shallow_unet(name) for name in UNET_FOR_PIPELINE.values())
    assert {row.component for row in variant.rows} >= set(shallow)
    assert all(row.passed for row in variant.rows)
    for name in shallow:
        inputs = ort.InferenceSession(str(variant.export_dir / name / "model.onnx")).get_inputs()
        assert [i.name for i in inputs] == ["sample", "timestep", DEEP_FEATURES]


def test_blocks_the_shallow_pass_does_not_run_leave_reuse_out() -> None:
    unet = _two_level_unet(
        ("ResnetDownsampleBlock2D", "CrossAttnDownBlock2D"),
        ("CrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    )
    assert unet_reuse.reuse_unsupported_reason(unet) == (
        "its first down block is a ResnetDownsampleBlock2D, which the shallow pass does not run"
    )


def test_exported_passes_pair_up(tiny_export: Path) -> None:
    """The exported full pass's deep features, through the exported shallow pass, give the
    full pass's prediction (batch 3, odd latent sides never traced)."""
    rng = np.random.default_rng(5)
    for unet, channels in (("unet_pix2pix", 8), ("unet_img2img", 4)):
        full = ort.InferenceSession(str(tiny_export / unet / "model.onnx"))
        shallow = ort.InferenceSession(str(tiny_export / shallow_unet(unet) / "model.onnx"))
        inputs = {
            "sample": rng.standard_normal((3, channels, 11, 15), dtype=np.float32),
            "timestep": np.array([900.0, 400.0, 3.0], dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((3, 77, 32), dtype=np.float32),
        }
        noise_pred, deep = full.run(["noise_pred", DEEP_FEATURES], inputs)
        feed = {i.name: inputs.get(i.name, deep) for i in shallow.get_inputs()}
        (again,) = shallow.run(["noise_pred"], feed)
        np.testing.assert_allclose(again, noise_pred, atol=1e-5)


def test_a_single_level_unet_cannot_reuse_its_work() -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32,),
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    assert "single resolution level" in unet_reuse.reuse_unsupported_reason(unet)


class ScriptedUNet:
    """A UNet whose passes record what ran: "F" full, "K" full keeping features, "S"
    shallow (checking it got the features of the last kept pass)."""

    def __init__(self) -> None:
        self.passes: list[str] = []

    def _prediction(self, sample: torch.Tensor) -> torch.Tensor:
        return torch.zeros((sample.shape[0], 4, *sample.shape[2:]))

    def full(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor):
        self.passes.append("F")
        return self._prediction(sample)

    def keeping(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor):
        self.passes.append("K")
        return self._prediction(sample), torch.full((1,), float(len(self.passes)))

    def shallow(self, sample, timestep, embeds, deep: torch.Tensor) -> torch.Tensor:
        assert int(deep) == len(self.passes) - self.passes[::-1].index("K")
        self.passes.append("S")
        return self._prediction(sample)


@pytest.mark.parametrize(("interval", "expected"), [(1, "FFFFFFF"), (3, "KSSKSSK"), (5, "KSSSSKS")])
def test_the_sampler_runs_a_full_pass_every_interval(interval: int, expected: str) -> None:
    unet = ScriptedUNet()
    config = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000}
    sampler = Sampler(
        INSTRUCT_PIX2PIX,
        config,
        0.18215,
        unet.full,
        reused_unet=ReusedUNet(unet.keeping, unet.shallow),
    )
    inputs = SamplerInputs(
        prompt_embeds=np.zeros((2, 77, 32), np.float32),
        latent_mean=np.zeros((1, 4, 8, 8), np.float32),
        latent_std=np.ones((1, 4, 8, 8), np.float32),
        num_inference_steps=7,
        guidance_scale=7.5,
        image_guidance_scale=1.5,
        temperature=1.0,
        seed=0,
        scheduler=None,
        cache_interval=interval,
    )
    sampler(inputs)
    assert "".join(unet.passes) == expected


def test_the_sampler_without_reuse_refuses_an_interval() -> None:
    config = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000}
    sampler = Sampler(INSTRUCT_PIX2PIX, config, 0.18215, ScriptedUNet().full)
    with pytest.raises(ValueError, match="cache_interval"):
        sampler._predictor(2)


def _request(**overrides: object) -> dict[str, object]:
    return {
        "image": png_bytes(photo(96, 64)),
        "prompt": "make it snowy",
        "num_inference_steps": 10,
        "seed": 11,
        **overrides,
    }


@pytest.mark.parametrize("pipeline", ["instruct_pix2pix", "img2img"])
def test_served_interval_1_is_todays_output_and_longer_ones_stay_close(
    grpc_client, summary, pipeline: str
) -> None:
    today = edit(grpc_client, pipeline, **_request())
    assert edit(grpc_client, pipeline, **_request(cache_interval=1)).png == today.png
    for interval in (2, 3, 5):
        reused = edit(grpc_client, pipeline, **_request(cache_interval=interval))
        assert reused.png != today.png
        quality = psnr(reused.pixels, today.pixels)
        summary(
            "reused UNet work, tiny preset, 10 steps: PSNR against interval 1",
            f"{pipeline:<17} interval {interval}: {quality:5.1f} dB",
        )
        # Random weights: far from an image, but far closer than another seed's edit.
        assert quality > 20.0, (pipeline, interval, quality)


def test_edits_at_different_intervals_sent_together_get_their_own_results(
    grpc_client, tiny_server
) -> None:
    """Full and shallow passes of concurrent edits meet in the UNet's batcher: each
    request gets the outputs of its own pass."""
    import tritonclient.grpc as grpcclient

    intervals = (1, 3, 2, 5)
    alone = {
        k: edit(grpc_client, "instruct_pix2pix", **_request(cache_interval=k)).png
        for k in intervals
    }
    together: dict[int, bytes] = {}

    def send(interval: int) -> None:
        client = grpcclient.InferenceServerClient(tiny_server.grpc_url)
        try:
            together[interval] = edit(
                client, "instruct_pix2pix", **_request(cache_interval=interval)
            ).png
        finally:
            client.close()

    threads = [threading.Thread(target=send, args=(k,)) for k in intervals]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert together == alone
