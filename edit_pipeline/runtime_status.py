"""What the supervisor and the Python backend models tell each other while a server runs.

A directory named by `IMAGE_EDIT_RUNTIME_DIR` (the supervisor sets it; model processes
inherit tritonserver's environment) holds:

    draining                 present once shutdown began: edit models refuse new edits
    instances/<instance>.<pid>  per model instance process: since when it is busy, and its
                             longest call
    forwarded/<token>/       a forwarded edit: who runs it, whether its caller left

Each instance file is four float64 values written in place: `busy_since` (wall-clock
seconds of the call's start or its last step, 0 when idle), `longest_call_s` (the longest
call that completed), `waiting` (1 while the call waits for another model: an edit's
BLS call to a component) and `unloading` (1 once tritonserver asked the instance to
unload). The supervisor reads them to tell a stuck call from a long one, to know when no
edit is in flight, and at a stop, whether tritonserver still unloads anything. Without
the variable (a plain tritonserver, as in the NGC container run by hand) every function
here does nothing, but forwarded edits: their folders are then in a folder of the
temporary directory that only this user may enter, named by tritonserver's process id
(every model process is its child), removed as the forwarding models unload
(`forget_forwarded_edits`).
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

RUNTIME_DIR_VARIABLE = "IMAGE_EDIT_RUNTIME_DIR"
DRAINING_MARKER = "draining"
INSTANCES_DIR = "instances"
FORWARDED_DIR = "forwarded"
HEX_DIGITS = "0123456789abcdef"
# The streaming models' input that only a forwarding unary model sends: the token under
# which it marks the edit cancelled; and the output a forwarded edit fails with.
CANCEL_TOKEN_INPUT = "cancel_token"
FAILURE_OUTPUT = "failure"
_RECORD = struct.Struct("<dddd")


def runtime_dir() -> Path | None:
    """The directory of the supervisor this process runs under, if any."""
    value = os.environ.get(RUNTIME_DIR_VARIABLE)
    return Path(value) if value else None


def draining(directory: Path | None = None) -> bool:
    """Whether the supervisor has begun to shut the server down."""
    directory = directory or runtime_dir()
    return directory is not None and (directory / DRAINING_MARKER).exists()


def mark_draining(directory: Path) -> None:
    (directory / DRAINING_MARKER).touch()


def forwarded_edits_dir(directory: Path | None = None) -> Path | None:
    """Where the forwarded edits' folders are: in the supervisor's runtime directory, or
    without one in this user's folder for this tritonserver (None when that folder is
    someone else's: the temporary directory is shared)."""
    directory = directory or runtime_dir()
    if directory is not None:
        return directory / FORWARDED_DIR
    shared = Path(tempfile.gettempdir()) / f"image-edit-{os.getuid()}-{os.getppid()}"
    try:
        shared.mkdir(mode=0o700, exist_ok=True)
        status = shared.lstat()
    except OSError:
        return None
    private = stat.S_ISDIR(status.st_mode) and not status.st_mode & 0o077
    return shared / FORWARDED_DIR if private and status.st_uid == os.getuid() else None


def forget_forwarded_edits() -> None:
    """A forwarding model unloads: without a supervisor, it removes the folder that
    forwarded_edits_dir made when no edit is forwarded now (another forwarding model's
    next edit makes it again)."""
    if runtime_dir() is None and (folder := forwarded_edits_dir()) is not None:
        for empty in (folder, folder.parent):
            try:
                empty.rmdir()
            except OSError:
                return


