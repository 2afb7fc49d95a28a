"""Quantizes an export's UNets to int8 for the openvino flavours, calibrated on the checkpoint.

    python -m export.int8 EXPORT_DIR [--subset-size N] [--steps N] [--image-side PX]

The checkpoint's own diffusers pipelines (the folders the export's manifest names) edit
scikit-image sample photos with the project's instructions; every UNet call's inputs are
captured, as the UNet receives them at every step. NNCF's post-training quantization
(model type transformer, SmoothQuant on the matrix products) then calibrates each UNet,
read by OpenVINO from the plain ONNX export, on those inputs. The quantized IR is written
beside the export (in the user's cache when the export is read-only:
export/openvino_ir.py, derived_dir) with what it was calibrated on:

    EXPORT_DIR/int8/calibration.json          settings, versions, source and IR digests
    EXPORT_DIR/int8/<unet>/model.xml, .bin    one OpenVINO IR per UNet

Only the UNets are quantized, and in them neither the first and last convolutions nor
the timestep embedding: the UNets are the edit's time (docs/flavours.md, "int8"); the
text encoder, the VAE and the shallow passes are served from the IR with fp16-stored
weights, as at bf16 (export/openvino_ir.py). Nothing is downloaded. Building twice
from the same export gives byte-identical IR (tests/test_int8.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from export.checkpoint import PIX2PIX, inspect_folder
from export.components import MAX_IMAGE_SIDE, UNET_FOR_PIPELINE, ComponentSpec
from export.folders import read_record, write_record
from export.onnx_export import MODEL_FILE, load_manifest
from export.openvino_ir import (
    IR_FILE,
    build_dir,
    derived_dir,
    made_from,
    plain_export_manifest,
    save_ir,
    source_files,
    writing,
)

INT8_DIR = "int8"
CALIBRATION_FILE = "calibration.json"
# 1: the first layout above.
CALIBRATION_FORMAT = 1
# The components quantized: the UNets, called every step.
QUANTIZED_COMPONENTS = tuple(UNET_FOR_PIPELINE.values())
# The UNet inputs a captured call fills (the export's UNet wrapper's arguments).
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
# The settings that size a calibration run (how many UNet calls, over edits of how many
# steps, at what side): the builder's choice of time against coverage, which serving keeps
# (ensure_int8). At sd15 on 2 cores, 60 calls at 256x256 took 24.5 minutes for both UNets;
# the defaults capture six 512x512 diffusers edits per pipeline, about 5 minutes each.
SIZING = ("subset_size", "steps", "image_side")

# Colour photos scikit-image ships that the toy model trained on (training/toy/photos.py);
# the held-out ones (astronaut, coffee), on which the fidelity gate measures, stay unseen.
CALIBRATION_PHOTOS = (
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "colorwheel",
)
# The toy's learned instructions (tests/test_toy.py: CHECKS) and the ones the tests and
# the demo send.
CALIBRATION_PROMPTS = (
    "make it black and white",
    "invert the colors",
    "make it brighter",
    "make it red",
    "make it green",
    "make it blue",
    "blur it",
    "make it snowy",
    "turn it into a watercolor painting",
    "turn him into a snowman",
)


@dataclass(frozen=True)
class Calibration:
    """What the UNets are calibrated on, and how NNCF quantizes them."""

    photos: tuple[str, ...] = CALIBRATION_PHOTOS
    prompts: tuple[str, ...] = CALIBRATION_PROMPTS
    steps: int = 20
    # Edit i uses seed + i, photo i and prompt i (each list cycled).
    seed: int = 0
    # UNet calls per UNet: six edits of 20 steps. OpenVINO's InstructPix2Pix notebook takes
    # about 300; on a 2-core CPU that alone is minutes at the small preset's size.
    subset_size: int = 120
    # 0: the side the checkpoint's UNet was trained at (its sample size x the VAE factor).
    image_side: int = 0
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    # img2img's strength (the served temperature's default).
    strength: float = 0.8
    # SmoothQuant's alpha for the matrix products (NNCF's default for transformers);
    # convolutions are not smoothed (-1).
    smooth_quant_matmul: float = 0.95
    smooth_quant_convolution: float = -1.0
    model_type: str = "transformer"
    # Symmetric quantization (NNCF's default); "mixed" measured the same on the toy.
    preset: str = "performance"
    # Left in floating point: the first and last convolutions (the latents in, the noise
    # out) and the timestep embedding. Quantized, the toy model's black and white kept
    # 37% of its effect on the astronaut; with these left out, 96% (docs/flavours.md).
    float_scopes: tuple[str, ...] = (".*conv_in.*", ".*conv_out.*", ".*time_embedding.*")
    # The fast bias correction: the pipeline NNCF runs by default.
    fast_bias_correction: bool = True

    def for_export(self, manifest: dict[str, Any]) -> Calibration:
        """These settings with the image side made concrete for the export's checkpoint."""
        dims = manifest["dimensions"]
        side = self.image_side or dims["unet_sample_size"] * dims["vae_scale_factor"]
        return replace(self, image_side=side)

    def sized_as(self, recorded: dict[str, Any]) -> Calibration:
        """These settings with the sizing (SIZING) of a recorded calibration."""
        return replace(self, **{name: recorded[name] for name in SIZING})

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


