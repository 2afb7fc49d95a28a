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

from edit_pipeline.cpu_graph import MADE_FOR_FILE, save_cpu_graph, this_machine
from export.folders import read_record, write_record
from export.onnx_export import EXTERNAL_DATA_FILE, MODEL_FILE, load_manifest
from export.openvino_ir import (
    RECORD_FILE,
    WRITE_ERRORS,
    derived_dir,
    made_from,
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


def _save(export_dir: Path, output: Path) -> None:
    """Optimizes every component of the export for this CPU into `output`, and writes
    record.json last. Raises OSError where the folder cannot be written."""
    started = time.perf_counter()
    manifest = load_manifest(export_dir)
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
    seconds = round(time.perf_counter() - started, 1)
    record = {"machine": this_machine(), "components": components, "seconds": seconds}
    write_record(output / RECORD_FILE, record)
    print(
        f"graphs optimized for this CPU, {len(components)} components, in {output} ({seconds} s)",
        flush=True,
    )


def ensure_cpu_graphs(export_dir: Path) -> Path | None:
    """The folder of the export's graphs for this machine, saved first unless current;
    None where they cannot be written (read-only, no room): the models then optimize
    their graphs as they load."""
    export_dir = Path(export_dir)
    current = cpu_graphs_dir(export_dir)
    if _holds_current(export_dir, current):
        return current
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    output = derived_dir(export_dir, _folder_name(), lambda _: False)
    try:
        _save(export_dir, output)
    except OSError as error:
        if error.errno not in WRITE_ERRORS:
            raise
        reason = error.strerror or str(error)
    except Fail as error:  # onnxruntime's own write of a graph failed (a full disk)
        reason = str(error)
    else:
        return output
    shutil.rmtree(output, ignore_errors=True)
    print(
        f"graphs optimized for this CPU not saved in {output} ({reason}): each model "
        "optimizes its graph as it loads",
        file=sys.stderr,
        flush=True,
    )
    return None
