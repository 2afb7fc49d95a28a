"""How much of the machine other processes used while something was measured.

The build machines are shared: a test run started by someone else during a benchmark
round slows every system in it. The meter compares the machine's busy CPU time with
the CPU time of this process and its descendants (the server and its model processes,
perf_analyzer), so a disturbed round shows in the results instead of passing as a
slower system.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil


def _busy_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _own_seconds() -> float:
    """CPU seconds of this process, its live descendants and its reaped children."""
    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            cpu = process.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        total += cpu.user + cpu.system
    cpu = me.cpu_times()
    return total + cpu.children_user + cpu.children_system


@dataclass
class LoadMeter:
    """Start, measure something, then `foreign_fraction()`: 0 = nobody else, 1 = every core."""

    started_wall: float = 0.0
    started_busy: float = 0.0
    started_own: float = 0.0

    def start(self) -> LoadMeter:
        self.started_wall = time.monotonic()
        self.started_busy = _busy_seconds()
        self.started_own = _own_seconds()
        return self

    def foreign_fraction(self) -> float:
        wall = time.monotonic() - self.started_wall
        busy = _busy_seconds() - self.started_busy
        own = _own_seconds() - self.started_own
        cores = psutil.cpu_count() or 1
        if wall <= 0:
            return 0.0
        return max(0.0, min(1.0, (busy - own) / (wall * cores)))
