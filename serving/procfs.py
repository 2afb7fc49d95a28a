"""What Linux's /proc says about a tritonserver's processes, and their shared memory.

The supervisor, the benchmarks and the tests read every fact about processes here: a
process's state letter, the CPU time it has used, its memory (PSS), its children, which
of tritonserver's children are Python backend model processes (stubs) and which model
instance each runs, and which /dev/shm regions of the Python backend no process maps any
more.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

# Whether a process has ended: no such process, or a zombie not reaped yet (the model
# processes check the same of each other).
from edit_pipeline.runtime_status import process_ended as gone

STUB_NAME = "triton_python_backend_stub"
SHARED_MEMORY = Path("/dev/shm")
# A region is orphaned when no process maps it and it is older than this (a new one is
# mapped by tritonserver as soon as it is made).
ORPHANED_AFTER_S = 10.0
# States of a process that has ended: no such process, a zombie, dead.
GONE = (None, "Z", "X")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, from the state on."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def state(pid: int) -> str | None:
    """The process state letter of /proc/PID/stat (R, S, D, Z, T, t, ...), None if gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def cpu_seconds(pid: int) -> float | None:
    """CPU time the process has used, user and system, all threads; None if gone."""
    fields = _stat_fields(pid)
    if not fields:
        return None
    # utime and stime are fields 14 and 15 of stat, in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pss_bytes(pid: int) -> int:
    """The process's proportional set size: its private memory plus its share of memory
    mapped by several processes; 0 when it is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in rollup.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def exited_unreaped(pid: int) -> bool:
    """Whether a child of this process has exited and is not reaped yet (its id, and its
    process group's, cannot be another process's meanwhile)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already: its pid may be another process's now
        return False


def children(pid: int) -> list[int]:
    """The process ids of a process's children (of all its threads)."""
    try:
        found = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(child) for child in (task / "children").read_text().split()]
        return found
    except OSError:
        return []


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants."""
    tree = [pid]
    for child in children(pid):
        tree += process_tree(child)
    return tree


@dataclass(frozen=True)
class ModelProcess:
    """One Python backend stub: which model instance it runs, and its shm region."""

    pid: int
    instance: str
    model: str
    shm_region: str


def read_stub(pid: int) -> ModelProcess | None:
    """The model process `pid` is, from its command line; None for any other process."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    # stub, model.py path, shm region, shm size, growth, parent pid, backend dir,
    # IPC handle, instance name, ...
    if len(argv) < 9 or not argv[0].endswith(STUB_NAME.encode()):
        return None
    model = Path(argv[1].decode()).parent.parent.name
    return ModelProcess(pid, argv[8].decode(), model, argv[2].decode())


def model_processes(server_pid: int) -> list[ModelProcess]:
    """The live Python backend model processes of a tritonserver."""
    found = []
    for pid in children(server_pid):
        stub = None if gone(pid) else read_stub(pid)
        if stub is not None:
            found.append(stub)
    return found


def shared_memory_prefix() -> str:
    """How the Python backend's shared memory regions of servers started in this PID
    namespace are named (tritonserver's shm-region-prefix-name). Every process that can
    map them is in this namespace's /proc, so a region none of them maps is orphaned even
    where /dev/shm is shared with other containers (host IPC)."""
    return f"triton_image_edit_{os.stat('/proc/self/ns/pid').st_ino}_"


def mapped_regions(prefix: str) -> set[str]:
    """The /dev/shm regions named `prefix...` that some process of this /proc maps."""
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            mapped.update(re.findall(rf"/dev/shm/({prefix}\S+)", maps.read_text()))
    return mapped


def remove_regions(names: set[str] | list[str]) -> None:
    """Removes shared memory regions by name; those already gone are skipped."""
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            (SHARED_MEMORY / name).unlink()


def remove_orphaned_shared_memory() -> list[str]:
    """Removes this user's regions of `shared_memory_prefix` that no process maps.

    A model process removes its region when it exits on its own, and the supervisor
    those of model processes it saw die; when all of them are killed at once (kill -9
    of every process, a machine out of memory), the regions stay in /dev/shm, memory no
    one can use, until the next supervisor's start removes them.
    """
    prefix = shared_memory_prefix()
    mapped = mapped_regions(prefix)
    removed = []
    for region in SHARED_MEMORY.glob(f"{prefix}*"):
        try:
            made = region.stat()
        except FileNotFoundError:
            continue
        young = time.time() - made.st_ctime < ORPHANED_AFTER_S
        if made.st_uid != os.getuid() or region.name in mapped or young:
            continue
        with contextlib.suppress(OSError):
            region.unlink()
            removed.append(region.name)
    return removed
