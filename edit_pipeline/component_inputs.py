"""The inputs an edit sends a component, checked before a request reaches it.

The components are Triton models any client can call. An input past what an edit sends
costs minutes and, at SD 1.5 size, more memory than the machine has (a latent of a
4096-pixel side); one short of it (a 1x1 image, a latent side of 0, deep features of
another side than the sample's) fails inside the runtime, and in OpenVINO it can leave
the compiled model computing NaN for the next edit's calls. Triton checks each input's
rank and fixed sizes against the model's config; this checks the dynamic ones: each
named axis within its range and multiple, and the same axis the same size in every
input of a request. A token id past the vocabulary fails in onnxruntime and reads an
embedding OpenVINO makes up: an integer input's values are checked against its bounds.
model_repository/configs.py writes the description into the component's config
(`input_bounds`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pix2pix_client.contract import InvalidArgumentError


@dataclass(frozen=True)
class Bounds:
    """least..most in steps of `multiple`: the sizes an edit sends along one named axis,
    or the values of an integer input."""

    least: int
    most: int
    multiple: int = 1

    def allows(self, value: int) -> bool:
        return self.least <= value <= self.most and value % self.multiple == 0

    def __str__(self) -> str:
        steps = f" in multiples of {self.multiple}" if self.multiple > 1 else ""
        return f"{self.least}..{self.most}{steps}"


@dataclass(frozen=True)
class InputBounds:
    """Each input's dims (a fixed size, or the name of an axis), each axis's bounds, and
    the bounds of the values of the integer inputs that have them."""

    dims: dict[str, tuple[int | str, ...]]
    axes: dict[str, Bounds]
    values: dict[str, Bounds] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def listed(bounds: dict[str, Bounds]) -> dict[str, list[int]]:
            return {name: [b.least, b.most, b.multiple] for name, b in bounds.items()}

        return {
            "inputs": {name: list(dims) for name, dims in self.dims.items()},
            "axes": listed(self.axes),
            "values": listed(self.values),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InputBounds:
        return cls(
            dims={name: tuple(dims) for name, dims in data["inputs"].items()},
            axes={axis: Bounds(*bounds) for axis, bounds in data["axes"].items()},
            # No values in a repository built before they were bounded.
            values={name: Bounds(*bounds) for name, bounds in data.get("values", {}).items()},
        )

    def check(self, feed: dict[str, np.ndarray]) -> None:
        """Raises InvalidArgumentError naming the first input whose shape no edit sends, or
        that holds a value past its bounds."""
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
            bounds = self.values.get(name)
            if bounds is not None and array.size:
                for value in (array.min(), array.max()):
                    if not bounds.allows(int(value)):
                        raise InvalidArgumentError(name, f"{name} holds {value}: allowed {bounds}")
