"""The idle release's timing: once after the last call, never during one, never while
calls keep coming, never with no delay set. Fake releases (a counter); the OpenVINO
UNet's own is in tests/test_openvino.py."""

from __future__ import annotations

import threading
import time

from edit_pipeline.idle_release import IdleRelease

# Long against a thread's wake-up on a loaded 2-core machine, short for the suite.
AFTER_S = 0.3
WAIT_S = 10.0


def wait_for(condition, timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_releases_once_after_the_last_call() -> None:
    released_at: list[float] = []
    idle = IdleRelease(lambda: released_at.append(time.monotonic()), AFTER_S)
    called = time.monotonic()
    with idle.calling():
        pass
    assert wait_for(lambda: idle.releases == 1)
    assert released_at[0] - called >= AFTER_S
    time.sleep(AFTER_S)
    assert idle.releases == 1 and len(released_at) == 1
    # A call after the release arms it again.
    with idle.calling():
        pass
    assert wait_for(lambda: idle.releases == 2)
    idle.close()


def test_no_release_while_calls_keep_coming() -> None:
    idle = IdleRelease(lambda: None, AFTER_S)
    started = time.monotonic()
    while time.monotonic() - started < 3 * AFTER_S:
        with idle.calling():
            pass
        time.sleep(AFTER_S / 10)
    assert idle.releases == 0
    assert wait_for(lambda: idle.releases == 1)
    idle.close()


def test_no_release_during_a_call_longer_than_the_delay() -> None:
    inside = threading.Event()
    during: list[bool] = []
    idle = IdleRelease(lambda: during.append(inside.is_set()), AFTER_S)
    with idle.calling():
        pass
    with idle.calling():
        inside.set()
        time.sleep(2 * AFTER_S)
        inside.clear()
    assert wait_for(lambda: idle.releases == 1)
    assert during == [False]
    idle.close()


def test_no_delay_never_releases_and_starts_no_thread() -> None:
    threads = threading.active_count()
    idle = IdleRelease(lambda: None, 0)
    assert threading.active_count() == threads
    with idle.calling():
        pass
    time.sleep(AFTER_S)
    assert idle.releases == 0
    idle.close()


def test_close_stops_the_watcher() -> None:
    idle = IdleRelease(lambda: None, AFTER_S)
    with idle.calling():
        pass
    idle.close()
    time.sleep(1.5 * AFTER_S)
    assert idle.releases == 0
    assert not any(thread.name == "idle-release" for thread in threading.enumerate())
