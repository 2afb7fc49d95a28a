"""OpenVINO IR made from an export: where and how both kinds are saved, and the
fp16-stored weights that the openvino flavours serve at bf16.

    python -m export.openvino_ir EXPORT_DIR

OpenVINO reading the ONNX export keeps its fp32 weights in memory beside the bf16 copies
the CPU computes with. From IR whose weights are stored in fp16 (OpenVINO's
compress_to_fp16) it maps the weights file instead and holds only the bf16 copies: at
the sd15 size a UNet holds 3.9 GB after a 512x512 call instead of 6.0, at the same speed
(benchmarks/README.md, "Memory at real size"). fp16 keeps more mantissa than the bf16
the CPU computes in; the weights it cannot hold (beyond fp16's range) OpenVINO leaves in
fp32. Every component of the export is converted, in seconds, by the repository builder
when the bf16 repository is built (model_repository/builder.py), or by this command:

    EXPORT_DIR/fp16_weights/record.json         versions, source and IR digests
    EXPORT_DIR/fp16_weights/<component>/model.xml, .bin

The int8 UNets (export/int8.py) are IR too, saved the same way. An export on a read-only
volume gets both in the user's cache instead (derived_dir).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

from export.folders import read_record, write_record
from export.onnx_export import MANIFEST, MODEL_FILE, file_sha256, load_manifest

IR_FILE = "model.xml"
IR_WEIGHTS_FILE = "model.bin"
FP16_WEIGHTS_DIR = "fp16_weights"
RECORD_FILE = "record.json"
# 1: the layout above.
RECORD_FORMAT = 1
# What a folder that cannot be written fails with (writing).
WRITE_ERRORS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}


def name_by_position(model: Any) -> None:
    """OpenVINO names the operations nobody named after a process-wide counter
    (`Constant_506545`, different in each build, and copied by its transformations):
    named by their place in the graph instead, two builds write byte-identical IR."""
    for index, op in enumerate(model.get_ordered_ops()):
        if re.fullmatch(rf"{op.get_type_name()}(_\d+)+", op.get_friendly_name()):
            op.set_friendly_name(f"{op.get_type_name()}_{index}")


def save_ir(model: Any, target: Path, compress_to_fp16: bool) -> dict[str, Any]:
    """Writes `model` as IR at `target` (model.xml, and model.bin beside it); returns the
    two files' digests by name ("files") and their size ("bytes")."""
    import openvino as ov

    name_by_position(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    written = (target, target.with_name(IR_WEIGHTS_FILE))
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        ov.save_model(model, str(Path(scratch) / target.name), compress_to_fp16=compress_to_fp16)
        # New files, not rewritten ones: repositories hold hard links to the old ones.
        for path in written:
            os.replace(Path(scratch) / path.name, path)
            path.chmod(0o644)  # readable by a server running as another user
    return {
        "files": {path.name: file_sha256(path) for path in written},
        "bytes": sum(path.stat().st_size for path in written),
    }


def plain_export_manifest(export_dir: Path, needed_by: str) -> dict[str, Any]:
    """The manifest of the plain fp32 export (no onnxruntime fusions) at `export_dir`, the
    one OpenVINO reads and IR is made from; raises ValueError saying what `needed_by`
    needs otherwise."""
    manifest = load_manifest(export_dir)
    if manifest.get("optimized"):
        raise ValueError(
            f"{export_dir}: this export has onnxruntime's fusions (export --optimize), which "
            f"OpenVINO cannot read; {needed_by} needs the plain export"
        )
    if manifest["precision"] != "fp32":
        raise ValueError(
            f"{export_dir}: a {manifest['precision']} export; {needed_by} needs the fp32 one"
        )
    return manifest


def source_files(manifest: dict[str, Any], component: str) -> dict[str, str]:
    """The export's files of a component by path, with their digests (the manifest's)."""
    files = manifest["components"][component]["files"]
    return {path: entry["sha256"] for path, entry in files.items()}


def _cache_dir(export_dir: Path, name: str) -> Path:
    configured = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(configured) if os.path.isabs(configured) else Path.home() / ".cache"
    return root / "pix2pix" / name / file_sha256(export_dir / MANIFEST)[:16]


def derived_dir(export_dir: Path, name: str, holds_current: Callable[[Path], bool]) -> Path:
    """Where a folder made from an export (fp16_weights, int8) is: beside the export, or
    when the export is read-only (a mounted volume), in the user's cache under the export
    manifest's digest (`$XDG_CACHE_HOME`, else ~/.cache: pix2pix/<name>/<digest>), unless
    only the one beside it `holds_current`."""
    export_dir = Path(export_dir)
    beside = export_dir / name
    if os.access(export_dir, os.W_OK) or not (export_dir / MANIFEST).is_file():
        return beside
    cache = _cache_dir(export_dir, name)
    return beside if holds_current(beside) and not holds_current(cache) else cache


def build_dir(export_dir: Path, name: str) -> Path:
    """Where a new build of such a folder is written: beside the export, or in the cache
    when the export is read-only (derived_dir)."""
    return derived_dir(export_dir, name, lambda _: False)


@contextmanager
def writing(export_dir: Path, folder: Path, made: str) -> Iterator[None]:
    """Turns a failure to write `folder` (read-only, no permission, no room) into a
    one-line ValueError saying what to do."""
    try:
        yield
    except OSError as error:
        if error.errno not in WRITE_ERRORS:
            raise
        way_out = (
            "make room there or make it writable"
            if folder.parent == Path(export_dir)
            else "point XDG_CACHE_HOME at a writable folder with room"
        )
        raise ValueError(
            f"{export_dir}: cannot write its {made} to {folder} ({error.strerror or error}); "
            f"{way_out}, or serve another precision"
        ) from error


def fp16_weights_dir(export_dir: Path) -> Path:
    """Where the export's fp16-stored weights are (derived_dir)."""
    return derived_dir(
        export_dir, FP16_WEIGHTS_DIR, lambda folder: _holds_current(export_dir, folder)
    )


def made_from(manifest: dict[str, Any], folder: Path, record: dict[str, Any], made: Any) -> bool:
    """Whether `record` lists IR of exactly the components `made`, each converted from the
    export's current files (the manifest's digests), and all its files are in `folder`."""
    components = record["components"]
    return set(components) == set(made) and all(
        entry["source"] == source_files(manifest, name)
        and all((folder / name / file).is_file() for file in entry["files"])
        for name, entry in components.items()
    )


def _holds_current(export_dir: Path, folder: Path) -> bool:
    record = read_record(folder / RECORD_FILE)
    if record is None or record.get("format") != RECORD_FORMAT:
        return False
    if record.get("openvino") != version("openvino"):
        return False
    manifest = load_manifest(export_dir)
    return made_from(manifest, folder, record, manifest["components"])


def fp16_weights_are_current(export_dir: Path) -> bool:
    """Whether fp16-weight IR of every component of the export, converted from its current
    files by today's OpenVINO, is where fp16_weights_dir says."""
    return _holds_current(export_dir, fp16_weights_dir(export_dir))


def build_fp16_weights(export_dir: Path) -> dict[str, Any]:
    """Converts every component of the plain fp32 export to IR with fp16-stored weights;
    writes them and record.json, returns the record."""
    import openvino as ov

    started = time.perf_counter()
    export_dir = Path(export_dir)
    manifest = plain_export_manifest(export_dir, "the fp16-stored weights' conversion")
    output = build_dir(export_dir, FP16_WEIGHTS_DIR)
    components: dict[str, Any] = {}
    core = ov.Core()
    with writing(export_dir, output, "fp16-stored weights"):
        output.mkdir(parents=True, exist_ok=True)
        (output / RECORD_FILE).unlink(missing_ok=True)
        for name in manifest["components"]:
            model = core.read_model(str(export_dir / name / MODEL_FILE))
            components[name] = {
                "source": source_files(manifest, name),
                **save_ir(model, output / name / IR_FILE, compress_to_fp16=True),
            }
            del model
        record = {
            "format": RECORD_FORMAT,
            "openvino": version("openvino"),
            "components": components,
            "seconds": round(time.perf_counter() - started, 1),
        }
        write_record(output / RECORD_FILE, record)
    total = sum(entry["bytes"] for entry in components.values())
    print(
        f"fp16-stored weights of {len(components)} components: {total / 1e9:.2f} GB "
        f"in {output} ({record['seconds']} s)",
        flush=True,
    )
    return record


def ensure_fp16_weights(export_dir: Path) -> None:
    """Converts the export's components (build_fp16_weights) unless they are current."""
    if not fp16_weights_are_current(export_dir):
        build_fp16_weights(export_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path, help="folder written by export.onnx_export")
    args = parser.parse_args(argv)
    try:
        build_fp16_weights(args.export_dir)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
