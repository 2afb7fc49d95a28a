"""Keeps a tritonserver healthy: replaces models whose process died or hung, drains.

Triton 2.51 never replaces a Python backend model process that died (kill -9, an OOM
kill) or hangs: its model stays "ready" and every request routed to it fails. The
supervisor watches each model process (the stubs are tritonserver's children) and, when
one is gone, a zombie, stopped, or busy far longer than its calls take, kills what is
left of it, unloads the model and loads it again (explicit model control, through the
restricted model-repository API with the admin key). While the model is unloaded,
server readiness is false (strict readiness), so load balancers and Kubernetes stop
routing here; the dead process's shared memory region is removed.

While a component is down, the edit models answer UNAVAILABLE (clients retry); while an
edit model reloads, Triton answers NOT_FOUND "has no available versions", which the
client library retries too. If tritonserver itself exits or is stopped, it is killed with
its model processes and started again.

Draining (on stop): the `draining` marker makes edit models refuse new edits with
UNAVAILABLE, the `readiness` gate is unloaded so readiness turns false at once, and the
supervisor waits until no model instance is busy or the grace period has passed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from model_repository.configs import READINESS_MODEL
from model_repository.runtime import InstanceReport, forget_process, mark_draining, read_reports

if TYPE_CHECKING:
    from model_repository.server import TritonServer

log = logging.getLogger("model_repository.supervisor")

STUB_NAME = "triton_python_backend_stub"
SHARED_MEMORY = Path("/dev/shm")
# A region is orphaned when no process maps it and it is older than this (a new one is
# mapped by tritonserver as soon as it is made).
ORPHANED_AFTER_S = 10.0
POLL_S = 0.2
# A call is stuck when it has run this many times longer than the longest one that
# finished, and at least STUCK_FLOOR_S; before any call finished, FIRST_CALL_S.
STUCK_FACTOR = 10.0
STUCK_FLOOR_S = 10.0
FIRST_CALL_S = 300.0
# A process stopped by a signal (SIGSTOP) this long is taken as hung; a shorter stop may
# be someone looking at it.
STOPPED_FOR_S = 1.0
# After a failed reload or restart, wait before the next try, doubling up to the maximum.
RETRY_S = 1.0
MAX_RETRY_S = 30.0
GONE = (None, "Z", "X")
# The key of tritonserver's own restarts among the models' retries.
SERVER = "tritonserver"


def stuck_limit(report: InstanceReport) -> float:
    """How long one call of this instance may run before it counts as stuck."""
    if not report.longest_call_s:
        return FIRST_CALL_S
    return max(STUCK_FLOOR_S, STUCK_FACTOR * report.longest_call_s)


@dataclass(frozen=True)
class Recovery:
    """One replacement the supervisor made: what, why, and how long it took."""

    model: str
    why: str
    seconds: float


@dataclass
class StopWatch:
    """Since when a process has been stopped by a signal (state T), from its states as
    they are seen; stopped for STOPPED_FOR_S, it is taken as hung."""

    since: float | None = None

    def hung(self, state: str | None, now: float) -> bool:
        if state != "T":
            self.since = None
            return False
        self.since = self.since or now
        return now - self.since >= STOPPED_FOR_S


@dataclass
class ModelProcess:
    """One Python backend stub: which model instance it runs, and its shm region."""

    pid: int
    instance: str
    model: str
    shm_region: str
    stopped: StopWatch = field(default_factory=StopWatch)


def _read_stub(pid: int) -> ModelProcess | None:
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


def _state(pid: int) -> str | None:
    """The process state letter of /proc/PID/stat (R, S, D, Z, T, t, ...), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]


def gone(pid: int) -> bool:
    """Whether a process has ended: no such process, or a zombie not reaped yet."""
    return _state(pid) in GONE


def model_processes(server_pid: int) -> list[ModelProcess]:
    """The live Python backend model processes of a tritonserver."""
    found = []
    for pid in _children(server_pid):
        stub = _read_stub(pid) if not gone(pid) else None
        if stub is not None:
            found.append(stub)
    return found


def shared_memory_prefix() -> str:
    """How the Python backend's shared memory regions of servers started in this PID
    namespace are named (tritonserver's shm-region-prefix-name). Every process that can
    map them is in this namespace's /proc, so a region none of them maps is orphaned even
    where /dev/shm is shared with other containers (host IPC)."""
    return f"triton_image_edit_{os.stat('/proc/self/ns/pid').st_ino}_"


def remove_orphaned_shared_memory() -> list[str]:
    """Removes this user's regions of `shared_memory_prefix` that no process maps.

    A model process removes its region when it exits on its own, and the supervisor
    those of model processes it saw die; when all of them are killed at once (kill -9
    of every process, a machine out of memory), the regions stay in /dev/shm, memory no
    one can use, until the next supervisor's start removes them.
    """
    prefix = shared_memory_prefix()
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            mapped.update(re.findall(rf"/dev/shm/({prefix}\S+)", maps.read_text()))
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


