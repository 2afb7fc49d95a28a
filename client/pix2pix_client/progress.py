"""Progress bars of the `pix2pix` command on a terminal (rich).

One bar for the whole batch (edits done of edits asked for) and one per edit in
flight: denoising steps done of the steps it runs, steps per second, time left.
Nothing is drawn when stderr is not a terminal: pipes and --json stay clean.
"""

from __future__ import annotations

from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from pix2pix_client.request import Progress as StepEvent


class EditProgress:
    """The batch bar and the per-edit bars; a no-op when disabled."""

    def __init__(self, total: int, stream: TextIO, enabled: bool) -> None:
        self.enabled = enabled
        self._bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=Console(file=stream, force_terminal=enabled),
            transient=False,
            disable=not enabled,
        )
        self._batch = self._bars.add_task(
            "edited", total=total, unit="images", rate="", visible=total > 1
        )

    def __enter__(self) -> EditProgress:
        self._bars.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._bars.stop()

    def start_edit(self, name: str) -> TaskID:
        """A bar for one edit; its length is known with the first step."""
        return self._bars.add_task(name, total=None, unit="steps", rate="")

    def step(self, edit: TaskID, event: StepEvent) -> None:
        self._bars.update(edit, total=event.num_steps, completed=event.step)
        speed = self._bars.tasks[self._task_index(edit)].speed
        if speed:
            self._bars.update(edit, rate=f"{speed:.1f} steps/s")

    def remove_edit(self, edit: TaskID) -> None:
        """The edit's stream ended: its bar goes."""
        self._bars.remove_task(edit)

    def edit_done(self, *, failed: bool = False) -> None:
        """One more edit of the batch is done (or failed)."""
        self._bars.advance(self._batch)
        if failed:
            done = self._bars.tasks[self._task_index(self._batch)]
            failures = int(done.fields.get("failures", 0)) + 1
            self._bars.update(self._batch, failures=failures, rate=f"{failures} failed")

    def print(self, message: str) -> None:
        """A line above the bars (a result or an error), or plain when disabled."""
        if self.enabled:
            self._bars.console.print(message, highlight=False, markup=False)

    def _task_index(self, task: TaskID) -> int:
        return next(i for i, t in enumerate(self._bars.tasks) if t.id == task)
