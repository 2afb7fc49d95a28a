"""A UNet's full pass and its shallow pass (reused UNet work) as one component: what the
python flavours' UNet model serves, so the shallow pass costs no process of its own.

A request that carries deep features runs the shallow pass, any other the full one;
requests of each kind that arrive together still merge into one call. The shallow pass
is loaded at its first request: a server whose clients never reuse UNet work never holds
it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from edit_pipeline.batching import Component, Tensors
from export.components import DEEP_FEATURES

# Where the repository builder puts the shallow pass's model file, in the UNet's version
# folder.
SHALLOW_DIR = "shallow"


class UNetPasses:
    """The full pass, and the shallow pass loaded on first use, behind one component."""

    def __init__(self, full: Component, load_shallow: Callable[[], Component]) -> None:
        self.full = full
        self._load_shallow = load_shallow
        self._shallow: Component | None = None
        self.input_names = [*full.input_names, DEEP_FEATURES]

    @property
    def shallow(self) -> Component:
        if self._shallow is None:
            self._shallow = self._load_shallow()
        return self._shallow

    def run_merged(self, requests: Sequence[Tensors]) -> list[Tensors]:
        """Per-request outputs: the shallow pass for requests with deep features, the full
        pass for the rest, each kind merged as its component merges."""
        results: list[Tensors] = [{} for _ in requests]
        shallow = [i for i, request in enumerate(requests) if DEEP_FEATURES in request]
        full = [i for i in range(len(requests)) if i not in shallow]
        for indices, is_shallow in ((full, False), (shallow, True)):
            if not indices:
                continue
            component = self.shallow if is_shallow else self.full
            merged = component.run_merged([requests[i] for i in indices])
            for index, outputs in zip(indices, merged, strict=True):
                results[index] = outputs
        return results

    def close(self) -> None:
        self.full.close()
        if self._shallow is not None:
            self._shallow.close()
