"""One description per exported component: the single source of truth for tensor names.

Each `ComponentSpec` says what a component takes and returns (names, dtypes, which axes
are dynamic, the values a token input holds) and the range of every dynamic axis. The
ONNX export reads it for `dynamic_axes`, the TensorRT builder for optimization profiles
(min/opt/max), and the repository builder for `config.pbtxt`. Nobody types a tensor name
twice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

TEXT_ENCODER = "text_encoder"
VAE_ENCODER = "vae_encoder"
VAE_DECODER = "vae_decoder"
UNET_PIX2PIX = "unet_pix2pix"
UNET_IMG2IMG = "unet_img2img"
COMPONENTS = (TEXT_ENCODER, VAE_ENCODER, VAE_DECODER, UNET_PIX2PIX, UNET_IMG2IMG)
UNET_FOR_PIPELINE = {"instruct_pix2pix": UNET_PIX2PIX, "img2img": UNET_IMG2IMG}
# Reused UNet work (DeepCache): a full pass also returns the deep features that enter the
# UNet's last, shallowest sub-blocks; the shallow pass runs those sub-blocks on features
# kept from the last full pass (export/unet_reuse.py).
DEEP_FEATURES = "deep_features"
SHALLOW_SUFFIX = "_shallow"


def shallow_unet(unet: str) -> str:
    """The component name of a UNet's shallow pass."""
    return f"{unet}{SHALLOW_SUFFIX}"


# Served tensors stay fp32 whatever the weights' precision.
FLOAT = "float32"
# Pixel range of served images (TensorRT profiles). Both bounds are multiples of every VAE
# scale factor up to 256, so each profile point is a whole number of latents.
MIN_IMAGE_SIDE = 256
MAX_IMAGE_SIDE = 1024


@dataclass(frozen=True)
class AxisRange:
    """min / opt / max of one dynamic axis, as a TensorRT optimization profile wants them."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor; dims are ints (fixed) or names of dynamic axes."""

    name: str
    dtype: str  # numpy name: float32, int32
    dims: tuple[int | str, ...]
    # The least and most value of an integer input (a token id); None: any.
    values: tuple[int, int] | None = None

    def shape_for(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[dim] if isinstance(dim, str) else dim for dim in self.dims)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {index: dim for index, dim in enumerate(self.dims) if isinstance(dim, str)}


@dataclass(frozen=True)
class ComponentSpec:
    """What one exported component takes and returns, and the ranges of its dynamic axes."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: dict[str, AxisRange]

    def sizes(self, which: str) -> dict[str, int]:
        """Axis sizes of the `min`, `opt` or `max` profile point."""
        return {axis: getattr(bounds, which) for axis, bounds in self.axes.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": [asdict(t) for t in self.inputs],
            "outputs": [asdict(t) for t in self.outputs],
            "axes": {axis: asdict(bounds) for axis, bounds in self.axes.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ComponentSpec:
        def tensors(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
            return tuple(
                TensorSpec(
                    t["name"],
                    t["dtype"],
                    tuple(t["dims"]),
                    tuple(t["values"]) if t.get("values") is not None else None,
                )
                for t in items
            )

        return cls(
            name=data["name"],
            inputs=tensors(data["inputs"]),
            outputs=tensors(data["outputs"]),
            axes={axis: AxisRange(**bounds) for axis, bounds in data["axes"].items()},
        )


@dataclass(frozen=True)
class ModelDimensions:
    """The few numbers of a checkpoint that tensor shapes and sample inputs depend on."""

    text_vocab_size: int  # token ids the text encoder embeds
    text_hidden_size: int  # also the UNets' cross-attention width
    text_max_length: int  # tokens per prompt: the tokenizer pads and truncates to it
    latent_channels: int
    vae_scale_factor: int  # image side / latent side
    unet_sample_size: int  # latent side the UNets were trained at

    def image_side(self, latent_side: int) -> int:
        return latent_side * self.vae_scale_factor


def _latent_axes(dims: ModelDimensions, batch: AxisRange) -> dict[str, AxisRange]:
    scale = dims.vae_scale_factor
    low, high = MIN_IMAGE_SIDE // scale, MAX_IMAGE_SIDE // scale
    # Engines are tuned for the resolution the checkpoint was trained at.
    opt = min(max(dims.unet_sample_size, low), high)
    latent = AxisRange(low, opt, high)
    return {"batch": batch, "latent_height": latent, "latent_width": latent}


def _pixel_axes(dims: ModelDimensions, batch: AxisRange) -> dict[str, AxisRange]:
    latent_axes = _latent_axes(dims, batch)
    latent = latent_axes["latent_height"]
    pixels = AxisRange(*(dims.image_side(side) for side in (latent.min, latent.opt, latent.max)))
    return {**latent_axes, "height": pixels, "width": pixels}


@dataclass(frozen=True)
class ShallowPass:
    """What a UNet's shallow pass takes besides the sample and timestep."""

    deep_channels: int  # channels of the deep features it is given
    cross_attends: bool  # whether its sub-blocks read the prompt's embeddings


