"""Integer builds of a registered float32 model (model_register's 'q4:' and 'q8:' paths): the
rewrite of its dense layers, what it costs in fidelity against the model's own float32 vectors,
and that nothing is quantised unless asked."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from inference import ModelFiles, ModelFilesError, build_hf_dir, load_model_dir
from inference.buildcache import KEEP, build_source, integer_build
from inference.evalset import PAIRS
from inference.quantize import MIN_COSINE, WEIGHTS, cosines, probe_texts, quantized_model, split_weights
from inference.runtime import ModelRuntime
from inference.settings import EngineSettings

from . import test_inference_fixtures as shared

minilm_dir = shared.minilm_dir  # session fixture


@pytest.fixture(scope="module")
def minilm_fp32(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    target = tmp_path_factory.mktemp("minilm") / "all-minilm-l6-v2"
    return load_model_dir(build_hf_dir(minilm_dir, target, "fp32"), uri="minilm")


@pytest.fixture(scope="module")
def float_runtime(minilm_fp32: ModelFiles) -> ModelRuntime:
    return ModelRuntime(minilm_fp32, EngineSettings.default())


@pytest.fixture(scope="module")
def float_vectors(float_runtime: ModelRuntime) -> np.ndarray:
    return float_runtime.embed_texts(probe_texts())


def test_split_weights() -> None:
    assert split_weights("q4:/models/x") == ("q4", "/models/x")
    assert split_weights("q8i8:relative/dir") == ("q8i8", "relative/dir")
    assert split_weights("/models/q4:x") == (None, "/models/q4:x")
    assert split_weights("remote:pool") == (None, "remote:pool")
    assert split_weights("q5:/models/x") == (None, "q5:/models/x")


@pytest.mark.parametrize("weights", sorted(WEIGHTS))
def test_every_dense_layer_is_rewritten_and_the_float_weights_dropped(minilm_fp32: ModelFiles, weights: str) -> None:
    original = onnx.load(str(minilm_fp32.onnx_path))
    built = onnx.load_from_string(quantized_model(minilm_fp32.onnx_path, weights))
    bits, accuracy = WEIGHTS[weights]
    constants = {t.name for t in original.graph.initializer}
    matmuls = [n for n in original.graph.node if n.op_type == "MatMul" and n.input[1] in constants]
    rewritten = [n for n in built.graph.node if n.op_type == "MatMulNBits"]
    assert len(matmuls) == 36 and len(rewritten) == 36  # six layers: q, k, v, attention out, two FFN
    # what is left in float: the attention's products of activations (two a layer)
    assert sum(n.op_type == "MatMul" for n in built.graph.node) == 12
    assert all({a.name: helper.get_attribute_value(a) for a in n.attribute}.items()
               >= {"bits": bits, "accuracy_level": accuracy, "block_size": 32}.items() for n in rewritten)
    assert sum(n.op_type == "GatherBlockQuantized" for n in built.graph.node) == 1  # the word table

    def size(model: onnx.ModelProto, names: set[str] | None = None) -> int:
        return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if names is None or t.name in names)

    dense = size(original, {n.input[1] for n in matmuls})
    words = size(original, {"word_embeddings.weight"})
    # bits/32 of a float's size a weight (8 for the word table), plus a 4-byte scale per 32 weights
    expected = size(original) - dense - words + dense * (bits + 1) / 32 + words * (8 + 1) / 32
    assert size(built) == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("weights, mean, lowest", [
    ("q8", 0.9995, 0.999), ("q8i8", 0.999, 0.998), ("q4", 0.95, 0.85), ("q4i8", 0.95, 0.85)])
def test_fidelity_to_the_float_model(minilm_fp32: ModelFiles, float_runtime: ModelRuntime, float_vectors: np.ndarray,
                                     weights: str, mean: float, lowest: float) -> None:
    """8-bit blocks keep all-MiniLM-L6-v2's vectors; 4-bit ones cost it a few points, most on long texts,
    more than registration accepts there (the reason q8 exists)."""
    built = ModelRuntime(dataclasses.replace(minilm_fp32, weights=weights), EngineSettings.default(),
                         float_runtime.tokenizer)
    similarity = cosines(float_vectors, built.embed_texts(probe_texts()))
    assert similarity.mean() >= mean and similarity.min() >= lowest
    assert similarity.min() < 0.999999  # and they are another model's vectors: the build ran
    if weights.startswith("q4"):  # over the guard on the short texts, under it on the long ones
        short = 2 * len(PAIRS)
        assert similarity[:short].min() >= MIN_COSINE > similarity[short:].min()


def test_builds_are_kept_between_loads(minilm_fp32: ModelFiles, float_runtime: ModelRuntime, tmp_path: Path) -> None:
    """The first load makes the build and keeps it; the next reads it (a path: no child process) and
    gives the same vectors; other files are another build; the builds used last are kept, KEEP of them."""
    files, builds = dataclasses.replace(minilm_fp32, weights="q8"), tmp_path / "builds"
    assert isinstance(build_source(files, builds), bytes)
    kept = build_source(files, builds)
    assert isinstance(kept, str) and [str(p) for p in builds.glob("*.onnx")] == [kept]

    def vectors(directory: Path | None) -> np.ndarray:
        runtime = ModelRuntime(files, EngineSettings.default(), float_runtime.tokenizer, directory)
        return runtime.with_settings(EngineSettings(intra_op_parallelism=1)).embed_texts(probe_texts()[:4])

    assert np.array_equal(vectors(builds), vectors(None))
    Path(kept).write_bytes(b"damaged on disk")  # made again, and kept again
    assert np.array_equal(vectors(builds), vectors(None)) and Path(kept).stat().st_size > 1 << 20
    changed = tmp_path / "changed"
    shutil.copytree(minilm_fp32.onnx_path.parent, changed)
    (changed / "notes.txt").write_text("another file beside the model")
    assert isinstance(build_source(dataclasses.replace(files, onnx_path=changed / files.onnx_path.name), builds), bytes)
    for i in range(KEEP):  # older than any
        (builds / f"old-{i}.onnx").write_bytes(b"")
        os.utime(builds / f"old-{i}.onnx", (1, 1))
    # What a proxy killed while writing a build leaves, and what one writing now has written so far.
    stale, writing = builds / ".dead-q8-1.onnx.4242", builds / ".live-q8-1.onnx.4343"
    stale.write_bytes(b"half a build")
    os.utime(stale, (1, 1))
    writing.write_bytes(b"half a build")
    build_source(dataclasses.replace(files, weights="q4"), builds)
    left = {p.name for p in builds.glob("*.onnx")}
    assert len(left) == KEEP and sum(name.startswith("old-") for name in left) == KEEP - 3
    assert not stale.exists() and writing.exists()


def test_a_model_is_run_as_exported_unless_asked(minilm_fp32: ModelFiles, float_vectors: np.ndarray) -> None:
    assert minilm_fp32.weights is None
    again = ModelRuntime(minilm_fp32, EngineSettings.default()).embed_texts(probe_texts())
    assert np.array_equal(again, float_vectors)


def test_a_model_with_nothing_to_quantise_is_refused(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ModelFilesError, match="nothing to build as q4"):
        quantized_model(path, "q4")
    files = ModelFiles("identity", path, path, None, 4, 8, weights="q8")
    with pytest.raises(ModelFilesError, match="nothing to build as q8"):  # as the runtime meets it: from its child
        integer_build(files)
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelFilesError, match="cannot be read as ONNX"):
        quantized_model(tmp_path / "broken.onnx", "q8")


def with_outlier_weights(files: ModelFiles, target: Path) -> Path:
    """A copy of the model whose first layer has one weight 40 times larger in every block of 32:
    4-bit blocks scaled to that weight round the other 31 to almost nothing."""
    shutil.copytree(files.directory, target)
    model = onnx.load(str(target / "model.onnx"))
    for tensor in model.graph.initializer:
        if "layer.0." in tensor.name and tensor.name.endswith("weight_t") and len(tensor.dims) == 2:
            weights = numpy_helper.to_array(tensor).copy()
            weights[0::32, :] *= 40.0
            tensor.CopyFrom(numpy_helper.from_array(weights, tensor.name))
    onnx.save(model, str(target / "model.onnx"))
    return target


def test_outlier_weights_break_4_bits_and_not_8(minilm_fp32: ModelFiles, tmp_path: Path) -> None:
    files = load_model_dir(with_outlier_weights(minilm_fp32, tmp_path / "outliers"), uri="outliers")
    reference = ModelRuntime(files, EngineSettings.default())
    vectors = reference.embed_texts(probe_texts())
    lowest = {weights: cosines(vectors, ModelRuntime(dataclasses.replace(files, weights=weights),
                                                     EngineSettings.default(), reference.tokenizer)
                               .embed_texts(probe_texts())).min() for weights in ("q4", "q8")}
    assert lowest["q4"] < MIN_COSINE < 0.98 < lowest["q8"]


def test_an_export_with_initializers_as_inputs_is_built_alike(minilm_fp32: ModelFiles, float_runtime: ModelRuntime,
                                                              tmp_path: Path) -> None:
    """keep_initializers_as_inputs makes every weight an input with a default; the engine never feeds
    them, so they are weights like any other: the same build, and no input left for a dropped one."""
    target = tmp_path / "as-inputs"
    shutil.copytree(minilm_fp32.onnx_path.parent, target)
    model = onnx.load(str(target / "model.onnx"))
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    onnx.save(model, str(target / "model.onnx"))
    as_inputs = load_model_dir(target, uri="as-inputs")
    built = onnx.load_from_string(quantized_model(as_inputs.onnx_path, "q8"))
    assert sum(n.op_type == "MatMulNBits" for n in built.graph.node) == 36
    assert {i.name for i in built.graph.input} <= {t.name for t in built.graph.initializer} | {
        "input_ids", "attention_mask", "token_type_ids"}

    def q8_vectors(files: ModelFiles) -> np.ndarray:
        return ModelRuntime(dataclasses.replace(files, weights="q8"), EngineSettings.default(),
                            float_runtime.tokenizer).embed_texts(probe_texts()[:8])

    # the same up to float rounding (ONNX Runtime fuses a little less where weights are inputs)
    assert np.abs(q8_vectors(as_inputs) - q8_vectors(minilm_fp32)).max() < 1e-5


def test_tied_weights_and_subgraphs_survive_the_rewrite(tmp_path: Path) -> None:
    """One table both looked up (Gather) and multiplied by (MatMul), and read again inside an If
    branch: each use gets what it needs, and the float table stays for the branch."""
    table = np.random.default_rng(7).standard_normal((64, 32)).astype(np.float32)
    branch = helper.make_graph([helper.make_node("Identity", ["table"], ["picked"])], "branch", [],
                               [helper.make_tensor_value_info("picked", TensorProto.FLOAT, [64, 32])])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"]),
         helper.make_node("MatMul", ["x", "table"], ["product"]),
         helper.make_node("If", ["flag"], ["whole"], then_branch=branch, else_branch=branch)],
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("rows", "product", "whole")],
        [numpy_helper.from_array(table, "table")])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    feed = {"ids": np.array([0, 5, 63]), "x": np.ones((2, 64), np.float32), "flag": np.array(True)}
    for weights in WEIGHTS:
        session = ort.InferenceSession(quantized_model(path, weights), providers=["CPUExecutionProvider"])
        rows, product, whole = session.run(None, feed)
        assert np.array_equal(whole, table)
        assert np.abs(rows - table[[0, 5, 63]]).max() < 0.02 * np.abs(table).max()
        tolerance = (0.3 if weights.startswith("q4") else 0.03) * np.abs(table.sum(axis=0)).max()
        assert np.abs(product - np.ones((2, 64)) @ table).max() < tolerance
