"""repository.json: what a built repository records of itself, for whoever serves it.

The builder writes it: the export it came from, the options, the tritonserver flags the
repository needs (the rate limiter, for one), the models and pipelines, and the code that
built it (the project's version and git commit). A repository is built once and may be
served for months, by replicas that install the project anew (object storage,
Kubernetes): `serve --repository` warns when the code that serves it differs.
"""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from export.folders import write_record as write_whole

REPOSITORY_RECORD = "repository.json"
PROJECT = "triton-image-edit"
CHECKOUT = Path(__file__).resolve().parents[1]


def write_record(repository: Path, record: dict[str, Any]) -> None:
    """Writes repository.json, with the code that builds it under "built_by": beside it
    first, then renamed over it, so that a build killed or out of disk leaves none half
    written."""
    write_whole(repository / REPOSITORY_RECORD, {**record, "built_by": code_version()})


def read_record(repository: str) -> dict[str, Any] | None:
    """The record of a repository (a folder, or s3://...); None where there is none.

    Raises ValueError naming the record when it is there but not a JSON object."""
    if repository.startswith("s3://"):
        from model_repository.publish import read_text

        text = read_text(repository, REPOSITORY_RECORD)
    elif "://" in repository:
        return None
    else:
        path = Path(repository) / REPOSITORY_RECORD
        # Bytes: json reads their encoding, so one that is none fails below, named.
        text = path.read_bytes() if path.is_file() else None
    if text is None:
        return None
    where = f"{repository.rstrip('/')}/{REPOSITORY_RECORD}"
    rebuild = (
        "build the repository again (python -m model_repository.builder, or serve --preset/--model)"
    )
    try:
        record = json.loads(text)
    except ValueError as error:
        raise ValueError(f"{where} is damaged ({error}); {rebuild}") from None
    if not isinstance(record, dict):
        kind = type(record).__name__
        raise ValueError(f"{where} is damaged (a JSON {kind}, not an object); {rebuild}")
    return record


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(CHECKOUT), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def code_version() -> dict[str, Any]:
    """The project's version; where it runs from a git checkout, the commit and whether
    the checkout has changes not committed."""
    try:
        project = version(PROJECT)
    except PackageNotFoundError:
        project = None
    commit = _git("rev-parse", "HEAD")
    changes = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"version": project, "commit": commit, "modified": bool(changes)}


def code_differences(record: dict[str, Any] | None) -> list[str]:
    """How the code that built a repository differs from the code running now, where
    both are known."""
    built_by = (record or {}).get("built_by")
    if not built_by:
        return ["the repository does not say which code built it"]
    running = code_version()
    found = []
    for key in ("version", "commit"):
        then, now = built_by.get(key), running.get(key)
        if then and now and then != now:
            found.append(f"built by {key} {then}, served by {key} {now}")
    return found
