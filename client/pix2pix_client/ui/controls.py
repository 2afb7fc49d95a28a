"""The page's controls, made from the contract, and the edit's inputs read back from them.

Every range, step, default per pipeline and description comes from
pix2pix_client/contract.py, so the page cannot offer what the server refuses.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from pix2pix_client import contract
from pix2pix_client.errors import InvalidArgument

PIPELINE_TITLES = {contract.INSTRUCT_PIX2PIX: "InstructPix2Pix", contract.IMG2IMG: "img2img"}
PROMPT_LABELS = {contract.INSTRUCT_PIX2PIX: "Instruction", contract.IMG2IMG: "Prompt"}
PROMPT_PLACEHOLDERS = {
    contract.INSTRUCT_PIX2PIX: "what to change, e.g. 'make it snowy'",
    contract.IMG2IMG: "what the result shows, e.g. 'a snowy street at dusk'",
}
LABELS = {
    "image": "Image",
    "prompt": "Prompt",
    "negative_prompt": "Negative prompt",
    "num_inference_steps": "Steps",
    "guidance_scale": "Text guidance (CFG)",
    "image_guidance_scale": "Image guidance",
    "temperature": "Temperature",
    "seed": "Seed",
    "scheduler": "Scheduler",
    "cache_interval": "Fast: full UNet pass every N steps",
    "preview_every": "Preview every N steps",
    "model": "Model",
}
# What temperature means differs per pipeline: one line each, under the slider.
TEMPERATURE_NOTES = {
    contract.INSTRUCT_PIX2PIX: "1 is standard InstructPix2Pix; lower starts later from the "
    "noised photo and keeps more of it",
    contract.IMG2IMG: "img2img's strength: lower keeps more of the photo, 1 keeps little",
}
# The contract sends progress only by default; the page shows a preview every step.
PAGE_PREVIEW_EVERY = 1
CHECKPOINT_DEFAULT = "checkpoint default"
FLOAT_SLIDER_STEP = 0.05


def model_control(pipeline: str) -> gr.Radio:
    """The pipeline picker."""
    return gr.Radio(
        [(PIPELINE_TITLES[p], p) for p in contract.PIPELINES],
        value=pipeline,
        label=LABELS["model"],
        elem_id="model",
    )


def input_controls(pipeline: str) -> dict[str, Any]:
    """A widget per contract input but the image, in contract order, as `pipeline` shows
    them: inputs of the other pipeline only (image guidance) are hidden."""
    return {p.name: _control(p, pipeline) for p in contract.PARAMETERS if p.name != "image"}


def _control(parameter: contract.Parameter, pipeline: str) -> Any:
    name = parameter.name
    elem_id = name.replace("_", "-")
    if name == "prompt":
        return gr.Textbox(
            label=PROMPT_LABELS[pipeline],
            placeholder=PROMPT_PLACEHOLDERS[pipeline],
            info=_info(parameter, pipeline),
            lines=2,
            elem_id=elem_id,
        )
    if name == "negative_prompt":
        return gr.Textbox(
            label=LABELS[name],
            value=parameter.default_for(pipeline),
            info=parameter.description,
            elem_id=elem_id,
        )
    if name == "seed":
        return gr.Textbox(
            label=LABELS[name],
            placeholder="random",
            info=_info(parameter, pipeline),
            elem_id=elem_id,
        )
    if name == "scheduler":
        assert parameter.choices is not None
        return gr.Dropdown(
            [CHECKPOINT_DEFAULT, *parameter.choices],
            value=CHECKPOINT_DEFAULT,
            label=LABELS[name],
            info=parameter.description,
            elem_id=elem_id,
        )
    assert parameter.minimum is not None and parameter.maximum is not None
    integral = parameter.wire_type in ("INT32", "INT64")
    value = PAGE_PREVIEW_EVERY if name == "preview_every" else parameter.default_for(pipeline)
    return gr.Slider(
        parameter.minimum,
        parameter.maximum,
        value=value,
        step=1 if integral else FLOAT_SLIDER_STEP,
        precision=0 if integral else None,
        label=LABELS[name],
        info=_info(parameter, pipeline),
        visible=pipeline in parameter.pipelines,
        elem_id=elem_id,
    )


def _info(parameter: contract.Parameter, pipeline: str) -> str:
    """The line under a control: the contract's description and allowed values."""
    if parameter.name == "temperature":
        return f"{parameter.description}; {TEMPERATURE_NOTES[pipeline]}"
    if parameter.name == "seed":
        return f"{parameter.description}; empty for random, or {parameter.allowed()}"
    return f"{parameter.description}; {parameter.allowed()}"


def pipeline_view(parameter: contract.Parameter, pipeline: str, value: Any = None) -> Any:
    """An update showing a control as `pipeline` does (label, visibility, explanation),
    with `value` when one is given."""
    update: dict[str, Any] = {"visible": pipeline in parameter.pipelines}
    if parameter.name == "prompt":
        update.update(label=PROMPT_LABELS[pipeline], placeholder=PROMPT_PLACEHOLDERS[pipeline])
    if parameter.name == "temperature":
        update["info"] = _info(parameter, pipeline)
    if value is not None:
        update["value"] = value
    return gr.update(**update)


def switched(names: list[str], values: list[Any], previous: str, pipeline: str) -> list[Any]:
    """The controls' updates when the model changes from `previous` to `pipeline`: a value
    still at the old pipeline's default moves to the new one's; a value the user set stays."""
    updates: list[Any] = []
    for name, value in zip(names, values, strict=True):
        parameter = contract.PARAMETERS_BY_NAME.get(name)
        if parameter is None or name == "preview_every":
            updates.append(gr.update())
            continue
        old, new = parameter.default_for(previous), parameter.default_for(pipeline)
        moved = new if new is not None and value == old else None
        updates.append(pipeline_view(parameter, pipeline, value=moved))
    return updates


def restored(names: list[str], model: str, parameters: dict[str, Any], seed: int) -> list[Any]:
    """The controls' updates that put a past edit's model, inputs and seed back."""
    updates: list[Any] = []
    for name in names:
        if name == "model":
            updates.append(model)
        elif name == "seed":
            updates.append(str(seed))
        elif name == "scheduler":
            updates.append(parameters.get("scheduler") or CHECKPOINT_DEFAULT)
        else:
            parameter = contract.PARAMETERS_BY_NAME[name]
            value = parameters.get(name, parameter.default_for(model))
            updates.append(pipeline_view(parameter, model, value=value))
    return updates


def parse_seed(text: str | None) -> int | None:
    """The seed box: empty means random; anything else must be a seed of the contract."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        value: Any = int(text)
    except ValueError:
        value = text
    try:
        return contract.PARAMETERS_BY_NAME["seed"].validate(value)
    except contract.InvalidArgumentError as error:
        raise InvalidArgument.from_contract(error) from None


def edit_options(values: dict[str, Any], pipeline: str) -> dict[str, Any]:
    """The streamed edit's inputs from the controls' values (by input name), as the client
    library takes them; the prompt included, the image not."""
    options: dict[str, Any] = {}
    for parameter in contract.parameters_for(pipeline, streaming=True):
        if parameter.name == "image":
            continue
        value = values[parameter.name]
        if parameter.name == "seed":
            value = parse_seed(value)
        elif parameter.name == "scheduler" and value == CHECKPOINT_DEFAULT:
            value = None
        elif parameter.wire_type in ("INT32", "INT64"):
            value = int(value)
        options[parameter.name] = value
    return options
