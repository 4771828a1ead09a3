"""Integer weights for a registered float32 model, when its registration asks for them.

``model_register(uri, 'q4:/models/x')`` runs the model on the built-in model's dense-layer path:
every MatMul whose right-hand side is a constant float32 matrix becomes com.microsoft MatMulNBits
on blocks of 32 weights with one scale each. ``q4``: 4-bit Q4_0 blocks (the quantiser of the
built-in build), ``q8``: 8-bit blocks (for models that 4 bits hurt); ``i8`` after either: int8
activations too (MatMulNBits' accuracy_level 4, the integer kernels of CPUs with VNNI).
Tables looked up by token (the word embeddings) go to 8-bit blocks in every build; everything
else (attention's products, layer norms, softmax) stays as exported. The rewrite is made by a
child process from the registered (and checksummed) files, when the model loads and its build is
not kept already (buildcache.py): nothing is written beside them, and a model is never quantised
unless its registration says so.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ModelFilesError
from .evalset import PAIRS
from .q4 import BLOCK, Q4Matrix

#: Part of a kept build's name (buildcache.py): changed whenever the rewrite writes another graph.
BUILD_FORMAT = "f1"
#: The weight builds a registration may ask for: (bits, MatMulNBits accuracy_level).
WEIGHTS: dict[str, tuple[int, int]] = {"q4": (4, 0), "q4i8": (4, 4), "q8": (8, 0), "q8i8": (8, 4)}

#: The lowest cosine, over the evaluation set's texts, between a model's float32 vectors and those
#: of its integer build that model_register accepts. Lower means the model does not survive the
#: build (4-bit all-MiniLM-L6-v2 reaches 0.91; a model with outlier weights falls far below).
MIN_COSINE = 0.9


def split_weights(model_path: str) -> tuple[str | None, str]:
    """``'q4:/models/x'`` -> ``('q4', '/models/x')``; a path without a known prefix is as exported."""
    prefix, sep, rest = model_path.partition(":")
    if sep and prefix in WEIGHTS:
        return prefix, rest
    return None, model_path


def quantized_model(onnx_path: Path, weights: str) -> bytes:
    """The model at ``onnx_path`` in the integer build ``weights`` (a key of WEIGHTS), serialised."""
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # protobuf and onnx raise their own types for a damaged file
        raise ModelFilesError(f"{onnx_path} cannot be read as ONNX: {exc}") from None
    bits, accuracy_level = WEIGHTS[weights]
    dense = _rewrite_matmuls(model.graph, bits, accuracy_level)
    if not dense:
        raise ModelFilesError(
            f"{onnx_path} has no MatMul by a constant float32 matrix whose rows are a multiple of {BLOCK}: "
            f"there is nothing to build as {weights}")
    _drop_replaced(model.graph, dense | _rewrite_gathers(model.graph))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model.SerializeToString()


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """The graph's initializers by name. One that is also a graph input (an export with
    keep_initializers_as_inputs) is a default the caller may override, but the engine feeds a model
    its token inputs alone (runtime.py), so it always takes the initializer's value."""
    return {t.name: t for t in graph.initializer}


def _rewrite_matmuls(graph: onnx.GraphProto, bits: int, accuracy_level: int) -> set[str]:
    """Replace the graph's eligible MatMuls in place; the names of the float weights they used."""
    initializers = _constants(graph)
    rewritten: dict[str, tuple[str, str, int, int]] = {}  # weight -> (packed, scales, K, N)
    for index, node in enumerate(graph.node):
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or weight.data_type != TensorProto.FLOAT or len(weight.dims) != 2 or weight.dims[0] % BLOCK:
            continue
        if weight.name not in rewritten:
            k, n = weight.dims
            data, block_scales = _blocks(numpy_helper.to_array(weight).T, bits)  # (N, K): blocks run along K
            packed, scales = f"{weight.name}.q{bits}", f"{weight.name}.q{bits}_scales"
            graph.initializer.extend([numpy_helper.from_array(data, packed),
                                      numpy_helper.from_array(block_scales, scales)])
            rewritten[weight.name] = (packed, scales, k, n)
        packed, scales, k, n = rewritten[weight.name]
        graph.node[index].CopyFrom(helper.make_node(
            "MatMulNBits", [node.input[0], packed, scales], list(node.output), name=node.name or f"matmul_{index}",
            domain="com.microsoft", K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=accuracy_level))
    return set(rewritten)


