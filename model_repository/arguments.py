"""Command-line flags from a settings dataclass, so each setting is declared once.

Every field of a frozen dataclass with a `help` in its metadata becomes a flag named
after it (`unet_queue_delay_us` -> `--unet-queue-delay-us`), typed after its default:
booleans take `--x/--no-x`, tuples take several values. `from_arguments` builds the
dataclass back from the parsed namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A documented setting: a dataclass field whose help becomes its flag's."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def add_arguments(group: Any, settings: type, skip: tuple[str, ...] = ()) -> list[str]:
    """Adds a flag to `group` (a parser or argument group) per documented field; returns
    their destinations (the fields' names)."""
    added = []
    for field in dataclasses.fields(settings):
        if "help" not in field.metadata or field.name in skip:
            continue
        default = _default(field)
        flag = "--" + field.name.replace("_", "-")
        options: dict[str, Any] = {"dest": field.name, "default": default}
        help_text = f"{field.metadata['help']} (default: {default})"
        if "choices" in field.metadata:
            options["choices"] = field.metadata["choices"]
        if isinstance(default, bool):
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, help=help_text, **options
            )
        elif isinstance(default, tuple):
            element = type(default[0]) if default else str
            group.add_argument(flag, nargs="+", type=element, help=help_text, **options)
        else:
            kind = field.metadata.get("type", type(default) if default is not None else str)
            group.add_argument(flag, type=kind, help=help_text, **options)
        added.append(field.name)
    return added


def from_arguments(settings: type[T], args: argparse.Namespace, **given: Any) -> T:
    """The dataclass from the parsed flags (and `given` values for the other fields)."""
    values = dict(given)
    for field in dataclasses.fields(settings):  # type: ignore[arg-type]
        if field.name in vars(args) and field.name not in values:
            value = getattr(args, field.name)
            values[field.name] = tuple(value) if isinstance(_default(field), tuple) else value
    return settings(**values)


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None
