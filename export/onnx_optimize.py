"""onnxruntime graph fusions for exported components, for the onnxruntime flavours.

onnxruntime's Stable Diffusion fusions (`onnxruntime.transformers.optimizer`, model types
`unet`, `vae`, `clip`) replace attention subgraphs and layer norms by fused contrib ops.
Several of those ops only have CUDA kernels (GroupNorm, SkipGroupNorm, BiasSplitGelu,
BiasAdd, NhwcConv, packed QKV/KV), so they stay off here and the fused graph runs on CPU
and GPU alike. One step is ours: the fusions turn self-attention into `Attention`, whose
CPU kernel materialises the [batch, heads, tokens, tokens] scores (a UNet at 32x32 latents:
1024 tokens); it is rewritten into MatMul + Split + `MultiHeadAttention`, which runs
flash attention on CPU.

The output uses com.microsoft ops: TensorRT cannot parse it, so engines are built from
an export without this step. The export validates the optimized graph against PyTorch
exactly as it validates the plain one.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np

from export.components import TEXT_ENCODER, UNET_IMG2IMG, UNET_PIX2PIX, VAE_DECODER, VAE_ENCODER

MODEL_TYPES = {
    TEXT_ENCODER: "clip",
    VAE_ENCODER: "vae",
    VAE_DECODER: "vae",
    UNET_PIX2PIX: "unet",
    UNET_IMG2IMG: "unet",
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


def fusion_options(model_type: str) -> Any:
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    for name in CUDA_ONLY_FUSIONS:
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


def optimize_component(model: Any, component: str) -> tuple[Any, dict[str, int]]:
    """The fused ModelProto of one component, and how many nodes of each fused op it has."""
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = MODEL_TYPES[component]
    # The fusion passes log every pattern they skip; only errors matter here.
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
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
    counts = Counter(node.op_type for node in fused.nodes() if node.domain == MS_DOMAIN)
    if counts and not any(o.domain == MS_DOMAIN for o in fused.model.opset_import):
        from onnx import helper

        fused.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return fused.model, dict(sorted(counts.items()))
