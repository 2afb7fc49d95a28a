"""Triton model: the readiness gate. It computes nothing; its load state is the switch.

Server readiness (`--strict-readiness`) is true only while every model is ready. The
supervisor unloads this model to turn readiness off without touching the models that
serve edits (during a recovery, and first thing when shutdown begins), and loads it again
to turn readiness back on.
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list) -> list:
        return [
            pb_utils.InferenceResponse(
                error=pb_utils.TritonError(
                    "readiness serves no requests: it only tells whether the server is ready",
                    pb_utils.TritonError.UNSUPPORTED,
                )
            )
            for _ in requests
        ]
