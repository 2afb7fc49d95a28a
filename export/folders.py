"""Folders the project writes whole (a preset, a model repository, what is made from an
export), and the JSON records that say what they hold.

A command's `--output` may name any folder. Emptying one that holds someone's files would
lose them, so an existing folder is emptied only when it is empty or holds the project's
mark (written first, so a build cut short is still recognised) or the record its kind
writes last (folders made before the mark). Records are written whole or not at all, and
one that cannot be read counts as none.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

# Written first into every folder written whole.
WRITTEN_MARK = ".written-by-triton-image-edit"


def make_empty(folder: Path, what: str, record: str) -> None:
    """`folder` emptied (or made) to write `what` into; raises ValueError naming it when it
    is a file, or a folder of other files (neither WRITTEN_MARK nor `record` in it)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder}: is a file; allowed a folder to write {what} into")
    if folder.is_dir():
        ours = (folder / WRITTEN_MARK).exists() or (folder / record).exists()
        if not ours and any(folder.iterdir()):
            raise ValueError(
                f"{folder}: holds files that are not {what} (no {record}); allowed a new or "
                f"empty folder, or one holding {what} to write again"
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / WRITTEN_MARK).write_text(f"{what}, written whole by triton-image-edit\n")


def read_record(path: Path) -> dict[str, Any] | None:
    """The JSON record at `path`; None where there is none or it cannot be read whole
    (then what it describes counts as not made, and is made again)."""
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Writes a record whole or not at all: beside it first, then renamed over it, so that
    a build killed or out of disk leaves no half-written record."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, path)
