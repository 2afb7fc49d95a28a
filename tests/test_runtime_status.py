"""What a forwarding unary model and the edit model running its edit tell each other, and
what a model instance tells the supervisor (edit_pipeline/runtime_status.py:
ForwardedEdit, process_ended, InstanceStatus), without a server."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from edit_pipeline.runtime_status import (
    FORWARDED_DIR,
    RUNTIME_DIR_VARIABLE,
    ForwardedEdit,
    InstanceStatus,
    forget_forwarded_edits,
    forwarded_edits_dir,
    process_ended,
    read_reports,
)


def test_a_forwarded_edit_is_opened_run_cancelled_and_removed(tmp_path: Path) -> None:
    token = secrets.token_hex(8)
    forwarding, running = ForwardedEdit.of(token, tmp_path), ForwardedEdit.of(token, tmp_path)
    assert forwarding is not None and running is not None
    # The edit model names its process only for an edit a forwarding model opened.
    assert not running.run_by(os.getpid())
    assert forwarding.runner() is None and not (tmp_path / FORWARDED_DIR).exists()
    forwarding.open(os.getppid())
    assert running.caller() == os.getppid()
    assert running.run_by(os.getpid())
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


def test_only_a_token_a_forwarding_model_opened_counts_as_forwarded(tmp_path: Path) -> None:
    """A client may send the streaming model a cancel_token of its own: it counts only
    when a forwarding model opened an edit under it."""
    token = secrets.token_hex(8)
    assert not ForwardedEdit.sent_by_a_forwarding_model(token, tmp_path)
    assert not ForwardedEdit.sent_by_a_forwarding_model("../..", tmp_path)
    opened = ForwardedEdit.of(token, tmp_path)
    assert opened is not None
    opened.open(os.getpid())
    assert ForwardedEdit.sent_by_a_forwarding_model(token, tmp_path)
    opened.remove()
    assert not ForwardedEdit.sent_by_a_forwarding_model(token, tmp_path)


def test_without_a_supervisor_forwarded_edits_are_in_a_private_folder_per_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A plain tritonserver: the folder is this user's alone, named by the parent process
    (tritonserver, for its model processes), removed by a forwarding model that unloads
    while no edit is forwarded."""
    monkeypatch.delenv(RUNTIME_DIR_VARIABLE, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    edit = ForwardedEdit.of(secrets.token_hex(8))
    assert edit is not None
    server_folder = tmp_path / f"image-edit-{os.getuid()}-{os.getppid()}"
    assert edit.folder.parent == server_folder / FORWARDED_DIR
    assert stat.S_IMODE(server_folder.stat().st_mode) == 0o700
    edit.open(os.getpid())
    forget_forwarded_edits()
    assert edit.folder.is_dir()  # an edit in flight keeps it
    edit.remove()
    forget_forwarded_edits()
    assert not server_folder.exists()


def test_a_shared_folder_others_may_enter_is_not_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(RUNTIME_DIR_VARIABLE, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    planted = tmp_path / f"image-edit-{os.getuid()}-{os.getppid()}"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    assert forwarded_edits_dir() is None and ForwardedEdit.of(secrets.token_hex(8)) is None
    planted.rmdir()
    planted.symlink_to(tmp_path)
    assert forwarded_edits_dir() is None


def test_process_ended_tells_a_live_process_from_an_exited_one() -> None:
    assert not process_ended(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    # Exited, not reaped yet: a zombie.
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    assert process_ended(child.pid)
    child.wait()
    assert process_ended(child.pid)


def test_an_instance_reports_its_calls_and_its_unload(tmp_path: Path) -> None:
    status = InstanceStatus("unet_pix2pix_0_0", tmp_path)
    with status.waiting():
        (report,) = read_reports(tmp_path).values()
        assert report.waiting and not report.unloading
    status.idle()
    status.close()
    (report,) = read_reports(tmp_path).values()
    assert (report.instance, report.pid) == ("unet_pix2pix_0_0", os.getpid())
    assert report.busy_since == 0
    assert report.unloading and not report.waiting
