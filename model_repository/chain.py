"""The one chain from weights to a servable repository, for serve, demo and benchmarks:

    preset (random weights of the real architectures) or a diffusers folder
      -> validated ONNX export (fp16 for the fp16 precision, onnxruntime's fusions for
         the onnxruntime flavours)
      -> int8 UNets quantized from it (the int8 precision; export/int8.py)
      -> TensorRT engines (the tensorrt flavour; built when missing, on a GPU)
      -> model repository for the chosen options

Every step whose output is already there and current is skipped. `prepare_in_child`
runs the chain in a process of its own, so that what an export holds (gigabytes at real
size) is the machine's again before the server starts.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from export.int8 import ensure_int8
from export.onnx_export import ensure_export
from export.presets import PRESET_RECORD, PRESETS
from model_repository.builder import build_repository
from model_repository.configs import RepositoryOptions

DEFAULT_BUILD_DIR = Path("build")
DEFAULT_PRESET = "tiny"


@dataclass(frozen=True)
class Source:
    """Where the weights come from: a preset built here, or a diffusers folder (or a
    preset's root) on disk."""

    preset: str | None = None
    model: Path | None = None

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> Source:
        return cls(model=args.model) if args.model is not None else cls(preset=args.preset)


@dataclass(frozen=True)
class Step:
    """One step of the chain as it ran: seconds, and what it did."""

    name: str
    seconds: float
    note: str


@dataclass(frozen=True)
class BuiltModel:
    """What the chain made: the served model's name, its diffusers folder, its export,
    its engines (tensorrt) and the repository; and how long each step took."""

    name: str
    weights: Path
    export_dir: Path
    engines_dir: Path | None
    repository: Path
    steps: tuple[Step, ...] = field(default=())

    @property
    def random_weights(self) -> bool:
        """Whether the weights are a preset's: a preset root, or a pipeline folder in one."""
        folder = self.weights.resolve()
        return (folder / PRESET_RECORD).is_file() or (folder.parent / PRESET_RECORD).is_file()


def add_source_arguments(parser: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """--preset and --model, one of them; returns the group (serve adds --repository)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=DEFAULT_PRESET,
        help="random weights of the real architectures, built here (default: %(default)s)",
    )
    source.add_argument("--model", type=Path, help="a diffusers folder (or a preset root)")
    return source


def _log(message: str) -> None:
    print(message, flush=True)


def ensure_preset(preset: str, build_dir: Path) -> Path:
    """The preset's root under `build_dir`, built when missing."""
    from export.presets import build_preset, preset_record

    root = build_dir / "presets" / preset
    if (preset_record(root) or {}).get("preset") == preset:
        _log(f"preset up to date: {root}")
        return root
    _log(f"building the {preset} preset (random weights of the real architectures) ...")
    for folder, digest in build_preset(preset, root).items():
        _log(f"  {folder}: sha256 {digest}")
    return root


def resolve_source(source: Source, build_dir: Path) -> tuple[str, Path]:
    """The served model's name and its diffusers folder, building the preset if needed."""
    if source.model is not None:
        if not source.model.is_dir():
            raise FileNotFoundError(f"{source.model}: no such folder")
        return source.model.resolve().name, source.model
    preset = source.preset or DEFAULT_PRESET
    return preset, ensure_preset(preset, build_dir)


def export_dir_for(name: str, build_dir: Path, options: RepositoryOptions) -> Path:
    """Where the export of `name` goes: one folder per weight precision and fusions."""
    fp16 = "-fp16" if options.precision == "fp16" else ""
    fused = "-fused" if options.fused_export else ""
    return build_dir / "onnx" / f"{name}{fp16}{fused}"


def repository_dir_for(name: str, build_dir: Path, options: RepositoryOptions) -> Path:
    """Where serve and demo write the repository of `name` for these options."""
    precision = "" if options.precision == "fp32" else f"-{options.precision}"
    return build_dir / "repository" / f"{name}-{options.flavour}{precision}"


def ensure_engines(export_dir: Path, build_dir: Path, options: RepositoryOptions) -> Path:
    """The TensorRT engines of an export, built when missing (needs an NVIDIA GPU)."""
    from export.tensorrt_engines import ENGINES_MANIFEST, build_engines

    engines = build_dir / "engines" / export_dir.name
    if not (engines / ENGINES_MANIFEST).is_file():
        _log(f"building TensorRT engines of {export_dir} ...")
        build_engines(export_dir, engines, fp16=options.precision == "fp16")
    return engines


def choose_for_this_machine(options: RepositoryOptions) -> RepositoryOptions:
    """The options with `auto` made concrete, the choice logged with its reason."""
    from edit_pipeline.openvino_component import bf16_unsupported_reason

    chosen = options.for_this_machine()
    if chosen != options:
        reason = bf16_unsupported_reason() or "this CPU computes bf16 natively"
        _log(
            f"flavour {chosen.flavour}, precision {chosen.precision} "
            f"(asked: {options.flavour}, {options.precision}; {reason}; "
            "--flavour/--precision or FLAVOUR=/PRECISION= override)"
        )
    return chosen


@contextmanager
def _step(steps: list[Step], name: str, note: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    steps.append(Step(name, time.perf_counter() - started, note))


def prepare(
    source: Source,
    options: RepositoryOptions,
    build_dir: Path = DEFAULT_BUILD_DIR,
    *,
    repository: Path | None = None,
    engines_dir: Path | None = None,
) -> BuiltModel:
    """Weights -> validated export -> int8 UNets (int8) or engines (tensorrt) ->
    repository (at `repository`, or where serve keeps it)."""
    options.check()
    options = choose_for_this_machine(options)
    steps: list[Step] = []
    build_note = "skipped: MODEL given" if source.model else f"{source.preset} preset"
    with _step(steps, "build", f"{build_note}, skipped when current"):
        name, weights = resolve_source(source, build_dir)
    export_dir = export_dir_for(name, build_dir, options)
    with _step(steps, "export", "ONNX + validation, skipped when current"):
        ensure_export(
            [weights], export_dir, fp16=options.precision == "fp16", optimize=options.fused_export
        )
    if options.precision == "int8":
        with _step(steps, "int8", "NNCF calibration and quantization, skipped when current"):
            ensure_int8(export_dir)
    if options.flavour == "tensorrt" and engines_dir is None:
        with _step(steps, "engines", "TensorRT, skipped when current"):
            engines_dir = ensure_engines(export_dir, build_dir, options)
    repository = repository or repository_dir_for(name, build_dir, options)
    with _step(steps, "repository", options.flavour):
        models = build_repository(export_dir, repository, options, engines_dir)
    _log(f"repository ({options.flavour}, {len(models)} models): {repository}")
    return BuiltModel(name, weights, export_dir, engines_dir, repository, tuple(steps))


def prepare_in_child(
    source: Source,
    options: RepositoryOptions,
    build_dir: Path = DEFAULT_BUILD_DIR,
    *,
    repository: Path | None = None,
    engines_dir: Path | None = None,
) -> BuiltModel:
    """`prepare` in a fresh process (spawned, so it inherits none of this one's threads):
    the weights, export and libraries it loads are freed when it exits. Its errors are
    raised here."""
    context = multiprocessing.get_context("spawn")
    keywords = {"repository": repository, "engines_dir": engines_dir}
    with context.Pool(1) as pool:
        return pool.apply(prepare, (source, options, build_dir), keywords)
