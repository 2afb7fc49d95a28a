"""The body of `POST /v1/images/edits` read as a form: Starlette's multipart parser, with
text fields held to the request's charset (UTF-8 unless it declares another) and a part's
errors naming its field.

Starlette decodes a text field it cannot read in that charset as Latin-1, so a prompt of
stray bytes would reach the model garbled; here it is refused. So is a charset Starlette
would read as Latin-1 (one Python does not know), or one that does not write ASCII as
ASCII (UTF-16, or a codec such as base64 that is no text encoding: a 500 before), in which
the form's own names cannot be read. Its refusals of a field (too large) say which field
they mean.
"""

from __future__ import annotations

import codecs
import string

from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from pix2pix_client.api.errors import ApiError

# Files a form may carry (OpenAI takes up to 16 images): more is refused while parsing.
MAX_FILES = 16
MAX_FIELDS = 64


class FieldError(MultiPartException):
    """A part of the form refused, naming its field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _StrictParser(MultiPartParser):
    async def parse(self) -> FormData:
        # Starlette reads a charset Python does not know as Latin-1: refused here, as is
        # one that does not write ASCII as ASCII (the form's own names are ASCII).
        _, params = parse_options_header(self.headers.get("content-type", ""))
        charset = params.get(b"charset", b"utf-8").decode("latin-1")
        if not _writes_ascii_as_ascii(charset):
            raise MultiPartException(
                f"the form's charset is {charset!r}: allowed UTF-8 (the default), or another "
                "charset that writes ASCII as ASCII"
            )
        return await super().parse()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        try:
            super().on_part_data(data, start, end)
        except MultiPartException as error:
            field = self._current_part.field_name
            raise FieldError(field, f"{field}: {error.message}") from None

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is not None:
            super().on_part_end()
            return
        # Strictly in the request's charset (UTF-8 unless it declares another), where
        # Starlette would fall back to Latin-1.
        charset = self._charset or "utf-8"
        try:
            text = bytes(part.data).decode(charset)
        except UnicodeDecodeError as error:
            raise FieldError(
                part.field_name,
                f"{part.field_name} is not {charset.upper()} text (byte {error.start} of "
                f"{len(part.data)}): allowed UTF-8, or the charset the request declares",
            ) from None
        self.items.append((part.field_name, text))


def _writes_ascii_as_ascii(charset: str) -> bool:
    try:
        return string.printable.encode(codecs.lookup(charset).name) == string.printable.encode()
    except (LookupError, UnicodeError):  # unknown, or a codec that is no text encoding
        return False


async def read_form(request: Request) -> FormData:
    """The request's form; raises ApiError 400 for a malformed one. The caller closes it."""
    parser = _StrictParser(
        request.headers, request.stream(), max_files=MAX_FILES, max_fields=MAX_FIELDS
    )
    try:
        return await parser.parse()
    except FieldError as error:
        raise ApiError(400, error.message, param=error.field, code="invalid_value") from None
    except MultiPartException as error:
        raise ApiError(400, error.message, code="invalid_request") from None