def _rewrite_gathers(graph: onnx.GraphProto, bits: int = 8) -> set[str]:
    """Look-ups in a constant float32 table along its rows (the word embeddings: most of a small
    model's weights) become GatherBlockQuantized over blocks of 32, in 8 bits whatever the dense
    layers' build: 4-bit word vectors cost all-MiniLM-L6-v2 another 0.03 of cosine at worst. The
    names of the tables replaced."""
    tables = _constants(graph)
    converted: set[str] = set()
    for index, node in enumerate(graph.node):
        table = tables.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if table is None or table.data_type != TensorProto.FLOAT or len(table.dims) != 2 or table.dims[1] % BLOCK \
                or axis != 0:
            continue
        rows, cols = table.dims
        packed, scale_name = f"{table.name}.gather_q{bits}", f"{table.name}.gather_q{bits}_scales"
        if table.name not in converted:  # a table tied to a MatMul's weight gets its own blocks: another layout
            data, scales = _blocks(numpy_helper.to_array(table), bits)
            graph.initializer.extend([numpy_helper.from_array(data.reshape(rows, -1), packed),
                                      numpy_helper.from_array(scales.reshape(rows, cols // BLOCK), scale_name)])
            converted.add(table.name)
        graph.node[index].CopyFrom(helper.make_node(
            "GatherBlockQuantized", [packed, node.input[1], scale_name], list(node.output),
            name=node.name or f"gather_{index}", domain="com.microsoft", gather_axis=0, quantize_axis=1,
            block_size=BLOCK, bits=bits))
    return converted


def _drop_replaced(graph: onnx.GraphProto, replaced: set[str]) -> None:
    """Drop the float tensors the rewrite replaced, unless something still reads them: a node of the
    graph or of a subgraph (If, Loop, Scan bodies read outer names), or the graph's outputs."""
    used = _names_read(graph) | {o.name for o in graph.output}
    dropped = replaced - used
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [i for i in graph.input if i.name not in dropped]  # a dropped weight's default, if it was one
    del graph.input[:]
    graph.input.extend(inputs)


def _names_read(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                names |= _names_read(body) | {o.name for o in body.output}
    return names


def _blocks(rows: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' B and scales for a float (N, K) matrix: symmetric blocks of 32 along K, stored
    unsigned about the default zero point (8 for 4 bits, 128 for 8)."""
    if bits == 4:
        q4 = Q4Matrix.quantize(rows)
        return q4.packed_pairs(), q4.scales.ravel()
    n, k = rows.shape
    x = rows.astype(np.float32).reshape(n, k // BLOCK, BLOCK)
    scales = np.abs(x).max(axis=2) / 127.0
    inverse = np.divide(1.0, scales, out=np.zeros_like(scales), where=scales != 0)
    q = np.clip(np.rint(x * inverse[:, :, None]) + 128, 1, 255).astype(np.uint8)
    return q, scales.ravel()


def cosines(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (n, dim) arrays of embeddings."""
    dot = np.sum(reference * other, axis=1)
    return dot / np.maximum(np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1), 1e-12)


def probe_texts() -> Sequence[str]:
    """The texts an integer build is compared on at registration: the evaluation set's queries and
    passages, and long texts (its passages joined, from every third one on), where a build loses most:
    all-MiniLM-L6-v2 in 4 bits keeps a cosine of 0.91 on the short texts and falls to 0.88 on these."""
    passages = [passage for _, passage in PAIRS]
    joined = [" ".join(passages[start:] + passages[:start]) for start in range(0, len(passages), 3)]
    return [text for pair in PAIRS for text in pair] + joined


def main(argv: Sequence[str]) -> int:
    """``python -m inference.quantize MODEL.onnx WEIGHTS``: the build on stdout (how buildcache.py makes
    it, in a child process); a ModelFilesError's message as the last line on stderr."""
    try:
        sys.stdout.buffer.write(quantized_model(Path(argv[0]), argv[1]))
    except ModelFilesError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
