"""What an edit model's version folder holds besides model.py: written by the repository
builder, read by the edit model. Light on purpose: the builder imports it without the
pipeline's numerical libraries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edit_pipeline.preprocess import ImageLimits
from edit_pipeline.preview import LatentPreview

SETTINGS_FILE = "pipeline.json"
SCHEDULER_FILE = "scheduler_config.json"
TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class PipelineSettings:
    """What an edit model knows of its pipeline, written by the repository builder."""

    pipeline: str
    vae_scaling_factor: float
    limits: ImageLimits
    # Triton model and tensor names of each component call, from the export's specs.
    components: dict[str, dict[str, Any]]
    latent_preview: LatentPreview

    @property
    def reuses_unet_work(self) -> bool:
        """Whether the UNet has a shallow pass (cache_interval above 1)."""
        return "unet_shallow" in self.components

    def to_json(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "vae_scaling_factor": self.vae_scaling_factor,
            "limits": self.limits.__dict__,
            "components": self.components,
            "latent_preview": self.latent_preview.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PipelineSettings:
        return cls(
            pipeline=data["pipeline"],
            vae_scaling_factor=float(data["vae_scaling_factor"]),
            limits=ImageLimits(**data["limits"]),
            components=data["components"],
            latent_preview=LatentPreview.from_json(data["latent_preview"]),
        )