# img2img's calibration edits run steps x strength of their steps (as diffusers rounds
# them down): at least one.
MIN_STEPS = math.ceil(1 / Calibration.strength)


def quantization_versions() -> dict[str, str]:
    """The libraries whose versions decide the quantized weights."""
    return {name: version(name) for name in ("nncf", "openvino", "torch", "diffusers")}


def int8_dir(export_dir: Path) -> Path:
    """Where the export's int8 IR is (derived_dir)."""
    return derived_dir(export_dir, INT8_DIR, lambda folder: _matches(export_dir, folder))


def _photo(name: str, side: int) -> Any:
    from PIL import Image, ImageOps
    from skimage import data

    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    return ImageOps.fit(image, (side, side), Image.Resampling.LANCZOS)


def capture_unet_inputs(
    folder: Path, spec: ComponentSpec, calibration: Calibration
) -> list[dict[str, np.ndarray]]:
    """`subset_size` UNet feeds (the spec's input names and dtypes), captured from the
    diffusers pipeline of `folder` editing the calibration photos, step by step."""
    import torch

    from export.checkpoint import load_pipeline

    names = [tensor.name for tensor in spec.inputs]
    if tuple(names) != UNET_INPUTS:
        raise ValueError(f"{spec.name}: inputs {names}; int8 calibration fills {UNET_INPUTS}")
    pipeline_folder = inspect_folder(folder)
    pipeline = load_pipeline(pipeline_folder)
    pipeline.set_progress_bar_config(disable=True)
    feeds: list[dict[str, np.ndarray]] = []

    def record(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample, timestep = args[0], args[1]
        embeds = kwargs["encoder_hidden_states"] if len(args) < 3 else args[2]
        batch = sample.shape[0]
        feeds.append(
            {
                "sample": sample.detach().numpy().astype(np.float32),
                "timestep": np.full(batch, float(timestep), dtype=np.float32),
                "encoder_hidden_states": embeds.detach().numpy().astype(np.float32),
            }
        )

    handle = pipeline.unet.register_forward_pre_hook(record, with_kwargs=True)
    settings: dict[str, Any] = {
        "num_inference_steps": calibration.steps,
        "guidance_scale": calibration.guidance_scale,
    }
    if pipeline_folder.pipeline == PIX2PIX:
        settings["image_guidance_scale"] = calibration.image_guidance_scale
    else:
        settings["strength"] = calibration.strength
    try:
        with torch.inference_mode():
            edit = 0
            while len(feeds) < calibration.subset_size:
                photo = calibration.photos[edit % len(calibration.photos)]
                prompt = calibration.prompts[edit % len(calibration.prompts)]
                generator = torch.Generator("cpu").manual_seed(calibration.seed + edit)
                pipeline(
                    prompt,
                    image=_photo(photo, calibration.image_side),
                    generator=generator,
                    **settings,
                )
                edit += 1
    finally:
        handle.remove()
    return feeds[: calibration.subset_size]


def quantize_component(
    onnx_path: Path, feeds: list[dict[str, np.ndarray]], calibration: Calibration
) -> Any:
    """The OpenVINO model of `onnx_path`, quantized by NNCF on `feeds`."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    model = ov.Core().read_model(str(onnx_path))
    return nncf.quantize(
        model,
        nncf.Dataset(feeds),
        preset=nncf.QuantizationPreset(calibration.preset),
        model_type=nncf.ModelType(calibration.model_type),
        subset_size=len(feeds),
        fast_bias_correction=calibration.fast_bias_correction,
        ignored_scope=nncf.IgnoredScope(patterns=list(calibration.float_scopes), validate=False),
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(
                convolution=calibration.smooth_quant_convolution,
                matmul=calibration.smooth_quant_matmul,
            )
        ),
    )


def _quantized_components(manifest: dict[str, Any]) -> dict[str, Path]:
    """Each UNet of the export with the diffusers folder it was exported from."""
    return {
        entry["unet"]: Path(entry["source"])
        for entry in manifest["pipelines"].values()
        if entry["unet"] in QUANTIZED_COMPONENTS
    }


def build_int8(export_dir: Path, calibration: Calibration | None = None) -> dict[str, Any]:
    """Quantizes every UNet of the export; writes the IR and calibration.json, returns it."""
    started = time.perf_counter()
    export_dir = Path(export_dir)
    manifest = plain_export_manifest(export_dir, "int8 quantization")
    asked = calibration or Calibration()
    calibration = asked.for_export(manifest)
    output = build_dir(export_dir, INT8_DIR)
    components: dict[str, Any] = {}
    with writing(export_dir, output, "int8 UNets"):
        output.mkdir(parents=True, exist_ok=True)
        # Until the UNets are saved, a record of none of them: the folder is not current,
        # and a build cut short is built again as it was sized (ensure_int8).
        record = {
            "format": CALIBRATION_FORMAT,
            "calibration": calibration.to_json(),
            # The sizing as asked (image_side 0: the checkpoint's own), which a rebuild keeps.
            "sizing": {name: getattr(asked, name) for name in SIZING},
        }
        write_record(output / CALIBRATION_FILE, record | {"components": {}})
        for name, folder in _quantized_components(manifest).items():
            tick = time.perf_counter()
            spec = ComponentSpec.from_json(manifest["components"][name]["spec"])
            feeds = capture_unet_inputs(folder, spec, calibration)
            capture_s = time.perf_counter() - tick
            tick = time.perf_counter()
            quantized = quantize_component(export_dir / name / MODEL_FILE, feeds, calibration)
            # fp32 for what stays floating point: the fp16 compression would lose precision
            # the fp32 components keep.
            components[name] = {
                "source": source_files(manifest, name),
                **save_ir(quantized, output / name / IR_FILE, compress_to_fp16=False),
                "samples": len(feeds),
                "capture_seconds": round(capture_s, 1),
                "quantize_seconds": round(time.perf_counter() - tick, 1),
            }
            print(
                f"int8 {name:<13} {components[name]['bytes'] / 1e6:8.1f} MB  "
                f"({len(feeds)} calibration calls: {capture_s:.0f} s captured, "
                f"{components[name]['quantize_seconds']:.0f} s quantized)",
                flush=True,
            )
            del feeds, quantized  # before the next UNet's pipeline is loaded
        record |= {
            "versions": quantization_versions(),
            "components": components,
            "seconds": round(time.perf_counter() - started, 1),
        }
        write_record(output / CALIBRATION_FILE, record)
    return record


def _made_from(manifest: dict[str, Any], folder: Path, record: dict[str, Any]) -> bool:
    """Whether `record` is of a finished build in `folder` from the export's current files."""
    return record.get("format") == CALIBRATION_FORMAT and made_from(
        manifest, folder, record, _quantized_components(manifest)
    )


def _matches(export_dir: Path, folder: Path) -> bool:
    record = read_record(folder / CALIBRATION_FILE)
    return record is not None and _made_from(load_manifest(export_dir), folder, record)


def int8_matches_export(export_dir: Path) -> bool:
    """Whether the export holds int8 IR of every UNet, quantized from its current files
    (whatever the calibration settings)."""
    return _matches(export_dir, int8_dir(export_dir))


def _wanted(calibration: Calibration | None, record: dict[str, Any] | None) -> Calibration:
    """`calibration`, or by default the project's, sized as the recorded build was asked to
    be (records before "sizing": as it was made, its side concrete)."""
    if calibration is not None:
        return calibration
    record = record or {}
    settings = record.get("sizing") or record.get("calibration")
    return Calibration().sized_as(settings) if settings else Calibration()


def _is_current(
    export_dir: Path, folder: Path, record: dict[str, Any], calibration: Calibration | None
) -> bool:
    """Whether `record`, read from `folder`, is of a current build (int8_is_current)."""
    manifest = load_manifest(export_dir)
    if not _made_from(manifest, folder, record):
        return False
    wanted = _wanted(calibration, record).for_export(manifest)
    return (
        record["calibration"] == wanted.to_json() and record["versions"] == quantization_versions()
    )


def int8_is_current(export_dir: Path, calibration: Calibration | None = None) -> bool:
    """Whether the export's int8 IR matches it (int8_matches_export) and was calibrated
    with these settings (by default: the project's, sized as the build was) and today's
    library versions."""
    folder = int8_dir(export_dir)
    record = read_record(folder / CALIBRATION_FILE)
    return record is not None and _is_current(export_dir, folder, record, calibration)


def ensure_int8(export_dir: Path, calibration: Calibration | None = None) -> dict[str, Any]:
    """The calibration record of a current int8 build (see int8_is_current), building it
    first when there is none. Without `calibration`, a rebuild keeps the sizing of the
    build it replaces (`python -m export.int8 --subset-size ...`)."""
    folder = int8_dir(export_dir)
    record = read_record(folder / CALIBRATION_FILE)
    if record is not None and _is_current(export_dir, folder, record, calibration):
        print(f"int8 up to date: {folder}", flush=True)
        return record
    print(f"quantizing the UNets of {export_dir} to int8 (NNCF) ...", flush=True)
    return build_int8(export_dir, _wanted(calibration, record))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path, help="folder written by export.onnx_export")
    parser.add_argument(
        "--subset-size",
        type=int,
        default=Calibration.subset_size,
        help="calibration UNet calls per UNet (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=Calibration.steps,
        help="steps of each calibration edit (default: %(default)s)",
    )
    parser.add_argument(
        "--image-side",
        type=int,
        default=Calibration.image_side,
        help="side of the calibration photos in pixels, a multiple of 8 "
        "(default: the side the checkpoint was trained at)",
    )
    args = parser.parse_args(argv)
    problems = [
        f"{name}={value}: allowed {allowed}"
        for name, value, ok, allowed in (
            ("subset_size", args.subset_size, args.subset_size >= 1, ">= 1"),
            ("steps", args.steps, args.steps >= MIN_STEPS, f">= {MIN_STEPS}"),
            (
                "image_side",
                args.image_side,
                0 <= args.image_side <= MAX_IMAGE_SIDE and args.image_side % 8 == 0,
                f"0 (the trained side) or a multiple of 8 up to {MAX_IMAGE_SIDE}",
            ),
        )
        if not ok
    ]
    if problems:
        print(f"error: {'; '.join(problems)}", file=sys.stderr)
        return 2
    calibration = Calibration(
        subset_size=args.subset_size, steps=args.steps, image_side=args.image_side
    )
    try:
        record = build_int8(args.export_dir, calibration)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"int8 IR and {CALIBRATION_FILE} in {int8_dir(args.export_dir)} ({record['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
