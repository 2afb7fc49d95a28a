"""OpenAI's Images API over the edit models: `pix2pix api`, an HTTP gateway.

    pix2pix api --url HOST:8001 [--host 127.0.0.1] [--port 8080]

`POST /v1/images/edits` takes the multipart form OpenAI's SDK sends and answers as OpenAI
does, server-sent events included; `GET /v1/models` lists the pipelines the server has
ready. multipart.py parses the body, form.py checks the form with the contract; guard.py
checks the API key and the body's size before anything is read; app.py runs the edits
through AsyncEditClient; output.py encodes what goes back; serve.py runs it under uvicorn.

This module imports nothing beyond the standard library, so the command line can read
its settings without the `api` extra (`pip install 'pix2pix-client[api]'`: Starlette,
uvicorn, python-multipart).
"""

from __future__ import annotations

import os
from pathlib import Path

# The key clients send as "Authorization: Bearer KEY": the key itself, or a file that
# holds it (a mounted secret). Neither set: no key is asked for.
API_KEY_VARIABLE = "PIX2PIX_API_KEY"
API_KEY_FILE_VARIABLE = "PIX2PIX_API_KEY_FILE"

# The server's defaults: an edit model holds 8 edits (max_edits), so more images in one
# request would be refused as busy; images are resized to at most 512 pixels a side
# (max_image_side), so a larger `size` could not be honoured.
DEFAULT_MAX_N = 8
DEFAULT_MAX_IMAGE_SIDE = 512


def load_api_key(key_file: str | Path | None = None) -> str | None:
    """The API key: read from `key_file` when given, else $PIX2PIX_API_KEY, else the file
    named by $PIX2PIX_API_KEY_FILE; None when none is set. Raises ValueError for an empty
    key and OSError for a file that cannot be read."""
    if key_file is None and os.environ.get(API_KEY_VARIABLE):
        return os.environ[API_KEY_VARIABLE].strip()
    path = key_file or os.environ.get(API_KEY_FILE_VARIABLE)
    if not path:
        return None
    key = Path(path).read_text().strip()
    if not key:
        raise ValueError(f"the API key file {path} is empty")
    return key
