"""Keeps a tritonserver healthy: starts it, replaces models whose process died or hung,
starts it again when it dies, drains and stops it.

Triton 2.51 never replaces a Python backend model process that died (kill -9, an OOM
kill) or hangs: its model stays "ready" and every request routed to it fails. The
supervisor watches each model process (the stubs are tritonserver's children) and, when
one is gone, a zombie, stopped, or stuck in a call (see `Watchdog`), kills what is left of it,
unloads the model and loads it again (explicit model control, through the restricted
model-repository API with the admin key). While the model is unloaded, server readiness
is false (strict readiness), so load balancers and Kubernetes stop routing here; the dead
process's shared memory region is removed.

While a component is down, the edit models answer UNAVAILABLE (clients retry); while an
edit model reloads, Triton answers NOT_FOUND "has no available versions", which the
client library retries too.

tritonserver itself has one restart policy, here: one that exits or is stopped after it
served is killed with its model processes and started again, backing off while it keeps
failing; one that exits by itself before it ever served (a broken repository, a port in
use) is not, and `failure` says why; one killed by a signal while it starts is tried
again a few times. Each start names its shared memory regions with a prefix of its own,
so every region a dead server made is removed, including those of model processes the
supervisor never saw.

Draining (on stop): the `draining` marker makes edit models refuse new edits with
UNAVAILABLE, the `readiness` gate is unloaded so readiness turns false at once, and the
supervisor waits until no model instance is busy or the grace period has passed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edit_pipeline.runtime_status import (
    InstanceReport,
    forget_process,
    mark_draining,
    read_reports,
)
from model_repository.configs import READINESS_MODEL
from serving import procfs
from serving.admin import AdminClient
from serving.procfs import ModelProcess

log = logging.getLogger("serving.supervisor")

# tritonserver's exit or stop is checked this often; its model processes (a walk of
# /proc over its threads and children, and their reports) less often.
POLL_S = 0.2
MODEL_CHECK_S = 1.0
# A process stopped by a signal (SIGSTOP) this long is taken as hung; a shorter stop may
# be someone looking at it.
STOPPED_FOR_S = 1.0
# After a failed reload or restart, wait before the next try, doubling up to the maximum.
RETRY_S = 1.0
MAX_RETRY_S = 30.0
# Times a tritonserver killed by a signal before it ever served is started again.
STARTUP_CRASHES = 2
# Seconds tritonserver may take to exit once no model process of it unloads any more.
UNLOADED_EXIT_S = 3.0
# The key of tritonserver's own restarts among the models' retries.
SERVER = "tritonserver"

# Starts a tritonserver whose Python backend names its shared memory regions with the
# given prefix; returns its process.
Launch = Callable[[str], "subprocess.Popen[bytes]"]


@dataclass(frozen=True)
class Watchdog:
    """When a call counts as stuck: it has run past its limit (`factor` times the longest
    call of its instance, at least `floor_s`; `first_call_s` before any call finished)
    and its process has used less than `min_cpu_s` of CPU time for `stall_s`. Edits beat
    at every step, and a call waiting for another model (an edit's BLS call to a
    component) is that model's to account for. A call that computes is never stuck,
    however much longer than the ones before it runs (a first large image, a merged batch
    under load, a slower CPU); a process that computes nothing for that long is."""

    factor: float = 10.0
    floor_s: float = 10.0
    first_call_s: float = 300.0
    stall_s: float = 30.0
    min_cpu_s: float = 0.25

    def limit(self, report: InstanceReport) -> float:
        """How long one call of this instance may run before it may count as stuck."""
        if not report.longest_call_s:
            return self.first_call_s
        return max(self.floor_s, self.factor * report.longest_call_s)


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
class Watched:
    """A model process the supervisor watches, and since when it has used no CPU in a
    call."""

    stub: ModelProcess
    stopped: StopWatch = field(default_factory=StopWatch)
    cpu_at: float = 0.0
    since: float = 0.0

    def stalled_for(self, cpu: float, now: float, busy: bool, min_cpu_s: float) -> float:
        """Seconds the process has been busy without using `min_cpu_s` of CPU time."""
        if not busy or cpu - self.cpu_at >= min_cpu_s:
            self.cpu_at, self.since = cpu, now
        return now - self.since


class Supervisor:
    """Starts one tritonserver and keeps it healthy from a background thread.

    `launch` starts the server process, `admin` reaches its readiness and model control,
    `runtime_dir` is where its model instances report (edit_pipeline/runtime_status.py),
    `watchdog` says when a call is stuck.
    """

    def __init__(
        self,
        launch: Launch,
        admin: AdminClient,
        runtime_dir: Path,
        watchdog: Watchdog | None = None,
    ) -> None:
        self._launch_server = launch
        self.admin = admin
        self.runtime_dir = runtime_dir
        self.watchdog = watchdog or Watchdog()
        self.process: subprocess.Popen[bytes] | None = None
        # Why the server cannot be started; None while it runs or may still come up.
        self.failure: str | None = None
        self.recoveries: list[Recovery] = []
        self._shm_prefix = ""
        self._served = False
        self._ready_since_launch = False
        self._startup_crashes = 0
        self._server_stop_watch = StopWatch()
        self._next_model_check = 0.0
        self._processes: dict[int, Watched] = {}
        # Processes of models the supervisor replaced, until they end.
        self._retired: dict[int, ModelProcess] = {}
        self._retry_at: dict[str, float] = {}
        self._retry_delay: dict[str, float] = {}
        self._draining = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="triton-supervisor", daemon=True)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Removes what killed servers left behind, starts tritonserver and the watch."""
        removed = procfs.remove_orphaned_shared_memory()
        if removed:
            log.warning("removed %d shared memory regions no process uses", len(removed))
        self._launch()
        self._thread.start()

    def drain(self, grace_s: float) -> None:
        """Refuses new edits, turns readiness off, waits for edits in flight to finish."""
        with self._lock:
            self._draining = True
            mark_draining(self.runtime_dir)
            with contextlib.suppress(Exception):
                self.admin.unload(READINESS_MODEL)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self._edits_in_flight():
            time.sleep(POLL_S)

    def stop(self, exit_timeout_s: float) -> None:
        """Stops tritonserver (SIGINT: it unloads every model), then the watch; removes
        the shared memory of every server it started."""
        with self._lock:
            self._draining = True
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            self._wait_for_exit(process, exit_timeout_s)
        # Only now: a tritonserver that the watch started again dies with its thread
        # (parent-death signal).
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._remove_server_regions()

    def _launch(self) -> None:
        # Unique to this start, across every server this process or another starts.
        self._shm_prefix = f"{procfs.shared_memory_prefix()}{secrets.token_hex(6)}_"
        self._ready_since_launch = False
        self.process = self._launch_server(self._shm_prefix)

    def _wait_for_exit(self, process: subprocess.Popen[bytes], exit_timeout_s: float) -> None:
        """Waits for tritonserver to exit after SIGINT; kills it when it cannot.

        Triton 2.51 can keep a model live that it will never unload: one whose process
        died, and now and then a streaming model whose stream a client cancelled just as
        it ended, whose processes it never asks to unload (its gRPC frontend apparently
        never deletes that stream's request, which holds the model). Shutdown would wait
        the whole exit timeout for it. After the drain nothing is in flight: once no model
        process has been in a call or unloading for a while, the rest is that wait, cut
        short.
        """
        deadline = time.monotonic() + exit_timeout_s + 5
        settled_since: float | None = None
        while time.monotonic() < deadline:
            try:
                process.wait(timeout=0.5)
                return
            except subprocess.TimeoutExpired:
                pass
            if self._unloading(process.pid):
                settled_since = None
            elif settled_since is None:
                settled_since = time.monotonic()
            elif time.monotonic() - settled_since > UNLOADED_EXIT_S:
                break
        left = sorted({stub.model for stub in procfs.model_processes(process.pid)})
        log.warning(
            "tritonserver has not exited %s; killing it (model processes left: %s)",
            "with nothing left unloading" if settled_since else "within its exit timeout",
            ", ".join(left) or "none",
        )
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    # ------------------------------------------------------------------ watching

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                with self._lock:
                    self._check()
            except Exception:  # the supervisor must outlive anything it watches
                log.exception("supervisor check failed")

    def _check(self) -> None:
        process = self.process
        if process is None or self.failure is not None or self._draining:
            return
        if self._server_exited(process):
            self._on_server_exit(process.returncode)  # type: ignore[arg-type]
        elif not self._server_stopped(process.pid) and self._serving():
            now = time.monotonic()
            if now >= self._next_model_check:
                self._next_model_check = now + MODEL_CHECK_S
                self._watch_models()

    def _server_exited(self, process: subprocess.Popen[bytes]) -> bool:
        """Whether tritonserver has exited (it is then reaped, its model processes killed)."""
        if process.returncode is None and procfs.exited_unreaped(process.pid):
            # Its model processes outlive it for a while, each holding its model's memory.
            # They are killed while the dead server, not yet reaped, still holds the
            # process group's id (reaped, the id could be a new process's).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        return process.poll() is not None

    def _server_stopped(self, pid: int) -> bool:
        """Whether tritonserver is stopped by a signal; one stopped for STOPPED_FOR_S is
        hung, and is killed with its model processes (started again at the next check).
        Nothing else is checked meanwhile: a stopped server answers no request."""
        state = procfs.state(pid)
        if self._server_stop_watch.hung(state, time.monotonic()):
            log.warning("tritonserver is stopped; killing it to start it again")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        return state == "T"

    def _serving(self) -> bool:
        """Whether the server has been ready since it was last started."""
        if not self._ready_since_launch and self.admin.is_ready():
            self._ready_since_launch = self._served = True
            # Started again and serving: its next crash is restarted without a wait.
            self._retry_delay.pop(SERVER, None)
            self._retry_at.pop(SERVER, None)
        return self._ready_since_launch

    def _watch_models(self) -> None:
        self._discover()
        if self._retired:
            self._retire()
        for model, (why, pids) in self._broken().items():
            if time.monotonic() < self._retry_at.get(model, 0.0):
                continue
            if self._unloaded_on_purpose(model):
                # An operator unloaded it (model-repository API): not a failure.
                for pid in pids:
                    self._retired[pid] = self._processes.pop(pid).stub
                continue
            self._recover(model, why, pids)

    def _discover(self) -> None:
        """Records model processes that appeared (at start and after each reload)."""
        assert self.process is not None
        for stub in procfs.model_processes(self.process.pid):
            if stub.pid not in self._processes and stub.pid not in self._retired:
                self._processes[stub.pid] = Watched(stub)

    def _broken(self) -> dict[str, tuple[str, list[int]]]:
        """Models with a process that died, hung or is stuck: why, and those processes."""
        now = time.time()
        reports = read_reports(self.runtime_dir)
        broken: dict[str, tuple[str, list[int]]] = {}
        for pid, watched in self._processes.items():
            why = self._fault(watched, reports.get(pid), now, self.watchdog)
            if why is not None:
                broken.setdefault(watched.stub.model, (why, []))[1].append(pid)
        return broken

    @staticmethod
    def _fault(
        watched: Watched, report: InstanceReport | None, now: float, watchdog: Watchdog
    ) -> str | None:
        """What is wrong with a model process, or None."""
        stub = watched.stub
        state = procfs.state(stub.pid)
        if state in procfs.GONE:
            return f"the process of {stub.instance} exited"
        if watched.stopped.hung(state, now):
            return f"the process of {stub.instance} is stopped"
        cpu = procfs.cpu_seconds(stub.pid)
        if state == "T" or report is None or cpu is None:
            return None
        busy = bool(report.busy_since) and not report.waiting
        stalled_s = watched.stalled_for(cpu, now, busy, watchdog.min_cpu_s)
        busy_s, limit_s = report.busy_for(now), watchdog.limit(report)
        if busy and busy_s > limit_s and stalled_s > watchdog.stall_s:
            return (
                f"{stub.instance} has been in one call for {busy_s:.0f} s (limit "
                f"{limit_s:.0f} s) and used no CPU for the last {stalled_s:.0f} s"
            )
        return None

    # ------------------------------------------------------------------ healing

    def _unloaded_on_purpose(self, model: str) -> bool:
        """Whether the model is not ready in Triton's eyes: a model whose process died
        stays "ready" there, one that was unloaded does not. One whose reload by the
        supervisor failed is not ready either, and is tried again."""
        return model not in self._retry_at and self.admin.is_model_ready(model) is False

    def _recover(self, model: str, why: str, broken_pids: list[int]) -> None:
        started = time.monotonic()
        log.warning("model %s: %s; reloading it", model, why)
        try:
            for pid in broken_pids:
                # A hung process is killed; a healthy sibling finishes its edit first.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            # Unloaded, the model makes server readiness false (strict readiness) until
            # the new one is loaded.
            self.admin.unload(model)
            self.admin.load(model)
        except Exception as error:
            delay = self._back_off(model)
            log.warning("model %s: reload failed (%s); next try in %.0f s", model, error, delay)
            return
        self._retry_delay.pop(model, None)
        self._retry_at.pop(model, None)
        for pid in [pid for pid, w in self._processes.items() if w.stub.model == model]:
            self._retired[pid] = self._processes.pop(pid).stub
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
        reports = read_reports(self.runtime_dir)
        for pid, stub in list(self._retired.items()):
            report = reports.get(pid)
            if not procfs.gone(pid) and report is not None and report.busy_since:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            del self._retired[pid]
            procfs.remove_regions([stub.shm_region])
            forget_process(self.runtime_dir, pid)

    def _on_server_exit(self, returncode: int) -> None:
        """The one restart policy of tritonserver (see the module's docstring)."""
        gave_up = returncode >= 0 or self._startup_crashes >= STARTUP_CRASHES
        if not self._served and gave_up:
            self.failure = f"tritonserver exited with {returncode}"
            self._remove_server_regions()
            return
        if time.monotonic() < self._retry_at.get(SERVER, 0.0):
            return
        if not self._served:
            self._startup_crashes += 1
        log.warning("tritonserver exited with %s; starting it again", returncode)
        for pid in (*self._processes, *self._retired):
            forget_process(self.runtime_dir, pid)
        self._processes.clear()
        self._retired.clear()
        self._remove_server_regions()
        # The new server loads every model: failed reloads of the old one are forgotten.
        self._retry_at = {k: v for k, v in self._retry_at.items() if k == SERVER}
        self._retry_delay = {k: v for k, v in self._retry_delay.items() if k == SERVER}
        # A server that keeps exiting (a port taken, a broken repository) is retried slower.
        self._back_off(SERVER)
        self._launch()
        self.recoveries.append(Recovery(SERVER, f"it exited with {returncode}", 0.0))

    def _back_off(self, what: str) -> float:
        """After a failed reload or restart: the wait before the next try, doubled."""
        delay = min(MAX_RETRY_S, 2 * self._retry_delay.get(what, RETRY_S / 2))
        self._retry_delay[what] = delay
        self._retry_at[what] = time.monotonic() + delay
        return delay

    def _remove_server_regions(self) -> None:
        """Removes the shared memory of the server started last, which has exited: every
        region with its prefix, whichever model process it was made for."""
        if self._shm_prefix:
            procfs.remove_regions(
                [region.name for region in procfs.SHARED_MEMORY.glob(f"{self._shm_prefix}*")]
            )

    # ------------------------------------------------------------------ state

    @property
    def shm_prefix(self) -> str:
        """The prefix of the shared memory regions of the server running now."""
        return self._shm_prefix

    def _unloading(self, server_pid: int) -> bool:
        """Whether a model process of the stopping tritonserver is in a call or unloading
        (or tells neither: a model that keeps no report)."""
        reports = read_reports(self.runtime_dir)
        for stub in procfs.model_processes(server_pid):
            report = reports.get(stub.pid)
            if report is None or report.busy_since or report.unloading:
                return True
        return False

    def _edits_in_flight(self) -> bool:
        """Whether any live model process is in a call (an edit, or a component for one)."""
        reports = read_reports(self.runtime_dir)
        return any(r.busy_since and not procfs.gone(pid) for pid, r in reports.items())
