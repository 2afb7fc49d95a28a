"""The public contract of the served edit models: inputs, defaults and allowed values.

This module is the single source of truth for request parameters. The client validates
with it before a request crosses the network, and the server's preprocess model imports
it to validate the same way, so both sides answer a bad value with the same message.
It depends on nothing but the standard library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# The two pipelines, each served as a model of the same name (one response per edit)
# and as a streaming model, `<pipeline>_stream` (progress events, then the result).
INSTRUCT_PIX2PIX = "instruct_pix2pix"
IMG2IMG = "img2img"
PIPELINES = (INSTRUCT_PIX2PIX, IMG2IMG)
STREAM_SUFFIX = "_stream"


def stream_model(pipeline: str) -> str:
    """The streaming model of a pipeline: decoupled, served over gRPC streams only."""
    return f"{pipeline}{STREAM_SUFFIX}"


SCHEDULERS = ("euler_a", "euler", "ddim", "ddpm", "dpmpp_2m", "lms", "pndm")

MAX_SEED = 2**63 - 1
# Checked before tokenizing. CLIP reads 77 tokens (longer prompts are truncated, as
# diffusers does): a few hundred bytes of text, while a megabyte prompt would only cost
# the server seconds of tokenizer time.
MAX_PROMPT_BYTES = 4096
# Checked before decoding; a 4096x4096 photo is well under it even as PNG.
MAX_IMAGE_BYTES = 64 * 1024 * 1024


# The server's restricted APIs (model repository, statistics, model config, shared
# memory, trace, logging) need the operator's admin key in this gRPC header ("admin-key"
# over HTTP). Server and command line read the key from the same variable.
ADMIN_KEY_VARIABLE = "IMAGE_EDIT_ADMIN_KEY"
ADMIN_HEADER = "admin-key"
ADMIN_GRPC_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"


class InvalidArgumentError(ValueError):
    """A request input is missing or outside its allowed values."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Parameter:
    """One input of the edit models' public contract."""

    name: str
    wire_type: str  # Triton's datatype on the wire: BYTES, INT32, INT64 or FP32
    required: bool
    description: str
    default: dict[str, Any] | None = None  # per pipeline; None means "no default"
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    pipelines: tuple[str, ...] = PIPELINES
    streaming_only: bool = False

    def default_for(self, pipeline: str) -> Any:
        return None if self.default is None else self.default.get(pipeline)

    def allowed(self) -> str:
        """Human-readable allowed values, used in every error message."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.minimum is not None and self.maximum is not None:
            low, high = _format_number(self.minimum), _format_number(self.maximum)
            return f"{low}..{high}"
        if self.wire_type == "BYTES":
            if self.name == "image":
                return f"encoded PNG, JPEG or WebP bytes, at most {_format_bytes(MAX_IMAGE_BYTES)}"
            return f"UTF-8 text of at most {MAX_PROMPT_BYTES} bytes"
        return "any value"

    def validate(self, value: Any) -> Any:
        """Returns the value normalised to its Python type, or raises InvalidArgumentError."""
        if self.wire_type == "BYTES":
            return self._validate_text(value)
        if self.wire_type in ("INT32", "INT64"):
            return self._validate_integer(value)
        return self._validate_float(value)

    def _fail(self, value: Any, reason: str) -> InvalidArgumentError:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return InvalidArgumentError(
            self.name, f"{self.name}={shown} {reason}: allowed {self.allowed()}"
        )

    def _validate_text(self, value: Any) -> str | bytes:
        if self.name == "image":
            if not isinstance(value, (bytes, bytearray)) or len(value) == 0:
                raise self._fail(value, "is empty")
            if len(value) > MAX_IMAGE_BYTES:
                raise self._too_long(len(value))
            return bytes(value)
        if self.choices is None and isinstance(value, (str, bytes, bytearray)):
            size = len(value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value)
            if size > MAX_PROMPT_BYTES:
                raise self._too_long(size)
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError as error:
                raise self._fail(bytes(value), f"is not valid UTF-8 ({error.reason})") from None
        if not isinstance(value, str):
            raise self._fail(value, "is not text")
        if self.choices is not None and value not in self.choices:
            raise self._fail(value, "is not supported")
        return value

    def _too_long(self, size: int) -> InvalidArgumentError:
        # The value itself is not shown: it is what is too long.
        return InvalidArgumentError(
            self.name, f"{self.name} is {size} bytes long: allowed {self.allowed()}"
        )

    def _validate_integer(self, value: Any) -> int:
        if isinstance(value, bool) or not _is_integral(value):
            raise self._fail(value, "is not an integer")
        number = int(value)
        self._check_range(value, number)
        return number

    def _validate_float(self, value: Any) -> float:
        if isinstance(value, bool):
            raise self._fail(value, "is not a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise self._fail(value, "is not a number") from None
        if not math.isfinite(number):
            raise self._fail(value, "is not a finite number")
        self._check_range(value, number)
        return number

    def _check_range(self, value: Any, number: float) -> None:
        if self.minimum is not None and number < self.minimum:
            raise self._fail(value, "is out of range")
        if self.maximum is not None and number > self.maximum:
            raise self._fail(value, "is out of range")


def _is_integral(value: Any) -> bool:
    if isinstance(value, int):
        return True
    # numpy integers and similar expose __index__
    return hasattr(value, "__index__") and not isinstance(value, float)


def _format_bytes(size: int) -> str:
    return f"{size // (1024 * 1024)} MiB" if size >= 1024 * 1024 else f"{size} bytes"


def _format_number(number: float) -> str:
    if float(number).is_integer():
        if abs(number) >= 2**31:
            return "2^63-1" if number == MAX_SEED else str(int(number))
        return str(int(number))
    return str(number)


PARAMETERS: tuple[Parameter, ...] = (
    Parameter("image", "BYTES", True, "the input photo, encoded"),
    Parameter("prompt", "BYTES", True, "the edit instruction (pix2pix) or target prompt"),
    Parameter(
        "negative_prompt",
        "BYTES",
        False,
        "what the result should not show",
        default={INSTRUCT_PIX2PIX: "", IMG2IMG: ""},
    ),
    Parameter(
        "num_inference_steps",
        "INT32",
        False,
        "denoising steps of the scheduler",
        default={INSTRUCT_PIX2PIX: 20, IMG2IMG: 20},
        minimum=2,
        maximum=1000,
    ),
    Parameter(
        "guidance_scale",
        "FP32",
        False,
        "text guidance (CFG); 1 turns it off",
        default={INSTRUCT_PIX2PIX: 7.5, IMG2IMG: 7.5},
        minimum=1.0,
        maximum=14.0,
    ),
    Parameter(
        "image_guidance_scale",
        "FP32",
        False,
        "how closely to follow the input image; below 1 turns guidance off",
        default={INSTRUCT_PIX2PIX: 1.5},
        minimum=0.0,
        maximum=10.0,
        pipelines=(INSTRUCT_PIX2PIX,),
    ),
    Parameter(
        "temperature",
        "FP32",
        False,
        "how far the result may move from the input image",
        default={INSTRUCT_PIX2PIX: 1.0, IMG2IMG: 0.8},
        minimum=0.1,
        maximum=1.0,
    ),
    Parameter(
        "seed",
        "INT64",
        False,
        "noise seed; random when absent, returned with the result",
        minimum=0,
        maximum=MAX_SEED,
    ),
    Parameter(
        "scheduler",
        "BYTES",
        False,
        "the sampler; the checkpoint's own when absent",
        choices=SCHEDULERS,
    ),
    Parameter(
        "cache_interval",
        "INT32",
        False,
        "reused UNet work: a full UNet pass every N steps, shallow passes on its kept deep "
        "features between (faster, approximate); 1 runs every step in full",
        default={INSTRUCT_PIX2PIX: 1, IMG2IMG: 1},
        minimum=1,
        maximum=10,
    ),
    Parameter(
        "preview_every",
        "INT32",
        False,
        "streaming models: a preview of the latents every N steps; 0 sends progress only",
        default={INSTRUCT_PIX2PIX: 0, IMG2IMG: 0},
        minimum=0,
        maximum=1000,
        streaming_only=True,
    ),
)

PARAMETERS_BY_NAME = {parameter.name: parameter for parameter in PARAMETERS}

# Outputs are named apart from inputs (the seed used is not `seed`): Triton clients read
# both by name.
OUTPUT_IMAGE = "edited_image"
OUTPUT_SEED = "seed_used"
OUTPUTS = (
    (OUTPUT_IMAGE, "BYTES", "the edited image, PNG bytes"),
    (OUTPUT_SEED, "INT64", "the seed used, so the result can be reproduced"),
)
# A streaming model sends one response per denoising step with these (and the seed), the
# preview only on preview steps, then a last response with the outputs above.
OUTPUT_STEP = "step"
OUTPUT_NUM_STEPS = "num_steps"
OUTPUT_PREVIEW = "preview"
STREAM_OUTPUTS = (
    *OUTPUTS,
    (OUTPUT_STEP, "INT32", "denoising steps done, 1..num_steps"),
    (OUTPUT_NUM_STEPS, "INT32", "denoising steps this edit runs (fewer below temperature 1)"),
    (OUTPUT_PREVIEW, "BYTES", "a PNG of the current latents (a linear map, no VAE decode)"),
)


def guidance_on(pipeline: str, guidance_scale: float, image_guidance_scale: float = 0.0) -> bool:
    """Whether classifier-free guidance runs (diffusers' rule): InstructPix2Pix needs text
    guidance above 1 and image guidance of at least 1; img2img, text guidance above 1."""
    if pipeline == INSTRUCT_PIX2PIX:
        return guidance_scale > 1.0 and image_guidance_scale >= 1.0
    return guidance_scale > 1.0


def parameters_for(pipeline: str, streaming: bool = False) -> tuple[Parameter, ...]:
    """The inputs one pipeline's model (or its streaming model) accepts, in contract order."""
    if pipeline not in PIPELINES:
        raise InvalidArgumentError(
            "model", f"model={pipeline!r} is not served: allowed one of {', '.join(PIPELINES)}"
        )
    return tuple(
        p for p in PARAMETERS if pipeline in p.pipelines and (streaming or not p.streaming_only)
    )


def validate_request(
    pipeline: str, values: dict[str, Any], streaming: bool = False
) -> dict[str, Any]:
    """Checks a request's inputs against the contract.

    `values` maps input names to Python values; absent or None inputs are optional ones
    left out. Returns the validated values with contract defaults filled in (the seed and
    scheduler stay None when absent: the server picks them). Raises InvalidArgumentError
    naming the first bad input and its allowed values.
    """
    accepted = parameters_for(pipeline, streaming)
    known = {p.name for p in accepted}
    for name, value in values.items():
        if name not in known and value is not None:
            raise InvalidArgumentError(
                name,
                f"{name} is not an input of {pipeline}: allowed {', '.join(sorted(known))}",
            )
    validated: dict[str, Any] = {}
    for parameter in accepted:
        value = values.get(parameter.name)
        if value is None:
            if parameter.required:
                raise InvalidArgumentError(
                    parameter.name,
                    f"{parameter.name} is required: allowed {parameter.allowed()}",
                )
            validated[parameter.name] = parameter.default_for(pipeline)
            continue
        validated[parameter.name] = parameter.validate(value)
    return validated


def parameters_table(cli_flags: dict[str, tuple[str, ...]]) -> str:
    """The contract as a markdown table, one row per input: the table of client/README.md.

    `cli_flags` maps an input's name to what the `pix2pix edit` command calls it (its
    flags, or the positional's name); inputs missing from it show "-".
    """
    header = (
        "input",
        "Triton type",
        "CLI flag",
        "allowed",
        f"default `{INSTRUCT_PIX2PIX}`",
        f"default `{IMG2IMG}`",
        "meaning",
    )

    def shown_default(parameter: Parameter, pipeline: str) -> str:
        if pipeline not in parameter.pipelines:
            return "not an input"
        if parameter.required:
            return "required"
        default = parameter.default_for(pipeline)
        if default is None:
            return "the server's choice"
        return '`""`' if default == "" else str(default)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for parameter in PARAMETERS:
        flags = ", ".join(f"`{flag}`" for flag in cli_flags.get(parameter.name, ())) or "-"
        cells = (
            f"`{parameter.name}`",
            parameter.wire_type,
            flags,
            parameter.allowed(),
            *(shown_default(parameter, pipeline) for pipeline in PIPELINES),
            parameter.description,
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
