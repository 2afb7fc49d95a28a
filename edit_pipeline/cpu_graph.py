"""onnxruntime's graph of a component, optimized once for this CPU and saved.

At its highest optimization level onnxruntime rewrites every convolution into its
blocked NCHWc layout, reordering the weights to the block size of the CPU's vector
width. That rewrite is most of a session's creation (an SD 1.5 UNet: 5.9 s of 6.0 on
two cores) and it buys about 17% of each call, so it stays on. Saved after the rewrite,
the graph loads in about a second and computes the same. The saved graph holds the
weights in this CPU's layout: it is loaded only where onnxruntime's version and the
CPU's architecture and vector extensions are the ones it was made for (`made_for.json`
beside it) and it loads; the component's plain graph is loaded otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from edit_pipeline.onnxruntime_component import session_options
from edit_pipeline.openvino_component import cpu_flags
from export.onnx_export import EXTERNAL_DATA_FILE, MODEL_FILE

MADE_FOR_FILE = "made_for.json"
# Where a model's version folder holds its component's saved graph.
CPU_GRAPH_DIR = "cpu_graph"
Loaded = TypeVar("Loaded")
# The flags that name vector extensions: what onnxruntime's kernels choose by.
ISA_FLAG_PREFIXES = ("sse", "ssse", "avx", "amx", "fma", "f16c", "asimd", "sve", "neon")


def this_machine() -> dict[str, Any]:
    """What a saved graph must have been made for to be loaded here."""
    from importlib.metadata import version

    flags = cpu_flags() or set()
    return {
        "onnxruntime": version("onnxruntime"),
        "machine": platform.machine(),
        "isa": sorted(f for f in flags if f.startswith(ISA_FLAG_PREFIXES)),
    }


def save_cpu_graph(model: Path, target: Path) -> None:
    """Optimizes the graph at `model` for this CPU and saves it in the folder `target`
    (model.onnx, its weights in model.onnx.data, made_for.json), replacing what was
    there."""
    import onnxruntime as ort

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        options = session_options()
        options.optimized_model_filepath = str(scratch / MODEL_FILE)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", EXTERNAL_DATA_FILE
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
        ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        (scratch / MADE_FOR_FILE).write_text(json.dumps(this_machine(), indent=2) + "\n")
        for path in scratch.iterdir():
            path.chmod(0o644)  # readable by a server running as another user
        scratch.chmod(0o755)
        shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(scratch, target)
        except OSError as error:
            # Another build saved the same graph there meanwhile: it stays.
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def made_here(folder: Path) -> bool:
    """Whether the graph saved in `folder` was made for this machine."""
    try:
        made_for = json.loads((folder / MADE_FOR_FILE).read_text())
    except (OSError, ValueError):
        return False
    return made_for == this_machine() and (folder / MODEL_FILE).is_file()


def load_graph(version_dir: Path, load: Callable[[Path], Loaded]) -> Loaded:
    """`load` of the graph in a model's version folder: the saved one where it was made
    for this machine and loads, the component's plain graph otherwise (saying why)."""
    saved = version_dir / CPU_GRAPH_DIR
    plain = version_dir / MODEL_FILE
    if made_here(saved):
        try:
            return load(saved / MODEL_FILE)
        except Exception as error:  # a damaged file: the plain graph serves all the same
            why = f"does not load ({error})"
    elif saved.is_dir():
        why = "was made for another CPU or onnxruntime"
    else:
        return load(plain)
    print(f"{saved}: {why}; optimizing {plain} at load instead", file=sys.stderr, flush=True)
    return load(plain)
