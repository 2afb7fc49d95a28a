"""Interleaved rounds on a shared machine: measuring each, leaving out disturbed ones.

The build machines are shared: a test run someone else starts during a round slows
every system in it. The meter compares the machine's busy CPU time with the CPU time of
this process and its descendants (the server and its model processes, perf_analyzer); a
round in which others used more than DISTURBED_LOAD of the machine is measured again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import psutil

T = TypeVar("T")
DISTURBED_LOAD = 0.05
MAX_EXTRA_ROUNDS = 3


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
        if wall <= 0:
            return 0.0
        return max(0.0, min(1.0, (busy - own) / (wall * (psutil.cpu_count() or 1))))


@dataclass
class RoundLoads:
    """Other processes' share of the machine per round: kept rounds and left-out ones."""

    kept: list[float] = field(default_factory=list)
    discarded: list[float] = field(default_factory=list)


def undisturbed_rounds(
    rounds: int, measure: Callable[[int], T], loads: RoundLoads, log: Callable[[str], None]
) -> list[T]:
    """`measure(attempt)` until `rounds` rounds ran with the machine to ourselves, or
    MAX_EXTRA_ROUNDS more were tried; returns the kept rounds' results."""
    kept: list[T] = []
    attempt = 0
    while len(kept) < rounds:
        attempt += 1
        log(f"round {len(kept) + 1} of {rounds} (attempt {attempt})")
        meter = LoadMeter().start()
        result = measure(attempt)
        load = meter.foreign_fraction()
        log(f"  other processes used {load:.0%} of the machine")
        if load > DISTURBED_LOAD and attempt < rounds + MAX_EXTRA_ROUNDS:
            loads.discarded.append(load)
            log("  round left out and measured again")
            continue
        loads.kept.append(load)
        kept.append(result)
    return kept
