"""The shapes an edit sends a component, checked before a request reaches it.

The components are Triton models any client can call. An input past what an edit sends
costs minutes and, at SD 1.5 size, more memory than the machine has (a latent of a
4096-pixel side); one short of it (a 1x1 image, a latent side of 0, deep features of
another side than the sample's) fails inside the runtime, and in OpenVINO it can leave
the compiled model computing NaN for the next edit's calls. Triton checks each input's
rank and fixed sizes against the model's config; this checks the dynamic ones: each
named axis within its range and multiple, and the same axis the same size in every
input of a request. model_repository/configs.py writes the description into the
component's config (`input_shapes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pix2pix_client.contract import InvalidArgumentError


@dataclass(frozen=True)
class AxisBounds:
    """The sizes an edit sends along one named axis: least..most, in steps of `multiple`."""

    least: int
    most: int
    multiple: int = 1

    def allows(self, size: int) -> bool:
        return self.least <= size <= self.most and size % self.multiple == 0

    def __str__(self) -> str:
        steps = f" in multiples of {self.multiple}" if self.multiple > 1 else ""
        return f"{self.least}..{self.most}{steps}"


@dataclass(frozen=True)
class InputShapes:
    """Each input's dims (a fixed size, or the name of an axis) and each axis's bounds."""

    dims: dict[str, tuple[int | str, ...]]
    axes: dict[str, AxisBounds]

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": {name: list(dims) for name, dims in self.dims.items()},
            "axes": {axis: [b.least, b.most, b.multiple] for axis, b in self.axes.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InputShapes:
        return cls(
            dims={name: tuple(dims) for name, dims in data["inputs"].items()},
            axes={axis: AxisBounds(*bounds) for axis, bounds in data["axes"].items()},
        )

    def check(self, feed: dict[str, np.ndarray]) -> None:
        """Raises InvalidArgumentError naming the first input whose shape no edit sends."""
        seen: dict[str, tuple[str, int]] = {}  # axis: (the input it was first read in, size)
        for name, array in feed.items():
            shape = list(array.shape)
            # A [batch] input arrives as [batch, 1]: its leading sides are its dims.
            for dim, size in zip(self.dims.get(name, ()), shape, strict=False):
                if isinstance(dim, int):
                    continue
                bounds = self.axes[dim]
                if not bounds.allows(size):
                    raise InvalidArgumentError(
                        name,
                        f"{name} has shape {shape}: {dim} {size}, allowed {bounds} "
                        "(the shapes of the images this server edits)",
                    )
                first, first_size = seen.setdefault(dim, (name, size))
                if size != first_size:
                    raise InvalidArgumentError(
                        name,
                        f"{name} has shape {shape}: {dim} {size} where {first} has "
                        f"{first_size}: allowed the same",
                    )
