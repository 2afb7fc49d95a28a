"""Retrains the toy InstructPix2Pix from scratch and writes it as a diffusers folder.

    python -m training.toy --output models/toy [--seed 0] [--threads 1]

Writes OUTPUT/instruct-pix2pix/ (a StableDiffusionInstructPix2PixPipeline folder, weights
in float16 safetensors) with training.json beside the weights: settings, thread count,
library versions, time per stage, loss curves and final losses, and the effect of each
instruction measured on held-out photos. Given the seed and the thread count the run is
deterministic as far as PyTorch's CPU kernels are.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

PIPELINE_FOLDER = "instruct-pix2pix"
RECORD_FILE = "training.json"
PREVIEW_FILE = "preview.jpg"
# Settings of the effect measurement after training (held-out photos, 128x128).
MEASURE_SIDE = 128
MEASURE_STEPS = 10
MEASURE_SEED = 0
MEASURE_GUIDANCE = (7.5, 1.5)


def _log(message: str) -> None:
    print(message, flush=True)


def build_pipeline(components: Any) -> Any:
    """The diffusers pipeline around trained components, with the presets' scheduler."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    from export.presets import PIX2PIX_SCHEDULER

    pipeline = StableDiffusionInstructPix2PixPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(PIX2PIX_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_pipeline(pipeline: Any, target: Path) -> None:
    """Saves in float16 safetensors; replaces the component folders, keeps README.md."""
    import torch

    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.rmtree(target / name, ignore_errors=True)
    pipeline.to(torch.float16)
    pipeline.save_pretrained(target, safe_serialization=True)


def measure_effects(folder: Path) -> tuple[dict[str, Any], Any]:
    """Edits the held-out photos with each instruction through the saved folder.

    Returns the scores and a preview grid (rows: photos; columns: input, then one edit
    per instruction).
    """
    import numpy as np
    from PIL import Image

    from export.checkpoint import inspect_folder, load_pipeline
    from training.toy.edits import INSTRUCTIONS
    from training.toy.evaluate import edit_with_pipeline, score_edit
    from training.toy.photos import HELD_OUT_PHOTOS, load_photo

    pipeline = load_pipeline(inspect_folder(folder))
    scores: dict[str, Any] = {}
    rows = []
    for name in HELD_OUT_PHOTOS:
        photo = Image.fromarray(load_photo(name)).resize(
            (MEASURE_SIDE, MEASURE_SIDE), Image.Resampling.LANCZOS
        )
        source = np.asarray(photo)
        row = [source]
        for instruction in INSTRUCTIONS:
            edited = edit_with_pipeline(
                pipeline, photo, instruction.prompt, MEASURE_STEPS, MEASURE_SEED, *MEASURE_GUIDANCE
            )
            row.append(edited)
            score = score_edit(source, edited, instruction.prompt)
            scores.setdefault(instruction.prompt, {})[name] = {
                "error_to_target": round(score.error_to_target, 2),
                "input_to_target": round(score.input_to_target, 2),
                "closed_fraction": round(score.closed_fraction, 3),
            }
        rows.append(np.concatenate(row, axis=1))
    preview = Image.fromarray(np.concatenate(rows, axis=0))
    settings = {
        "photos": list(HELD_OUT_PHOTOS),
        "side": MEASURE_SIDE,
        "steps": MEASURE_STEPS,
        "seed": MEASURE_SEED,
        "guidance_scale": MEASURE_GUIDANCE[0],
        "image_guidance_scale": MEASURE_GUIDANCE[1],
    }
    return {"settings": settings, "scores": scores}, preview


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def train(output: Path, settings: Any, threads: int) -> dict[str, Any]:
    """Runs both stages and writes the folder; returns the training record."""
    import torch

    from training.toy.architecture import build_components, parameter_count
    from training.toy.edits import INSTRUCTIONS
    from training.toy.train import encode_bank, train_unet, train_vae

    torch.set_num_threads(threads)
    started = time.perf_counter()
    components = build_components(settings.seed)
    # One generator drives every random draw of the data, the noise and the dropout.
    generator = torch.Generator().manual_seed(settings.seed)
    record: dict[str, Any] = {
        "seed": settings.seed,
        "threads": threads,
        "versions": _versions(),
        "settings": settings.as_dict(),
        "parameters": {
            name: parameter_count(getattr(components, name))
            for name in ("text_encoder", "vae", "unet")
        },
        "instructions": [instruction.prompt for instruction in INSTRUCTIONS],
        "seconds": {},
    }

    _log(f"stage 1: VAE, {settings.vae.steps} steps of {settings.vae.batch} crops")
    stage = time.perf_counter()
    record["vae"] = train_vae(components.vae, settings.vae, generator, _log)
    record["seconds"]["vae"] = round(time.perf_counter() - stage, 1)
    _log(f"  held-out PSNR: {record['vae']['held_out_psnr_db']}")

    stage = time.perf_counter()
    bank = encode_bank(components.vae, settings.unet, generator)
    # Stable Diffusion's recipe: scale latents to unit variance for the diffusion model.
    scaling_factor = float(f"{1.0 / bank.std().item():.5g}")
    components.vae.register_to_config(scaling_factor=scaling_factor)
    record["seconds"]["latent_bank"] = round(time.perf_counter() - stage, 1)
    record["vae_scaling_factor"] = scaling_factor
    _log(f"latent bank {tuple(bank.shape)}, scaling factor {scaling_factor}")

    _log(f"stage 2: UNet, {settings.unet.steps} steps of {settings.unet.batch} triples")
    stage = time.perf_counter()
    components.unet, components.text_encoder, record["unet"] = train_unet(
        components.unet,
        components.text_encoder,
        components.tokenizer,
        bank,
        scaling_factor,
        settings.unet,
        generator,
        _log,
    )
    record["seconds"]["unet"] = round(time.perf_counter() - stage, 1)
    record["seconds"]["training"] = round(time.perf_counter() - started, 1)

    target = output / PIPELINE_FOLDER
    save_pipeline(build_pipeline(components), target)
    _log("measuring the instructions on held-out photos ...")
    stage = time.perf_counter()
    record["held_out_effects"], preview = measure_effects(target)
    preview.save(target / PREVIEW_FILE, quality=90)
    record["seconds"]["measurement"] = round(time.perf_counter() - stage, 1)
    (target / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    """Parses the command line, trains, prints the summary."""
    from training.toy.train import TrainingSettings, UnetSettings, VaeSettings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="folder to write")
    parser.add_argument("--seed", type=int, default=0)
    # One thread by default: the toy is small, and threads of a small model on shared
    # cores spend their time waiting for each other.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--vae-steps", type=int, default=VaeSettings.steps)
    parser.add_argument("--unet-steps", type=int, default=UnetSettings.steps)
    args = parser.parse_args(argv)

    defaults = TrainingSettings()
    settings = TrainingSettings(
        seed=args.seed,
        vae=dataclasses.replace(defaults.vae, steps=args.vae_steps),
        unet=dataclasses.replace(defaults.unet, steps=args.unet_steps),
    )
    record = train(args.output, settings, args.threads)
    seconds = record["seconds"]
    _log(f"wrote {args.output / PIPELINE_FOLDER}")
    _log(
        f"trained in {seconds['training']:.0f} s on {record['threads']} threads "
        f"(VAE {seconds['vae']:.0f} s, latents {seconds['latent_bank']:.0f} s, "
        f"UNet {seconds['unet']:.0f} s)"
    )
    _log(f"final losses: VAE {record['vae']['final']}, UNet {record['unet']['final']}")
    for prompt, photos in record["held_out_effects"]["scores"].items():
        closed = "  ".join(
            f"{name} {score['closed_fraction']:+.2f}" for name, score in photos.items()
        )
        _log(f"  {prompt:<26} closed fraction of the distance to the target: {closed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
