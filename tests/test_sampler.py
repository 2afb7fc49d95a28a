"""The sampler loop without Triton: temperature, guidance batch sizes, every scheduler.

The UNet here is the exported ONNX file in onnxruntime, as the served UNet model runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edit_pipeline.onnxruntime_component import OnnxComponent
from edit_pipeline.sampler import (
    SCHEDULER_CLASSES,
    Sampler,
    SamplerInputs,
    SamplerTrace,
    first_step,
    instance_device,
    make_scheduler,
)
from pix2pix_client.contract import IMG2IMG, INSTRUCT_PIX2PIX, SCHEDULERS, InvalidArgumentError

SCALING = 0.18215


class RecordingUNet:
    """The exported UNet in onnxruntime, recording the batch of every call."""

    def __init__(self, model_path: Path) -> None:
        self.component = OnnxComponent(model_path, intra_op_threads=1)
        self.batches: list[int] = []

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor
    ) -> torch.Tensor:
        self.batches.append(sample.shape[0])
        assert timestep.shape == (sample.shape[0],) and embeds.shape[0] == sample.shape[0]
        assert all(t.dtype == torch.float32 for t in (sample, timestep, embeds))
        return torch.from_numpy(
            self.component.run(
                {
                    "sample": sample.numpy(),
                    "timestep": timestep.numpy(),
                    "encoder_hidden_states": embeds.numpy(),
                }
            )["noise_pred"]
        )


def _sampler(tiny_export: Path, pipeline: str) -> tuple[Sampler, RecordingUNet]:
    unet_name = "unet_pix2pix" if pipeline == INSTRUCT_PIX2PIX else "unet_img2img"
    unet = RecordingUNet(tiny_export / unet_name / "model.onnx")
    config = json.loads(
        (tiny_export / "schedulers" / pipeline / "scheduler_config.json").read_text()
    )
    return Sampler(pipeline, config, SCALING, unet), unet


def _inputs(**overrides: object) -> SamplerInputs:
    rng = np.random.default_rng(0)
    values: dict[str, object] = {
        "prompt_embeds": rng.standard_normal((2, 77, 32)).astype(np.float32),
        "latent_mean": rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
        "latent_std": np.full((1, 4, 8, 8), 0.1, dtype=np.float32),
        "num_inference_steps": 10,
        "guidance_scale": 7.5,
        "image_guidance_scale": 1.5,
        "temperature": 1.0,
        "seed": 7,
        "scheduler": None,
    }
    values.update(overrides)
    return SamplerInputs(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("steps", "temperature", "expected"),
    [(20, 1.0, 0), (20, 0.5, 10), (20, 0.7, 6), (10, 0.25, 8), (2, 0.1, 1), (1000, 0.1, 900)],
)
def test_first_step_follows_design(steps: int, temperature: float, expected: int) -> None:
    # t_start = N - int(N * temperature), with at least one denoising step left to run.
    assert first_step(steps, temperature) == expected


@pytest.mark.parametrize("temperature", [0.3, 0.6])
def test_pix2pix_temperature_starts_from_noised_image_latents(
    tiny_export: Path, temperature: float
) -> None:
    sampler, unet = _sampler(tiny_export, INSTRUCT_PIX2PIX)
    inputs = _inputs(temperature=temperature)
    trace = SamplerTrace(timesteps=[], unet_batch=0)
    sampler(inputs, trace)

    steps = inputs.num_inference_steps
    start = steps - int(steps * temperature)
    reference = make_scheduler(None, sampler.scheduler_config)
    reference.set_timesteps(steps)
    expected_timesteps = reference.timesteps[start:]
    assert trace.timesteps == [float(t) for t in expected_timesteps]
    assert len(unet.batches) == steps - start

    # Initial latents: the *scaled* image latents noised to the first timestep run, with
    # the seed's first normal draw as the noise.
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(inputs.seed))
    reference.set_begin_index(start)
    expected = reference.add_noise(
        torch.from_numpy(inputs.latent_mean) * SCALING, noise, expected_timesteps[:1]
    )
    np.testing.assert_allclose(trace.initial_latents, expected.numpy(), rtol=1e-6, atol=1e-6)


def test_pix2pix_temperature_one_is_the_standard_start(tiny_export: Path) -> None:
    sampler, _ = _sampler(tiny_export, INSTRUCT_PIX2PIX)
    inputs = _inputs(temperature=1.0)
    trace = SamplerTrace(timesteps=[], unet_batch=0)
    sampler(inputs, trace)
    reference = make_scheduler(None, sampler.scheduler_config)
    reference.set_timesteps(inputs.num_inference_steps)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(inputs.seed))
    assert trace.timesteps == [float(t) for t in reference.timesteps]
    np.testing.assert_allclose(
        trace.initial_latents, (noise * reference.init_noise_sigma).numpy(), rtol=1e-6
    )


def test_pix2pix_lower_temperature_stays_closer_to_the_image(tiny_export: Path) -> None:
    sampler, _ = _sampler(tiny_export, INSTRUCT_PIX2PIX)
    inputs = _inputs()
    target = inputs.latent_mean
    distances = [
        float(np.abs(sampler(_inputs(temperature=t)).numpy() - target).mean()) for t in (0.1, 1.0)
    ]
    assert distances[0] < distances[1]


@pytest.mark.parametrize(
    ("pipeline", "overrides", "batch"),
    [
        (INSTRUCT_PIX2PIX, {}, 3),
        (INSTRUCT_PIX2PIX, {"guidance_scale": 1.0}, 1),
        (INSTRUCT_PIX2PIX, {"image_guidance_scale": 0.9}, 1),
        (IMG2IMG, {}, 2),
        (IMG2IMG, {"guidance_scale": 1.0}, 1),
    ],
    ids=[
        "pix2pix-guided",
        "pix2pix-text-off",
        "pix2pix-image-off",
        "img2img-guided",
        "img2img-off",
    ],
)
def test_unet_batch_shrinks_when_guidance_is_off(
    tiny_export: Path, pipeline: str, overrides: dict, batch: int
) -> None:
    sampler, unet = _sampler(tiny_export, pipeline)
    sampler(_inputs(num_inference_steps=4, **overrides))
    assert set(unet.batches) == {batch}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("pipeline", [INSTRUCT_PIX2PIX, IMG2IMG])
def test_every_scheduler_runs_and_is_seeded(
    tiny_export: Path, pipeline: str, scheduler: str
) -> None:
    sampler, unet = _sampler(tiny_export, pipeline)
    inputs = _inputs(num_inference_steps=4, scheduler=scheduler, temperature=0.9)
    first = sampler(inputs)
    second = sampler(inputs)
    assert first.shape == (1, 4, 8, 8) and torch.isfinite(first).all()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert (
        type(make_scheduler(scheduler, sampler.scheduler_config)).__name__
        == (SCHEDULER_CLASSES[scheduler])
    )
    assert unet.batches


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("pipeline", [INSTRUCT_PIX2PIX, IMG2IMG])
def test_every_scheduler_plans_the_fewest_steps_or_says_how_many_it_needs(
    tiny_export: Path, pipeline: str, scheduler: str
) -> None:
    """The contract allows 2 steps. PNDM made from a config without skip_prk_steps (the
    InstructPix2Pix checkpoints', whose own scheduler is Euler ancestral) warms up with
    Runge-Kutta steps and cannot plan fewer than 4: diffusers raised a broadcasting error,
    served as INTERNAL. It is the client's choice, so it is refused naming the field."""
    sampler, _ = _sampler(tiny_export, pipeline)
    if scheduler == "pndm" and not sampler.scheduler_config.get("skip_prk_steps"):
        with pytest.raises(InvalidArgumentError) as refused:
            sampler.check_schedule(scheduler, 3)
        assert refused.value.field == "num_inference_steps"
        assert str(refused.value) == (
            "num_inference_steps=3: the scheduler pndm, with this checkpoint's settings, "
            "cannot plan so few steps: allowed 4..1000"
        )
        sampler.check_schedule(scheduler, 4)
        return
    sampler.check_schedule(scheduler, 2)
    sampler(_inputs(num_inference_steps=2, scheduler=scheduler))


def test_different_seeds_give_different_latents(tiny_export: Path) -> None:
    sampler, _ = _sampler(tiny_export, INSTRUCT_PIX2PIX)
    assert not torch.allclose(sampler(_inputs(seed=1)), sampler(_inputs(seed=2)))


def test_instance_device_follows_the_triton_instance() -> None:
    assert instance_device("CPU", "0") == torch.device("cpu")
    assert instance_device("GPU", "1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="model_instance_kind='MODEL': allowed CPU, GPU"):
        instance_device("MODEL", "0")


def test_bound_run_reads_and_writes_torch_tensors_in_place(tiny_export: Path) -> None:
    # The bare baseline's UNet call: onnxruntime I/O binding on the tensors' own memory
    # (CUDA on a GPU; here CPU), the same numbers as a plain run.
    component = OnnxComponent(tiny_export / "unet_pix2pix" / "model.onnx", intra_op_threads=1)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn((3, 8, 8, 8), generator=generator),
        "timestep": torch.tensor([981.0, 981.0, 981.0]),
        "encoder_hidden_states": torch.randn((3, 77, 32), generator=generator),
    }
    noise_pred = torch.full((3, 4, 8, 8), float("nan"))
    address = noise_pred.data_ptr()
    component.run_bound(inputs, {"noise_pred": noise_pred})
    expected = component.run({name: t.numpy() for name, t in inputs.items()})["noise_pred"]
    assert noise_pred.data_ptr() == address
    np.testing.assert_array_equal(noise_pred.numpy(), expected)
    with pytest.raises(ValueError, match="sample: onnxruntime binds contiguous tensors only"):
        component.run_bound(
            {**inputs, "sample": inputs["sample"].transpose(2, 3)}, {"noise_pred": noise_pred}
        )


@pytest.mark.gpu
@pytest.mark.parametrize("pipeline", [INSTRUCT_PIX2PIX, IMG2IMG])
def test_sampler_on_cuda_keeps_tensors_there_and_matches_the_cpu(
    tiny_export: Path, pipeline: str
) -> None:
    # Runs only with a GPU (`make test-gpu`): the same loop on cuda, the UNet fed through
    # I/O binding with onnxruntime's CUDA provider, every call's tensors on the GPU.
    import onnxruntime as ort

    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device (a CPU build of torch, or no GPU)")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    unet_name = "unet_pix2pix" if pipeline == INSTRUCT_PIX2PIX else "unet_img2img"
    component = OnnxComponent(
        tiny_export / unet_name / "model.onnx", providers=("CUDAExecutionProvider",)
    )
    devices: set[str] = set()

    def unet(sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        devices.update(t.device.type for t in (sample, timestep, embeds))
        noise_pred = torch.empty((sample.shape[0], 4, *sample.shape[2:]), device=sample.device)
        component.run_bound(
            {"sample": sample, "timestep": timestep, "encoder_hidden_states": embeds},
            {"noise_pred": noise_pred},
        )
        return noise_pred

    cpu_sampler, _ = _sampler(tiny_export, pipeline)
    config = cpu_sampler.scheduler_config
    cuda_sampler = Sampler(pipeline, config, SCALING, unet, "cuda")
    inputs = _inputs(num_inference_steps=6, scheduler="euler_a")
    on_cuda = cuda_sampler(inputs)
    assert on_cuda.is_cuda and devices == {"cuda"}
    torch.testing.assert_close(on_cuda.cpu(), cpu_sampler(inputs), rtol=1e-3, atol=1e-3)
