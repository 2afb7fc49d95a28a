"""Runs each exported component in onnxruntime against its PyTorch module and tabulates errors.

Every component sees the same random inputs in both at two shapes; the export passes when
`max|onnx - torch| / max|torch|` stays under the precision's tolerance for every output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.checkpoint import UnsupportedCheckpointError
from export.components import ComponentSpec
from export.sample_inputs import CheckpointInputs, axis_sizes, sample_inputs

# fp32 differences come from kernel order only; fp16 keeps about 3 digits.
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2}

# (batch for UNets, batch for the rest, latent height, latent width). The second case is
# non-square with odd sides, which no UNet's down-sampling factor divides; image sides are
# the latent sides times the checkpoint's VAE scale factor.
VALIDATION_CASES = ((1, 1, 16, 16), (3, 2, 25, 17))


@dataclass
class ValidationRow:
    """The errors of one component at one shape, and whether they pass."""

    component: str
    shapes: str
    max_abs: float
    max_rel: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_rel)) and self.max_rel <= self.tolerance


def onnx_session(path: Path) -> Any:
    """A quiet onnxruntime CPU session of one exported model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def validate_component(
    module: Any,
    spec: ComponentSpec,
    model_path: Path,
    checkpoint: CheckpointInputs,
    tolerance: float,
) -> list[ValidationRow]:
    """Runs the ONNX file and the torch module on the same random inputs at two shapes."""
    import torch

    session = onnx_session(model_path)
    rows = []
    for case, (unet_batch, batch, latent_height, latent_width) in enumerate(VALIDATION_CASES):
        if spec.name.startswith("unet"):
            batch = unet_batch
        inputs = sample_inputs(
            spec, checkpoint, batch, (latent_height, latent_width), seed=100 + case
        )
        with torch.inference_mode():
            expected = module(*(torch.from_numpy(inputs[t.name]) for t in spec.inputs))
        if isinstance(expected, torch.Tensor):
            expected = (expected,)
        actual = session.run([t.name for t in spec.outputs], inputs)
        sizes = axis_sizes(checkpoint, batch, (latent_height, latent_width))
        max_abs = 0.0
        max_rel = 0.0
        for tensor, want, got in zip(spec.outputs, expected, actual, strict=True):
            want = want.float().numpy()
            if want.shape != got.shape:
                raise AssertionError(f"{spec.name}: shape {got.shape} != torch {want.shape}")
            if got.shape != (served := tensor.shape_for(sizes)):
                # What the checkpoint's module returns is not what the pipelines read.
                raise UnsupportedCheckpointError(
                    f"{spec.name}: {tensor.name} comes out {list(got.shape)}; the served "
                    f"pipelines read {list(served)} ({' x '.join(map(str, tensor.dims))})"
                )
            error = float(np.max(np.abs(got.astype(np.float64) - want)))
            max_abs = max(max_abs, error)
            max_rel = max(max_rel, error / max(float(np.max(np.abs(want))), 1e-12))
        main_input = spec.inputs[0]
        shape = "x".join(str(d) for d in inputs[main_input.name].shape)
        rows.append(
            ValidationRow(spec.name, f"{main_input.name} {shape}", max_abs, max_rel, tolerance)
        )
    return rows


def format_table(rows: list[ValidationRow]) -> str:
    """The validation rows as a fixed-width table, one line per component and shape."""
    header = f"{'component':<20} {'input shape':<32} {'max abs':>10} {'max rel':>10} {'tol':>8}  ok"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.component:<20} {row.shapes:<32} {row.max_abs:>10.2e} {row.max_rel:>10.2e} "
            f"{row.tolerance:>8.0e}  {'yes' if row.passed else 'NO'}"
        )
    return "\n".join(lines)
