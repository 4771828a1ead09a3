"""Build the encoder as an ONNX graph (onnx.helper) from weights under Hugging Face names.

Inputs ``input_ids`` and ``attention_mask`` (int64, batch x seq, right padded); outputs
``last_hidden_state`` (batch x seq x hidden) and ``sentence_embedding`` (mean over the mask,
L2-normalised), so the engine needs no pooling of its own for models we build.

Precision per variant (see ``VARIANTS``): dense layers as float32 MatMul, or as
com.microsoft MatMulNBits taking Q4_0 blocks unchanged (4-bit, block 32, zero point 8);
the word table as float32 Gather or com.microsoft GatherBlockQuantized on the same blocks.
Position ids start at ``position_offset`` (2 for XLM-R), token type ids are all 0: both
tables are reduced to one constant added to every sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .arch import ArchConfig, Weights, as_float, check_weights, layer_prefix
from .q4 import BLOCK, Q4Matrix

OPSET = 17
MASK_BIAS = -10000.0  # added to scores of padded keys: exp(-1e4) underflows to 0 in float32


@dataclass(frozen=True)
class Variant:
    """How one build precision stores the weights."""

    name: str
    quantized: bool  # 4-bit dense layers and word table
    accuracy_level: int = 0  # MatMulNBits: 0 = float32 compute, 4 = int8 activations
    description: str = ""


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("fp32", False, description="weights dequantised to float32 (~470 MB)"),
        Variant("q4", True, 0, description="4-bit weights, float32 arithmetic (~75 MB)"),
        Variant("q4i8", True, 4, description="4-bit weights, int8 activations in dense layers (~75 MB)"),
    )
}

Progress = Callable[[str, float], None]


def _noop(_stage: str, _fraction: float) -> None:
    pass


class _GraphWriter:
    """Accumulates nodes and initializers with unique, deterministic names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], *, domain: str = "", **attrs: object) -> str:
        self.count += 1
        out = f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain=domain, **attrs))
        return out