def component_specs(
    dims: ModelDimensions, shallow_passes: dict[str, ShallowPass] | None = None
) -> dict[str, ComponentSpec]:
    """The specs of the five components for a checkpoint's dimensions; each UNet named in
    `shallow_passes` also returns its deep features, and has a shallow pass of its own."""
    # Text encoder: prompt and negative prompt in one call.
    text_batch = AxisRange(1, 2, 2)
    # VAE: one image per request; dynamic batching may merge a few.
    image_batch = AxisRange(1, 1, 4)
    # UNet: 3 for pix2pix guidance, 2 for img2img; two guided requests may merge.
    unet_batch = AxisRange(1, 3, 6)
    latent = ("batch", dims.latent_channels, "latent_height", "latent_width")
    noise_pred = TensorSpec("noise_pred", FLOAT, latent)
    timestep = TensorSpec("timestep", FLOAT, ("batch",))
    context = TensorSpec(
        "encoder_hidden_states", FLOAT, ("batch", dims.text_max_length, dims.text_hidden_size)
    )

    def unets(name: str, in_channels: int) -> dict[str, ComponentSpec]:
        sample = TensorSpec("sample", FLOAT, ("batch", in_channels, *latent[2:]))
        axes = _latent_axes(dims, unet_batch)
        shallow = (shallow_passes or {}).get(name)
        if shallow is None:
            return {name: ComponentSpec(name, (sample, timestep, context), (noise_pred,), axes)}
        # At the latent's full resolution: the shallowest sub-blocks never down-sample.
        deep = TensorSpec(DEEP_FEATURES, FLOAT, ("batch", shallow.deep_channels, *latent[2:]))
        # An input the pass does not read would not be in its exported graph.
        shallow_inputs = (sample, timestep, *([context] if shallow.cross_attends else []), deep)
        return {
            name: ComponentSpec(name, (sample, timestep, context), (noise_pred, deep), axes),
            shallow_unet(name): ComponentSpec(
                shallow_unet(name), shallow_inputs, (noise_pred,), axes
            ),
        }

    return {
        TEXT_ENCODER: ComponentSpec(
            name=TEXT_ENCODER,
            inputs=(
                TensorSpec(
                    "input_ids",
                    "int32",
                    ("batch", dims.text_max_length),
                    values=(0, dims.text_vocab_size - 1),
                ),
            ),
            outputs=(
                TensorSpec(
                    "last_hidden_state",
                    FLOAT,
                    ("batch", dims.text_max_length, dims.text_hidden_size),
                ),
            ),
            axes={"batch": text_batch},
        ),
        VAE_ENCODER: ComponentSpec(
            name=VAE_ENCODER,
            inputs=(TensorSpec("image", FLOAT, ("batch", 3, "height", "width")),),
            # Mean and standard deviation of the latent distribution, unscaled: the sampler
            # decides scaling and whether to sample (img2img) or take the mean (pix2pix).
            outputs=(
                TensorSpec("latent_mean", FLOAT, latent),
                TensorSpec("latent_std", FLOAT, latent),
            ),
            axes=_pixel_axes(dims, image_batch),
        ),
        VAE_DECODER: ComponentSpec(
            name=VAE_DECODER,
            inputs=(TensorSpec("latent", FLOAT, latent),),
            outputs=(TensorSpec("image", FLOAT, ("batch", 3, "height", "width")),),
            axes=_pixel_axes(dims, image_batch),
        ),
        # Noise and image latents side by side: export.checkpoint accepts a pix2pix UNet only
        # when its config says so, and an img2img UNet only with latent_channels in and out.
        **unets(UNET_PIX2PIX, 2 * dims.latent_channels),
        **unets(UNET_IMG2IMG, dims.latent_channels),
    }
