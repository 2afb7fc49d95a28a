"""Gives a component's working memory back once it has had no call for a while.

A UNet is called at every step of every edit, so it keeps the working memory of its last
call for the next one. Between edits nothing needs it: at SD 1.5 size, 512x512 in bf16,
an OpenVINO UNet holds about 0.5 GB of it, released in about 40 ms and allocated again by
the next call at no cost the edit's time shows (benchmarks/README.md). A watcher thread
releases it once the component has been idle `after_s` seconds, never during a call: calls
and the release hold one lock.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator


class IdleRelease:
    """Calls `release` once, `after_s` seconds after the last call that ended, unless
    another call came meanwhile; `after_s` <= 0 never releases."""

    def __init__(self, release: Callable[[], None], after_s: float) -> None:
        self._release = release
        self.after_s = after_s
        self._condition = threading.Condition()
        # When the last call ended; None while there is nothing to give back.
        self._last_call: float | None = None
        self._closed = False
        # How many times the working memory was given back.
        self.releases = 0
        self._watcher: threading.Thread | None = None
        if after_s > 0:
            self._watcher = threading.Thread(target=self._watch, name="idle-release", daemon=True)
            self._watcher.start()

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """Holds the component for one call: no release runs meanwhile."""
        with self._condition:
            try:
                yield
            finally:
                self._last_call = time.monotonic()
                self._condition.notify()

    def _watch(self) -> None:
        with self._condition:
            while not self._closed:
                if self._last_call is None:
                    self._condition.wait()
                    continue
                idle_for = time.monotonic() - self._last_call
                if idle_for < self.after_s:
                    self._condition.wait(self.after_s - idle_for)
                    continue
                self._release()
                self._last_call = None
                self.releases += 1

    def close(self) -> None:
        """Stops the watcher; a release under way finishes first."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        if self._watcher is not None:
            self._watcher.join()