def build_graph(
    config: ArchConfig, weights: Weights, variant: Variant, progress: Progress = _noop
) -> onnx.ModelProto:
    """The whole encoder as a self-contained ONNX model."""
    check_weights(config, weights)
    g = _GraphWriter()
    hidden, heads = config.hidden_size, config.num_heads
    head_dim = hidden // heads

    def dense(x: str, name: str) -> str:
        """x @ W.T + b for the HF linear layer ``name``."""
        tensor = weights[name + ".weight"]
        bias = g.const(name + ".bias", as_float(weights[name + ".bias"]))
        if variant.quantized:
            q4 = tensor if isinstance(tensor, Q4Matrix) else Q4Matrix.quantize(as_float(tensor))
            rows, cols = q4.shape
            y = g.op(
                "MatMulNBits",
                [x, g.const(name + ".qweight", q4.packed_pairs()), g.const(name + ".scales", q4.scales.ravel())],
                domain="com.microsoft",
                K=cols,
                N=rows,
                bits=4,
                block_size=BLOCK,
                accuracy_level=variant.accuracy_level,
            )
        else:
            y = g.op("MatMul", [x, g.const(name + ".weight_t", as_float(tensor).T)])
        return g.op("Add", [y, bias])

    def layer_norm(x: str, name: str) -> str:
        return g.op(
            "LayerNormalization",
            [x, g.const(name + ".weight", as_float(weights[name + ".weight"])),
             g.const(name + ".bias", as_float(weights[name + ".bias"]))],
            axis=-1,
            epsilon=config.layer_norm_eps,
        )

    def ints(name: str, values: list[int]) -> str:
        return g.const(name, np.array(values, dtype=np.int64))

    def scalar(name: str, value: float) -> str:
        return g.const(name, np.array(value, dtype=np.float32))

    # embeddings: word + (position + token type 0), then LayerNorm
    word = weights["embeddings.word_embeddings.weight"]
    if variant.quantized:
        q4 = word if isinstance(word, Q4Matrix) else Q4Matrix.quantize(as_float(word))
        rows, cols = q4.shape
        x = g.op(
            "GatherBlockQuantized",
            [g.const("word_embeddings.qweight", q4.packed_pairs().reshape(rows, cols // 2)),
             "input_ids", g.const("word_embeddings.scales", q4.scales)],
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=1,
            block_size=BLOCK,
            bits=4,
        )
    else:
        x = g.op("Gather", [g.const("word_embeddings.weight", as_float(word)), "input_ids"], axis=0)
    positions = as_float(weights["embeddings.position_embeddings.weight"])[config.position_offset :]
    token_type = as_float(weights["embeddings.token_type_embeddings.weight"])[0]
    seq_len = g.op("Gather", [g.op("Shape", ["input_ids"]), ints("one_index", [1])], axis=0)
    added = g.op("Slice", [g.const("position_plus_type", positions + token_type), ints("zero", [0]), seq_len])
    x = layer_norm(g.op("Add", [x, added]), "embeddings.LayerNorm")
    progress("embeddings", 1.0 / (config.num_layers + 1))

    # attention bias from the mask: 0 where attended, MASK_BIAS where padded; (batch, 1, 1, seq)
    mask = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    keep = g.op("Unsqueeze", [mask, ints("axes_1_2", [1, 2])])
    one = scalar("one", 1.0)
    bias = g.op("Mul", [g.op("Sub", [one, keep]), scalar("mask_bias", MASK_BIAS)])
    split_heads = ints("split_heads", [0, 0, heads, head_dim])
    merge_heads = ints("merge_heads", [0, 0, hidden])
    scale = scalar("attention_scale", 1.0 / math.sqrt(head_dim))
    half, sqrt2 = scalar("half", 0.5), scalar("sqrt2", math.sqrt(2.0))

    def gelu(t: str) -> str:
        """Exact (erf) GELU, the activation of BERT and XLM-R; ORT fuses this pattern."""
        erf = g.op("Erf", [g.op("Div", [t, sqrt2])])
        return g.op("Mul", [g.op("Mul", [t, half]), g.op("Add", [erf, one])])

    for index in range(config.num_layers):
        p = layer_prefix(index)

        def heads_of(t: str, perm: list[int]) -> str:
            return g.op("Transpose", [g.op("Reshape", [t, split_heads])], perm=perm)

        q = heads_of(dense(x, p + "attention.self.query"), [0, 2, 1, 3])
        k = heads_of(dense(x, p + "attention.self.key"), [0, 2, 3, 1])
        v = heads_of(dense(x, p + "attention.self.value"), [0, 2, 1, 3])
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), bias])
        context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        context = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), merge_heads])
        attended = dense(context, p + "attention.output.dense")
        x = layer_norm(g.op("Add", [attended, x]), p + "attention.output.LayerNorm")
        inner = dense(x, p + "intermediate.dense")
        inner = gelu(inner)
        out = dense(inner, p + "output.dense")
        x = layer_norm(g.op("Add", [out, x]), p + "output.LayerNorm")
        progress(f"layer {index + 1}/{config.num_layers}", (index + 2) / (config.num_layers + 1))

    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="last_hidden_state"))
    _pool(g, "last_hidden_state", mask)
    graph = helper.make_graph(
        g.nodes,
        "encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [
            helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden]),
            helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden]),
        ],
        g.initializers,
    )
    opsets = [helper.make_opsetid("", OPSET)]
    if variant.quantized:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="azure-local-ai-proxy")
    model.ir_version = 8
    return model


def _pool(g: _GraphWriter, hidden: str, mask: str) -> None:
    """Mean over unmasked tokens, then L2 normalisation, into output ``sentence_embedding``."""
    axis1 = g.const("pool_axis_1", np.array([1], np.int64))
    weights = g.op("Unsqueeze", [mask, g.const("pool_axis_last", np.array([-1], np.int64))])
    summed = g.op("ReduceSum", [g.op("Mul", [hidden, weights]), axis1], keepdims=0)
    counts = g.op("ReduceSum", [weights, axis1], keepdims=0)
    counts = g.op("Max", [counts, g.const("pool_min_count", np.array(1e-9, np.float32))])
    mean = g.op("Div", [summed, counts])
    norm = g.op("ReduceL2", [mean], axes=[-1], keepdims=1)
    norm = g.op("Max", [norm, g.const("pool_min_norm", np.array(1e-12, np.float32))])
    g.nodes.append(helper.make_node("Div", [mean, norm], ["sentence_embedding"], name="sentence_embedding"))
