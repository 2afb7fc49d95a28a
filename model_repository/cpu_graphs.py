"""An export's components as onnxruntime optimizes them for this CPU, saved once per
machine type (edit_pipeline/cpu_graph.py says why) for the python-onnxruntime flavour:

    EXPORT_DIR/cpu_graphs/<machine>/record.json     the machine, the source digests
    EXPORT_DIR/cpu_graphs/<machine>/<component>/    model.onnx, model.onnx.data, made_for.json

<machine> is a digest of what edit_pipeline.cpu_graph.this_machine reports, so machines
of several kinds can share an export. The repository builder saves them when they are
not current, in 36 s for the seven sd15 components (they take the export's size again on
disk). An export on a read-only volume gets them in the user's cache instead
(export.openvino_ir.derived_dir).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from edit_pipeline.cpu_graph import EXTERNAL_DATA_FILE, MADE_FOR_FILE, save_cpu_graph, this_machine
from export.onnx_export import MODEL_FILE, load_manifest
from export.openvino_ir import (
    RECORD_FILE,
    WRITE_ERRORS,
    derived_dir,
    made_from,
    read_record,
    source_files,
)

CPU_GRAPHS_DIR = "cpu_graphs"


def _folder_name() -> str:
    machine = json.dumps(this_machine(), sort_keys=True).encode()
    return f"{CPU_GRAPHS_DIR}/{hashlib.sha256(machine).hexdigest()[:16]}"


def _holds_current(export_dir: Path, folder: Path) -> bool:
    record = read_record(folder / RECORD_FILE)
    if record is None or record.get("machine") != this_machine():
        return False
    manifest = load_manifest(export_dir)
    return made_from(manifest, folder, record, manifest["components"])


def cpu_graphs_dir(export_dir: Path) -> Path:
    """Where the export's graphs for this machine are (derived_dir)."""
    return derived_dir(
        export_dir, _folder_name(), lambda folder: _holds_current(export_dir, folder)
    )


def build_cpu_graphs(export_dir: Path) -> dict[str, Any]:
    """Optimizes every component of the export for this CPU; writes them and record.json,
    returns the record. Raises OSError where the folder cannot be written."""
    started = time.perf_counter()
    export_dir = Path(export_dir)
    manifest = load_manifest(export_dir)
    output = derived_dir(export_dir, _folder_name(), lambda _: False)
    components: dict[str, Any] = {}
    output.mkdir(parents=True, exist_ok=True)
    (output / RECORD_FILE).unlink(missing_ok=True)
    for name in manifest["components"]:
        save_cpu_graph(export_dir / name / MODEL_FILE, output / name)
        files = [MODEL_FILE, EXTERNAL_DATA_FILE, MADE_FOR_FILE]
        components[name] = {
            "source": source_files(manifest, name),
            "files": [file for file in files if (output / name / file).is_file()],
        }
    record = {
        "machine": this_machine(),
        "components": components,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (output / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"graphs optimized for this CPU, {len(components)} components, in {output} "
        f"({record['seconds']} s)",
        flush=True,
    )
    return record


def ensure_cpu_graphs(export_dir: Path) -> Path | None:
    """The folder of the export's graphs for this machine, saved first unless current;
    None where they cannot be written (read-only, no room): the models then optimize
    their graphs as they load."""
    if not _holds_current(export_dir, cpu_graphs_dir(export_dir)):
        try:
            build_cpu_graphs(export_dir)
        except OSError as error:
            if error.errno not in WRITE_ERRORS:
                raise
            output = derived_dir(export_dir, _folder_name(), lambda _: False)
            shutil.rmtree(output, ignore_errors=True)
            print(
                f"graphs optimized for this CPU not saved in {output} "
                f"({error.strerror or error}): each model optimizes its graph as it loads",
                file=sys.stderr,
                flush=True,
            )
            return None
    return cpu_graphs_dir(export_dir)
