"""The form of `POST /v1/images/edits`, read as OpenAI's SDK sends it and checked before
any edit starts.

OpenAI's fields map to the contract's inputs, and the contract's own inputs come as extra
form fields under their contract names (the SDK's `extra_body`). Every value is checked
with the contract's `Parameter`, so a bad one is refused in the same words the client
library and the server use, naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pix2pix_client import contract
from pix2pix_client.api.errors import ApiError, invalid
from pix2pix_client.request import validate_parameters

if TYPE_CHECKING:
    from starlette.datastructures import FormData

# OpenAI's model names for the two pipelines; a request without one gets the first.
MODELS = {"instruct-pix2pix": contract.INSTRUCT_PIX2PIX, "img2img": contract.IMG2IMG}
DEFAULT_MODEL = "instruct-pix2pix"
MODEL_IDS = {pipeline: model_id for model_id, pipeline in MODELS.items()}
OUTPUT_FORMATS = ("png", "jpeg", "webp")
MAX_PARTIAL_IMAGES = 3
# The VAE works on 8x8-pixel cells: the server floors sides to a multiple of 8.
SIDE_MULTIPLE = 8

# The contract's inputs a request may set (previews are the gateway's to ask for).
CONTRACT_FIELDS = tuple(
    name for name in contract.PARAMETERS_BY_NAME if name not in ("image", "prompt", "preview_every")
)
# OpenAI's fields that change nothing here: taken and ignored.
IGNORED_FIELDS = ("user", "safety_identifier")
# OpenAI's fields whose other values this server cannot honour: the results are opaque
# images whose quality num_inference_steps decides.
ACCEPTED_VALUES = {"background": ("auto", "opaque"), "quality": ("auto",)}
OPENAI_FIELDS = (
    "image",
    "prompt",
    "model",
    "n",
    "size",
    "response_format",
    "output_format",
    "output_compression",
    "stream",
    "partial_images",
    *ACCEPTED_VALUES,
    *IGNORED_FIELDS,
)
# Sent as `image[]` by the SDK when given a list, even of one.
IMAGE_FIELDS = ("image", "image[]")
KNOWN_FIELDS = (*OPENAI_FIELDS, *CONTRACT_FIELDS)


@dataclass(frozen=True)
class EditForm:
    """One edit request, checked: `options` are the contract inputs given besides the
    image and prompt, normalised; `size` is None for "auto"."""

    model: str
    pipeline: str
    image: bytes
    prompt: str
    options: dict[str, Any]
    n: int
    size: tuple[int, int] | None
    output_format: str
    output_compression: int
    stream: bool
    partial_images: int

    def options_for(self, index: int) -> dict[str, Any]:
        """The inputs of the `index`th image: seed, seed+1, ... when a seed is given."""
        seed = self.options.get("seed")
        return self.options if seed is None else {**self.options, "seed": seed + index}


class FormReader:
    """Reads edit forms within this gateway's limits: `max_n` images a request, sides of
    at most `max_image_side` pixels."""

    def __init__(self, *, max_n: int, max_image_side: int) -> None:
        self.max_image_side = max_image_side
        # OpenAI's fields, described as the contract describes its inputs, so that a bad
        # value is refused in the same words.
        self.parameters = {
            parameter.name: parameter
            for parameter in (
                contract.Parameter("model", "BYTES", False, "the pipeline", choices=tuple(MODELS)),
                contract.Parameter("n", "INT32", False, "images to make", minimum=1, maximum=max_n),
                contract.Parameter(
                    "response_format",
                    "BYTES",
                    False,
                    "how the images come back",
                    choices=("b64_json",),
                ),
                contract.Parameter(
                    "output_format",
                    "BYTES",
                    False,
                    "the images' file format",
                    choices=OUTPUT_FORMATS,
                ),
                contract.Parameter(
                    "output_compression",
                    "INT32",
                    False,
                    "JPEG and WebP quality",
                    minimum=0,
                    maximum=100,
                ),
                contract.Parameter(
                    "stream", "BYTES", False, "server-sent events", choices=("true", "false")
                ),
                contract.Parameter(
                    "partial_images",
                    "INT32",
                    False,
                    "previews streamed before the image",
                    minimum=0,
                    maximum=MAX_PARTIAL_IMAGES,
                ),
                *(
                    contract.Parameter(name, "BYTES", False, "accepted as it is", choices=values)
                    for name, values in ACCEPTED_VALUES.items()
                ),
            )
        }

    async def read(self, form: FormData) -> EditForm:
        """The checked request; raises ApiError (400 naming the field, 413 for an image
        over the contract's limit)."""
        text = self._text_fields(form)
        upload = self._image_upload(form)
        try:
            model = self._value(text, "model", DEFAULT_MODEL)
            pipeline = MODELS[model]
            self._value(text, "response_format", "b64_json")
            stream = self._value(text, "stream", "false") == "true"
            n = self._value(text, "n", 1)
            partial_images = self._value(text, "partial_images", 0)
            if stream and n > 1:
                raise contract.InvalidArgumentError(
                    "n",
                    f"n={n} with stream=true is not supported: a stream carries one image "
                    "(OpenAI's stream events do not say which image they belong to); "
                    "allowed 1, or stream=false",
                )
            output_format = self._value(text, "output_format", "png")
            output_compression = self._value(text, "output_compression", 100)
            size = self._size(text.get("size", "auto"))
            for name in ACCEPTED_VALUES:
                self._value(text, name, "auto")
            if "prompt" not in text:
                allowed = contract.PARAMETERS_BY_NAME["prompt"].allowed()
                raise ApiError(
                    400,
                    f"prompt is required: allowed {allowed}",
                    param="prompt",
                    code="missing_required_parameter",
                )
            options = {name: _typed(name, text[name]) for name in CONTRACT_FIELDS if name in text}
            options = validate_parameters(pipeline, text.get("prompt"), **options)
            prompt = options.pop("prompt")
            if n > 1 and options.get("seed", 0) + n - 1 > contract.MAX_SEED:
                # Image i takes seed + i: the last one's must be a seed too.
                raise contract.InvalidArgumentError(
                    "seed",
                    f"seed={options['seed']} with n={n}: image i is edited with seed + i, "
                    f"and the last would pass {contract.MAX_SEED}; allowed 0.."
                    f"{contract.MAX_SEED - n + 1} with n={n}",
                )
        except contract.InvalidArgumentError as error:
            if error.field == "response_format":
                # Why, beyond the allowed value.
                raise ApiError(
                    400,
                    f"response_format={text['response_format']!r} is not supported: this "
                    "server keeps no images to link to, every image comes back in the "
                    "response; allowed b64_json",
                    param="response_format",
                    code="invalid_value",
                ) from None
            raise invalid(error) from None
        image = await upload.read()
        _check_image(image)
        return EditForm(
            model=model,
            pipeline=pipeline,
            image=image,
            prompt=prompt,
            options=options,
            n=n,
            size=size,
            output_format=output_format,
            output_compression=output_compression,
            stream=stream,
            partial_images=partial_images,
        )

    def _text_fields(self, form: FormData) -> dict[str, str]:
        fields: dict[str, str] = {}
        for name, value in form.multi_items():
            if name == "mask":
                raise ApiError(
                    400,
                    "masks are not supported: the edit models take no mask (no inpainting); "
                    "leave it out and say in the prompt what to change",
                    param="mask",
                    code="unsupported_parameter",
                )
            if name not in KNOWN_FIELDS and name != "image[]":
                raise ApiError(
                    400,
                    f"{name} is not supported by this server: allowed {', '.join(KNOWN_FIELDS)}",
                    param=name,
                    code="unknown_parameter",
                )
            if name in IMAGE_FIELDS:
                continue
            if not isinstance(value, str):
                raise ApiError(
                    400, f"{name} must be a text field, not a file", param=name, code="invalid_type"
                )
            if name in fields:
                raise ApiError(
                    400, f"{name} is given twice: allowed once", param=name, code="invalid_value"
                )
            fields[name] = value
        return fields

    def _image_upload(self, form: FormData) -> Any:
        values = [value for name in IMAGE_FIELDS for value in form.getlist(name)]
        if not values:
            parameter = contract.PARAMETERS_BY_NAME["image"]
            raise ApiError(
                400,
                f"image is required: allowed {parameter.allowed()}, as a file",
                param="image",
                code="missing_required_parameter",
            )
        if len(values) > 1:
            raise ApiError(
                400,
                f"image has {len(values)} files: allowed one; the edit models edit one image",
                param="image",
                code="invalid_value",
            )
        (upload,) = values
        if isinstance(upload, str):
            raise ApiError(
                400, "image must be a file, not a text field", param="image", code="invalid_type"
            )
        return upload

    def _value(self, text: dict[str, str], name: str, default: Any) -> Any:
        if name not in text:
            return default
        parameter = self.parameters[name]
        value = text[name]
        if name == "stream":
            value = value.lower()
        return parameter.validate(
            _integer_or_text(value) if parameter.wire_type == "INT32" else value
        )

    def _size(self, value: str) -> tuple[int, int] | None:
        if value == "auto":
            return None
        high = self.max_image_side
        allowed = (
            f"auto, or WxH with sides multiples of {SIDE_MULTIPLE} from {SIDE_MULTIPLE} to {high}"
        )
        match = re.fullmatch(r"(\d{1,6})x(\d{1,6})", value)
        if match is None:
            raise contract.InvalidArgumentError(
                "size", f"size={value!r} is not WxH: allowed {allowed}"
            )
        width, height = int(match.group(1)), int(match.group(2))
        if not all(SIDE_MULTIPLE <= side <= high for side in (width, height)):
            raise contract.InvalidArgumentError(
                "size", f"size={value!r} is out of range: allowed {allowed}"
            )
        if width % SIDE_MULTIPLE or height % SIDE_MULTIPLE:
            raise contract.InvalidArgumentError(
                "size", f"size={value!r} is not a multiple of {SIDE_MULTIPLE}: allowed {allowed}"
            )
        return width, height


def _check_image(image: bytes) -> None:
    try:
        contract.PARAMETERS_BY_NAME["image"].validate(image)
    except contract.InvalidArgumentError as error:
        if len(image) > contract.MAX_IMAGE_BYTES:
            raise ApiError(413, str(error), param="image", code="image_too_large") from None
        raise invalid(error) from None


def _typed(name: str, value: str) -> Any:
    """A form field's text as the contract's type: integers parsed here (the contract
    refuses text), the rest left for the contract to read or refuse in its words."""
    if contract.PARAMETERS_BY_NAME[name].wire_type in ("INT32", "INT64"):
        return _integer_or_text(value)
    return value


def _integer_or_text(value: str) -> int | str:
    try:
        return int(value)
    except ValueError:
        return value