def _exited(pid: int) -> bool:
    """Whether a child process has exited and is not reaped yet."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already: its pid may be another process's now
        return False


def _children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        found = []
        for task in tasks:
            text = (task / "children").read_text()
            found += [int(child) for child in text.split()]
        return found
    except OSError:
        return []


class Supervisor:
    """Watches one TritonServer's model processes from a background thread."""

    def __init__(self, server: TritonServer) -> None:
        self.server = server
        self.processes: dict[int, ModelProcess] = {}
        # Processes of models the supervisor replaced, until they end.
        self.retired: dict[int, ModelProcess] = {}
        self.dead_regions: set[str] = set()
        self.recoveries: list[Recovery] = []
        self.restarting = False
        self._served = False
        self._server_stop_watch = StopWatch()
        self._retry_at: dict[str, float] = {}
        self._retry_delay: dict[str, float] = {}
        self._draining = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="triton-supervisor", daemon=True)

    def start(self) -> None:
        removed = remove_orphaned_shared_memory()
        if removed:
            log.warning("removed %d shared memory regions no process uses", len(removed))
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------ watching

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                with self._lock:
                    self._check()
            except Exception:  # the supervisor must outlive anything it watches
                log.exception("supervisor check failed")

    def _check(self) -> None:
        process = self.server.process
        if process is None:
            return
        if process.returncode is None and _exited(process.pid):
            # Its model processes outlive it for a while, each holding its model's memory.
            # They are killed while the dead server, not yet reaped, still holds the
            # process group's id (reaped, the id could be a new process's).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        if process.poll() is not None:
            # A crash is restarted; a server that never came up (a broken repository, a
            # port in use) is left to fail its start.
            if self._served and not self._draining:
                self._restart_server(process.returncode)
            return
        if self._draining or self._server_stopped(process.pid):
            # Draining, models unload as the server exits: not failures to heal.
            return
        if not self._served:
            self._served = self.server.is_ready()
            if not self._served:
                return
        if SERVER in self._retry_delay and self.server.is_ready():
            # Started again and serving: its next crash is restarted without a wait.
            del self._retry_delay[SERVER]
        self._discover()
        if self.retired:
            self._retire()
        for model, (why, pids) in self._broken().items():
            if time.monotonic() < self._retry_at.get(model, 0.0):
                continue
            if self._unloaded_on_purpose(model):
                # An operator unloaded it (model-repository API): not a failure.
                for pid in pids:
                    self.retired[pid] = self.processes.pop(pid)
                continue
            self._recover(model, why, pids)

    def _server_stopped(self, pid: int) -> bool:
        """Whether tritonserver is stopped by a signal; one stopped for STOPPED_FOR_S is
        hung, and is killed with its model processes (started again at the next check).
        Nothing else is checked meanwhile: a stopped server answers no request."""
        state = _state(pid)
        if self._server_stop_watch.hung(state, time.monotonic()):
            log.warning("tritonserver is stopped; killing it to start it again")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        return state == "T"

    def _discover(self) -> None:
        """Records model processes that appeared (at start and after each reload)."""
        assert self.server.process is not None
        for stub in model_processes(self.server.process.pid):
            if stub.pid not in self.processes and stub.pid not in self.retired:
                self.processes[stub.pid] = stub

    def _broken(self) -> dict[str, tuple[str, list[int]]]:
        """Models with a process that died, hung or is stuck: why, and those processes."""
        now = time.time()
        reports = read_reports(self.server.runtime_dir)
        broken: dict[str, tuple[str, list[int]]] = {}

        def fail(stub: ModelProcess, why: str) -> None:
            broken.setdefault(stub.model, (why, []))[1].append(stub.pid)

        for pid, stub in self.processes.items():
            state = _state(pid)
            if state in GONE:
                fail(stub, f"the process of {stub.instance} exited")
            elif stub.stopped.hung(state, now):
                fail(stub, f"the process of {stub.instance} is stopped")
            elif state != "T":
                report = reports.get(pid)
                if report is not None and report.busy_for(now) > stuck_limit(report):
                    fail(
                        stub,
                        f"{stub.instance} has been in one call for {report.busy_for(now):.0f} s "
                        f"(limit {stuck_limit(report):.0f} s)",
                    )
        return broken

    # ------------------------------------------------------------------ healing

    def _unloaded_on_purpose(self, model: str) -> bool:
        """Whether the model is not ready in Triton's eyes: a model whose process died
        stays "ready" there, one that was unloaded does not. One whose reload by the
        supervisor failed is not ready either, and is tried again."""
        if model in self._retry_at:
            return False
        client = self.server.http_client()
        try:
            return not client.is_model_ready(model)  # type: ignore[attr-defined]
        except Exception:
            return False
        finally:
            client.close()  # type: ignore[attr-defined]

    def _recover(self, model: str, why: str, broken_pids: list[int]) -> None:
        started = time.monotonic()
        log.warning("model %s: %s; reloading it", model, why)
        client = self.server.http_client()
        headers = self.server.http_admin_headers
        try:
            for pid in broken_pids:
                # A hung process is killed; a healthy sibling finishes its edit first.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            # Unloaded, the model makes server readiness false (strict readiness) until
            # the new one is loaded.
            client.unload_model(model, headers=headers)  # type: ignore[attr-defined]
            client.load_model(model, headers=headers)  # type: ignore[attr-defined]
        except Exception as error:
            delay = self._back_off(model)
            log.warning("model %s: reload failed (%s); next try in %.0f s", model, error, delay)
            return
        finally:
            client.close()  # type: ignore[attr-defined]
        self._retry_delay.pop(model, None)
        self._retry_at.pop(model, None)
        for stub in [s for s in self.processes.values() if s.model == model]:
            del self.processes[stub.pid]
            self.retired[stub.pid] = stub
        self._retire()
        elapsed = time.monotonic() - started
        self.recoveries.append(Recovery(model, why, elapsed))
        log.warning("model %s reloaded in %.1f s", model, elapsed)

    def _retire(self) -> None:
        """Ends the processes of replaced models and removes their shared memory.

        A model whose process died while it ran a request never finishes unloading in
        Triton 2.51, and keeps its other instances' processes: each is killed once it is
        no longer in a call (an unloading model gets no new requests).
        """
        reports = read_reports(self.server.runtime_dir)
        for pid, stub in list(self.retired.items()):
            report = reports.get(pid)
            if not gone(pid) and report is not None and report.busy_since:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            del self.retired[pid]
            self.dead_regions.add(stub.shm_region)
            forget_process(self.server.runtime_dir, pid)
        self.remove_shared_memory()

    def _restart_server(self, returncode: int | None) -> None:
        if time.monotonic() < self._retry_at.get(SERVER, 0.0):
            return
        log.warning("tritonserver exited with %s; starting it again", returncode)
        for stub in (*self.processes.values(), *self.retired.values()):
            self.dead_regions.add(stub.shm_region)
            forget_process(self.server.runtime_dir, stub.pid)
        self.processes.clear()
        self.retired.clear()
        self.remove_shared_memory()
        # The new server loads every model: failed reloads of the old one are forgotten.
        for key in [key for key in self._retry_at if key != SERVER]:
            del self._retry_at[key]
            self._retry_delay.pop(key, None)
        # A server that keeps exiting (a port taken, a broken repository) is retried slower.
        self._back_off(SERVER)
        self.restarting = True
        try:
            self.server._launch()
        finally:
            self.restarting = False
        self.recoveries.append(Recovery(SERVER, f"it exited with {returncode}", 0.0))

    def _back_off(self, what: str) -> float:
        """After a failed reload or restart: the wait before the next try, doubled."""
        delay = min(MAX_RETRY_S, 2 * self._retry_delay.get(what, RETRY_S / 2))
        self._retry_delay[what] = delay
        self._retry_at[what] = time.monotonic() + delay
        return delay

    def remove_shared_memory(self) -> None:
        """Removes the shared memory regions of model processes that are gone."""
        for region in list(self.dead_regions):
            with contextlib.suppress(FileNotFoundError):
                (SHARED_MEMORY / region).unlink()
            self.dead_regions.discard(region)

    # ------------------------------------------------------------------ stopping

    def drain(self, grace_s: float) -> None:
        """Refuses new edits, turns readiness off, waits for edits in flight to finish."""
        with self._lock:
            self._draining = True
            mark_draining(self.server.runtime_dir)
            client = self.server.http_client()
            try:
                with contextlib.suppress(Exception):
                    client.unload_model(  # type: ignore[attr-defined]
                        READINESS_MODEL, headers=self.server.http_admin_headers
                    )
            finally:
                client.close()  # type: ignore[attr-defined]
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self._edits_in_flight():
            time.sleep(POLL_S)
        # Every model process is a region to remove once the server is gone, including
        # those started since the last check (a server stopped right after it came up).
        with self._lock:
            if self.server.process is not None and self.server.process.poll() is None:
                self._discover()
            for stub in (*self.processes.values(), *self.retired.values()):
                self.dead_regions.add(stub.shm_region)

    def _edits_in_flight(self) -> bool:
        """Whether any live model process is in a call (an edit, or a component for one)."""
        reports = read_reports(self.server.runtime_dir)
        return any(r.busy_since and not gone(pid) for pid, r in reports.items())

    def model_processes_alive(self) -> bool:
        """Whether a model process of the current models still runs (after SIGINT: they
        end as their models unload)."""
        return any(not gone(pid) for pid in self.processes)