@dataclass(frozen=True)
class ForwardedEdit:
    """What a forwarding unary model (forward_model.py) and the edit model running its
    edit tell each other, in forwarded/<token>: `caller` holds the forwarding model's
    process id, `runner` the edit model's once the edit runs, `cancelled` appears once the
    unary caller has gone. Each model ends its own process if the other's dies."""

    folder: Path

    @classmethod
    def of(cls, token: str, directory: Path | None = None) -> ForwardedEdit | None:
        """None for a token that is not the 16 hex digits a forwarding model makes, or
        where there is no folder for it (forwarded_edits_dir)."""
        if not _token_form(token):
            return None
        folder = forwarded_edits_dir(directory)
        return None if folder is None else cls(folder / token)

    @classmethod
    def sent_by_a_forwarding_model(cls, token: str, directory: Path | None = None) -> bool:
        """Whether a forwarding model opened an edit under `token` (where there is no
        folder for edits, whether the token has the form it makes): a client that sends
        the streaming model a token of its own is refused."""
        if not _token_form(token):
            return False
        folder = forwarded_edits_dir(directory)
        return folder is None or cls(folder / token).caller() is not None

    def open(self, pid: int) -> None:
        """The forwarding model, with its process id, before it sends the edit."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "caller").write_text(str(pid))

    def run_by(self, pid: int) -> bool:
        """The edit model, as it starts the edit: False (and nothing written) for a token
        nobody opened."""
        if not self.folder.is_dir():
            return False
        (self.folder / "runner").write_text(str(pid))
        return True

    def caller(self) -> int | None:
        return self._pid("caller")

    def runner(self) -> int | None:
        return self._pid("runner")

    def _pid(self, name: str) -> int | None:
        try:
            return int((self.folder / name).read_text())
        except (OSError, ValueError):
            return None

    def cancel(self) -> None:
        (self.folder / "cancelled").touch()

    def cancelled(self) -> bool:
        return (self.folder / "cancelled").exists()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _token_form(token: str) -> bool:
    return len(token) == 16 and all(c in HEX_DIGITS for c in token)


def process_ended(pid: int) -> bool:
    """Whether a process has exited (gone, or a zombie its parent has not reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


class InstanceStatus:
    """What one model instance reports about its calls (a no-op without a supervisor)."""

    def __init__(self, instance_name: str, directory: Path | None = None) -> None:
        directory = directory or runtime_dir()
        self._fd: int | None = None
        self._busy_since = 0.0
        self._longest_s = 0.0
        self._waiting = False
        self._unloading = False
        if directory is not None:
            # Keyed by process too: a reloaded instance has the old one's name while the
            # old process may still finish an edit.
            path = directory / INSTANCES_DIR / f"{instance_name}.{os.getpid()}"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            self._write()

    def busy(self) -> None:
        """A call starts (or makes progress: a long call beats at every step)."""
        self._busy_since = time.time()
        self._write()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Around a call to another model: the time it takes is that model's to account
        for, and this call beats again when it returns."""
        self._waiting = True
        self._write()
        try:
            yield
        finally:
            self._waiting = False
            self.busy()

    def idle(self) -> None:
        """The call ended."""
        if self._busy_since:
            self._longest_s = max(self._longest_s, time.time() - self._busy_since)
        self._busy_since = 0.0
        self._write()

    def close(self) -> None:
        """The instance unloads: the first thing its model's finalize does."""
        self._unloading = True
        self._write()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write(self) -> None:
        if self._fd is not None:
            record = _RECORD.pack(
                self._busy_since, self._longest_s, float(self._waiting), float(self._unloading)
            )
            os.pwrite(self._fd, record, 0)


@dataclass(frozen=True)
class InstanceReport:
    """An instance process's status as the supervisor reads it."""

    instance: str
    pid: int
    busy_since: float
    longest_call_s: float
    waiting: bool
    unloading: bool

    def busy_for(self, now: float) -> float:
        return now - self.busy_since if self.busy_since else 0.0


def read_reports(directory: Path) -> dict[int, InstanceReport]:
    """Every instance process's last report, by process id."""
    reports = {}
    folder = directory / INSTANCES_DIR
    if not folder.is_dir():
        return reports
    for path in folder.iterdir():
        instance, _, pid = path.name.rpartition(".")
        data = path.read_bytes()[: _RECORD.size]
        if pid.isdigit() and len(data) == _RECORD.size:
            busy_since, longest, waiting, unloading = _RECORD.unpack(data)
            reports[int(pid)] = InstanceReport(
                instance, int(pid), busy_since, longest, waiting > 0, unloading > 0
            )
    return reports


def forget_process(directory: Path, pid: int) -> None:
    """Drops the report of a process that no longer runs."""
    for path in (directory / INSTANCES_DIR).glob(f"*.{pid}"):
        path.unlink(missing_ok=True)
