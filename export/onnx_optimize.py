"""onnxruntime graph fusions for exported components, for the onnxruntime flavours.

onnxruntime's Stable Diffusion fusions (`onnxruntime.transformers.optimizer`, model types
`unet`, `vae`, `clip`) replace attention subgraphs and layer norms by fused contrib ops.
Several of those ops only have CUDA kernels (GroupNorm, SkipGroupNorm, BiasSplitGelu,
BiasAdd, NhwcConv, packed QKV/KV), so they stay off here and the fused graph runs on CPU
and GPU alike. In the UNet, SkipLayerNormalization stays off too: onnxruntime's CPU kernel
is slower at a UNet's shapes than the LayerNormalization and Add it replaces.

Two steps are ours:
- the fusions turn self-attention into `Attention`, whose CPU kernel materialises the
  [batch, heads, tokens, tokens] scores (a UNet at 32x32 latents: 1024 tokens); it is
  rewritten into MatMul + Split + `MultiHeadAttention`, which runs flash attention on CPU;
- each GEGLU feed-forward (one projection to twice the width, chunked into value and gate,
  value * gelu(gate)) is split into a value and a gate projection, and the gate's bias add
  and Gelu become one `BiasGelu`. The two chunk copies are gone.

The output uses com.microsoft ops: TensorRT cannot parse it, so engines are built from
an export without this step. The export validates the optimized graph against PyTorch
exactly as it validates the plain one. What each rewrite gains is measured in
benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from export.components import (
    TEXT_ENCODER,
    UNET_FOR_PIPELINE,
    VAE_DECODER,
    VAE_ENCODER,
    shallow_unet,
)

MODEL_TYPES = {
    TEXT_ENCODER: "clip",
    VAE_ENCODER: "vae",
    VAE_DECODER: "vae",
    **{name: "unet" for unet in UNET_FOR_PIPELINE.values() for name in (unet, shallow_unet(unet))},
}
MS_DOMAIN = "com.microsoft"
# Fused ops that only onnxruntime's CUDA execution provider implements.
CUDA_ONLY_FUSIONS = (
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_bias_add",
    "enable_nhwc_conv",
    "enable_packed_qkv",
    "enable_packed_kv",
)
# Fusions whose onnxruntime CPU kernels are slower than the ops they replace, per model type.
SLOWER_ON_CPU = {"unet": ("enable_skip_layer_norm", "enable_bias_skip_layer_norm")}


def fusion_options(model_type: str) -> Any:
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    for name in (*CUDA_ONLY_FUSIONS, *SLOWER_ON_CPU.get(model_type, ())):
        if hasattr(options, name):
            setattr(options, name, False)
    return options


def _attribute(node: Any, name: str) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return None


def attention_to_multihead(model: Any) -> int:
    """Rewrites unmasked, bidirectional `Attention` nodes into MatMul + Split + MHA.

    `model` is an onnxruntime.transformers OnnxModel; returns how many were rewritten.
    """
    from onnx import helper, numpy_helper

    rewritten = 0
    for node in list(model.nodes()):
        if node.op_type != "Attention" or node.domain != MS_DOMAIN:
            continue
        extra_inputs = [name for name in node.input[3:] if name]
        if (
            extra_inputs
            or _attribute(node, "unidirectional")
            or _attribute(node, "qkv_hidden_sizes")
        ):
            continue
        weight = model.get_initializer(node.input[1])
        if weight is None:
            continue
        hidden = numpy_helper.to_array(weight).shape[1] // 3
        name = node.name or model.create_node_name("Attention")
        qkv = f"{name}_qkv"
        sizes = f"{name}_split_sizes"
        model.add_initializer(
            numpy_helper.from_array(np.array([hidden] * 3, dtype=np.int64), sizes)
        )
        matmul = helper.make_node("MatMul", [node.input[0], node.input[1]], [qkv], f"{name}_MatMul")
        split = helper.make_node(
            "Split", [qkv, sizes], [f"{name}_q", f"{name}_k", f"{name}_v"], f"{name}_Split", axis=2
        )
        mha_inputs = [f"{name}_q", f"{name}_k", f"{name}_v"]
        bias = (
            model.get_initializer(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        )
        if bias is not None and np.any(numpy_helper.to_array(bias)):
            mha_inputs.append(node.input[2])
        mha = helper.make_node(
            "MultiHeadAttention", mha_inputs, list(node.output), f"{name}_MHA", domain=MS_DOMAIN
        )
        for attribute in node.attribute:
            if attribute.name in ("num_heads", "scale", "mask_filter_value"):
                mha.attribute.append(attribute)
        model.remove_node(node)
        model.add_nodes([matmul, split, mha])
        rewritten += 1
    if rewritten:
        model.prune_graph()
        model.topological_sort()
    return rewritten


def _chunk_of_last_axis(model: Any, node: Any) -> tuple[str, str] | None:
    """(start, end) names when `node` slices only the last axis with step 1, else None."""
    if node.op_type != "Slice" or len(node.input) < 4:
        return None
    axes = model.get_constant_value(node.input[3])
    steps = model.get_constant_value(node.input[4]) if len(node.input) > 4 else None
    if axes is None or list(np.ravel(axes)) != [-1]:
        return None
    if steps is not None and list(np.ravel(steps)) != [1]:
        return None
    return node.input[1], node.input[2]


def _geglu(
    model: Any, gelu: Any, output_name_to_node: dict[str, Any], input_name_to_nodes: dict[str, Any]
) -> tuple[Any, Any, Any, Any] | None:
    """(MatMul, bias Add, value Slice, gate Slice) when `gelu` ends a GEGLU, else None."""
    if gelu.op_type != "Gelu":
        return None
    if _attribute(gelu, "approximate") not in (None, b"none", "none"):
        return None  # BiasGelu is the exact (erf) Gelu
    gate_slice = output_name_to_node.get(gelu.input[0])
    gate_bounds = _chunk_of_last_axis(model, gate_slice) if gate_slice else None
    bias_add = output_name_to_node.get(gate_slice.input[0]) if gate_bounds else None
    if bias_add is None or bias_add.op_type != "Add":
        return None
    bias_index, bias = model.get_constant_input(bias_add)
    if bias_index is None or bias.ndim != 1:
        return None
    matmul = output_name_to_node.get(bias_add.input[1 - bias_index])
    if matmul is None or matmul.op_type != "MatMul":
        return None
    weight = model.get_initializer(matmul.input[1])
    if weight is None or len(weight.dims) != 2 or weight.dims[1] != 2 * (weight.dims[1] // 2):
        return None
    if bias.shape[0] != weight.dims[1]:
        return None
    # Besides the two Slices, only the Shape arithmetic of their bounds may read the sum.
    readers = input_name_to_nodes[bias_add.output[0]]
    slices = [n for n in readers if n.op_type == "Slice"]
    if len(slices) != 2 or any(n.op_type not in ("Slice", "Shape") for n in readers):
        return None
    value_slice = slices[0] if slices[1] is gate_slice else slices[1]
    value_bounds = _chunk_of_last_axis(model, value_slice)
    # chunk(2): the value runs from 0 to where the gate starts.
    if value_bounds is None or value_bounds[1] != gate_bounds[0]:
        return None
    value_start = model.get_constant_value(value_bounds[0])
    if value_start is None or list(np.ravel(value_start)) != [0]:
        return None
    return matmul, bias_add, value_slice, gate_slice


def split_geglu(model: Any) -> int:
    """Rewrites GEGLU feed-forwards into value and gate projections, the gate as `BiasGelu`.

    diffusers' GEGLU computes `value, gate = (x @ W + b).chunk(2, -1)` and
    `value * gelu(gate)`. In the graph that is MatMul, Add, two Slices of the last axis and a
    Gelu; the Slices copy both halves. Here the value is `x @ W[:, :n] + b[:n]` and the gate
    `BiasGelu(x @ W[:, n:], b[n:])`. `model` is an onnxruntime.transformers OnnxModel; returns
    how many were rewritten.
    """
    from onnx import helper, numpy_helper

    rewritten = 0
    output_name_to_node = model.output_name_to_node()
    input_name_to_nodes = model.input_name_to_nodes()
    for gelu in list(model.nodes()):
        match = _geglu(model, gelu, output_name_to_node, input_name_to_nodes)
        if match is None:
            continue
        matmul, bias_add, value_slice, gate_slice = match
        weights = numpy_helper.to_array(model.get_initializer(matmul.input[1]))
        bias = model.get_constant_input(bias_add)[1]
        half = weights.shape[1] // 2
        name = matmul.name or model.create_node_name("MatMul")
        parts = (  # part, its columns, the op that adds its bias, the output it replaces
            ("value", slice(None, half), "Add", value_slice.output[0], ""),
            ("gate", slice(half, None), "BiasGelu", gelu.output[0], MS_DOMAIN),
        )
        nodes = []
        for part, columns, bias_op, output, domain in parts:
            product = f"{name}_{part}"
            weight_name, bias_name = f"{product}_weight", f"{product}_bias"
            model.add_initializer(
                numpy_helper.from_array(np.ascontiguousarray(weights[:, columns]), weight_name)
            )
            model.add_initializer(numpy_helper.from_array(bias[columns], bias_name))
            nodes += [
                helper.make_node("MatMul", [matmul.input[0], weight_name], [product], product),
                helper.make_node(
                    bias_op, [product, bias_name], [output], f"{product}_{bias_op}", domain=domain
                ),
            ]
        model.remove_nodes([matmul, bias_add, gate_slice, value_slice, gelu])
        model.add_nodes(nodes)
        rewritten += 1
    if rewritten:
        model.prune_graph()
        model.topological_sort()
    return rewritten


def optimize_component(traced: Path, component: str) -> tuple[Any, dict[str, int]]:
    """The fused ModelProto of one traced component (with all its weights), and how many
    nodes of each fused op it has.

    The graph is fused with its large weights left in their files beside `traced`: the
    fusions read only those they rewrite, and the symbolic shape inference they run
    copies the whole model each time, which with the weights in memory was most of an SD
    1.5-size export's peak (benchmarks/README.md, "Memory and start at real size").
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = MODEL_TYPES[component]
    # The fusion passes log every pattern they skip; only errors matter here.
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    model = onnx.load(str(traced), load_external_data=False)
    # onnxruntime's fusions read external weights relative to the working directory
    # (process-wide: the export runs one component at a time, in one thread).
    with contextlib.chdir(traced.parent):
        fused = optimize_model(
            model,
            model_type=model_type,
            num_heads=0,
            hidden_size=0,
            optimization_options=fusion_options(model_type),
            opt_level=0,  # python fusions only; onnxruntime applies its own at session load
            use_gpu=False,
        )
        attention_to_multihead(fused)
        split_geglu(fused)
    load_external_data_for_model(fused.model, str(traced.parent))
    counts = Counter(node.op_type for node in fused.nodes() if node.domain == MS_DOMAIN)
    if counts and not any(o.domain == MS_DOMAIN for o in fused.model.opset_import):
        from onnx import helper

        fused.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    fused_model = fused.model
    # The fusions leave reference cycles that hold copies of the model (2.3 GB after the
    # sd15 text encoder's 0.5 GB), freed only when the collector next runs in full.
    del fused, model
    gc.collect()
    return fused_model, dict(sorted(counts.items()))
