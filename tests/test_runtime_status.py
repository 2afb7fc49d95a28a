"""What a forwarding unary model and the edit model running its edit tell each other
(edit_pipeline/runtime_status.py: ForwardedEdit, process_ended), without a server."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from edit_pipeline.runtime_status import (
    FORWARDED_DIR,
    RUNTIME_DIR_VARIABLE,
    ForwardedEdit,
    process_ended,
)


def test_a_forwarded_edit_is_opened_run_cancelled_and_removed(tmp_path: Path) -> None:
    token = secrets.token_hex(8)
    forwarding, running = ForwardedEdit.of(token, tmp_path), ForwardedEdit.of(token, tmp_path)
    assert forwarding is not None and running is not None
    # The edit model names its process only for an edit a forwarding model opened.
    running.run_by(os.getpid())
    assert forwarding.runner() is None and not (tmp_path / FORWARDED_DIR).exists()
    forwarding.open()
    running.run_by(os.getpid())
    assert forwarding.runner() == os.getpid()
    assert not running.cancelled()
    forwarding.cancel()
    assert running.cancelled()
    forwarding.remove()
    assert not forwarding.folder.exists() and running.runner() is None


@pytest.mark.parametrize("token", ["", "0123", "../../etc/passwd", "0123456789ABCDEF", "é" * 16])
def test_a_token_a_forwarding_model_did_not_make_names_no_folder(
    tmp_path: Path, token: str
) -> None:
    assert ForwardedEdit.of(token, tmp_path) is None


def test_without_a_supervisor_there_is_no_forwarded_edit(monkeypatch) -> None:
    monkeypatch.delenv(RUNTIME_DIR_VARIABLE, raising=False)
    assert ForwardedEdit.of(secrets.token_hex(8)) is None


def test_process_ended_tells_a_live_process_from_an_exited_one() -> None:
    assert not process_ended(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    # Exited, not reaped yet: a zombie.
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    assert process_ended(child.pid)
    child.wait()
    assert process_ended(child.pid)
