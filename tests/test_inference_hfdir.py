"""Hugging Face directories: building from safetensors (all-MiniLM-L6-v2, BERT), loading
model directories as model_register will, the official-export layout, and clear errors."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from inference import FetchError, ModelFiles, ModelFilesError, build_hf_dir, fetch_official, load_model_dir, reference
from inference.arch import ArchConfig
from inference.fetch import fetched_dir
from inference.hfsource import read_hf_dir
from inference.q4 import Q4Matrix
from inference.runtime import ModelRuntime, load_tokenizer
from inference.settings import EngineSettings

from . import test_inference_fixtures as shared

data_dir, e5_q4, minilm_dir = shared.data_dir, shared.e5_q4, shared.minilm_dir  # session fixtures

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse.", "ok"]


@pytest.fixture(scope="module")
def minilm_fp32(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    target = tmp_path_factory.mktemp("minilm") / "all-minilm-l6-v2"
    return load_model_dir(build_hf_dir(minilm_dir, target, "fp32"), uri="minilm")


def test_minilm_graph_matches_numpy_reference(minilm_dir: Path, minilm_fp32: ModelFiles) -> None:
    source = read_hf_dir(minilm_dir)
    config = ArchConfig.from_hf(source.config)
    assert config.model_type == "bert" and config.num_layers == 6 and config.position_offset == 0
    encodings = load_tokenizer(minilm_fp32).encode_batch(SENTENCES)
    width = max(len(e) for e in encodings)
    ids = np.zeros((len(SENTENCES), width), np.int64)
    mask = np.zeros_like(ids)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding)], mask[row, : len(encoding)] = encoding, 1
    session = ort.InferenceSession(str(minilm_fp32.onnx_path), providers=["CPUExecutionProvider"])
    hidden = session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
    expected = reference.last_hidden_state(config, source.weights, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(hidden[valid] - expected[valid]).max() < 1e-4


def test_minilm_embeds_sensibly(minilm_fp32: ModelFiles) -> None:
    assert minilm_fp32.dimensions == 384
    assert minilm_fp32.max_seq_length == 256  # from sentence_bert_config.json, carried over
    runtime = ModelRuntime(minilm_fp32, EngineSettings.default())
    eating, bread, horse, _ = runtime.embed_texts(SENTENCES)
    assert eating @ bread > eating @ horse + 0.2
    # the packaged tokenizer.json pads/truncates to 128; the engine overrides both
    assert len(runtime.tokenize(["ok"])[0]) == 3
    assert len(runtime.tokenize(["word " * 1000])[0]) == 256


def test_q4_build_from_float_weights(minilm_dir: Path, minilm_fp32: ModelFiles, tmp_path: Path) -> None:
    q4 = load_model_dir(build_hf_dir(minilm_dir, tmp_path / "q4", "q4"))
    assert q4.onnx_path.stat().st_size < minilm_fp32.onnx_path.stat().st_size / 4
    # exactly the float model whose quantised weights it stores...
    source = read_hf_dir(minilm_dir)
    config = ArchConfig.from_hf(source.config)
    rounded = {
        name: Q4Matrix.quantize(tensor).dequantize() if _is_quantised(name) else tensor
        for name, tensor in source.weights.items()
    }
    ids = np.array(load_tokenizer(q4).encode_batch(SENTENCES[:1]))
    expected = reference.sentence_embeddings(config, rounded, ids, np.ones_like(ids))
    assert np.abs(ModelRuntime(q4, EngineSettings.default()).embed_texts(SENTENCES[:1]) - expected).max() < 1e-4
    # ...and close to the original: 4-bit rounding of a small model costs a few points of cosine
    cosines = (ModelRuntime(q4, EngineSettings.default()).embed_texts(SENTENCES)
               * ModelRuntime(minilm_fp32, EngineSettings.default()).embed_texts(SENTENCES)).sum(axis=1)
    assert cosines.mean() > 0.9


def _is_quantised(name: str) -> bool:
    """The tensors the q4 variant stores in 4 bits: the word table and every dense matrix."""
    if name == "embeddings.word_embeddings.weight":
        return True
    return name.startswith("encoder.layer.") and name.endswith(
        ("dense.weight", "query.weight", "key.weight", "value.weight")
    )


def _official_layout(model: ModelFiles, directory: Path) -> Path:
    """Re-shape a built model like optimum's export: onnx/model.onnx, last_hidden_state only,
    an extra token_type_ids input, config and tokenizer one level up."""
    graph = onnx.load(str(model.onnx_path))
    keep = [o for o in graph.graph.output if o.name == "last_hidden_state"]
    del graph.graph.output[:]
    graph.graph.output.extend(keep)
    graph.graph.input.append(onnx.helper.make_tensor_value_info("token_type_ids", onnx.TensorProto.INT64, ["b", "s"]))
    (directory / "onnx").mkdir(parents=True)
    onnx.save(graph, str(directory / "onnx" / "model.onnx"))
    shutil.copy(model.tokenizer_path, directory / "tokenizer.json")
    shutil.copy(model.config_path, directory / "config.json")
    return directory


def test_official_layout_is_loaded_and_pooled_by_the_engine(minilm_fp32: ModelFiles, tmp_path: Path) -> None:
    files = load_model_dir(_official_layout(minilm_fp32, tmp_path / "export"))
    assert files.onnx_path.parent.name == "onnx" and files.dimensions == 384
    runtime = ModelRuntime(files, EngineSettings.default())
    assert not runtime.pooled_in_graph and "token_type_ids" in runtime.input_names
    pooled_in_graph = ModelRuntime(minilm_fp32, EngineSettings.default()).embed_texts(SENTENCES)
    assert np.abs(runtime.embed_texts(SENTENCES) - pooled_in_graph).max() < 1e-5


def test_fetch_uses_a_complete_download_without_network(minilm_fp32: ModelFiles, tmp_path: Path) -> None:
    _official_layout(minilm_fp32, fetched_dir(tmp_path))
    files = fetch_official(tmp_path)
    assert files.uri == "multilingual-e5-small:v1" and files.onnx_path.parent.name == "onnx"


def test_fetch_without_huggingface_hub_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if the extra were not installed
    with pytest.raises(FetchError, match=r"pip install 'azure-local-ai-proxy\[fetch\]'"):
        fetch_official(tmp_path)
    assert not fetched_dir(tmp_path).exists()


def test_model_path_may_be_the_onnx_file_with_a_separate_tokenizer(minilm_fp32: ModelFiles, tmp_path) -> None:
    shutil.copy(minilm_fp32.onnx_path, tmp_path / "encoder.onnx")
    tokenizers = tmp_path / "tok"
    tokenizers.mkdir()
    shutil.copy(minilm_fp32.tokenizer_path, tokenizers / "tokenizer.json")
    files = load_model_dir(tmp_path / "encoder.onnx", tokenizers, uri="custom")
    assert files.uri == "custom" and files.tokenizer_path == (tokenizers / "tokenizer.json").resolve()
    assert files.dimensions == 384  # from the graph's static output shape, no config.json here


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "neither model.onnx nor onnx/model.onnx"),
        ("not_onnx_suffix", "is not an .onnx file"),
        ("no_tokenizer", "no tokenizer.json"),
        ("bad_onnx", "is not a valid ONNX model"),
        ("bad_tokenizer", "is not a usable tokenizer.json"),
        ("wrong_inputs", "must take inputs input_ids, attention_mask"),
    ],
)
def test_bad_model_directories_get_clear_errors(case: str, message: str, minilm_fp32: ModelFiles, tmp_path) -> None:
    directory = tmp_path / "model"
    directory.mkdir()
    path = directory
    if case == "missing":
        path = tmp_path / "nowhere"
    elif case == "not_onnx_suffix":
        path = directory / "model.bin"
        path.write_bytes(b"x")
    elif case == "no_tokenizer":
        shutil.copy(minilm_fp32.onnx_path, directory / "model.onnx")
    elif case == "bad_onnx":
        (directory / "model.onnx").write_bytes(b"\x00garbage")
        shutil.copy(minilm_fp32.tokenizer_path, directory / "tokenizer.json")
    elif case == "bad_tokenizer":
        shutil.copy(minilm_fp32.onnx_path, directory / "model.onnx")
        (directory / "tokenizer.json").write_text("{not json")
    elif case == "wrong_inputs":
        identity = onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["pixels"], ["out"])], "g",
            [onnx.helper.make_tensor_value_info("pixels", onnx.TensorProto.FLOAT, [1, 3])],
            [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 3])],
        )
        onnx.save(onnx.helper.make_model(identity), str(directory / "model.onnx"))
        shutil.copy(minilm_fp32.tokenizer_path, directory / "tokenizer.json")
    with pytest.raises(ModelFilesError, match=message):
        load_model_dir(path)


def test_checkpoint_without_weights_is_a_clear_error(minilm_dir: Path, tmp_path: Path) -> None:
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(minilm_dir / name, tmp_path / name)
    with pytest.raises(ModelFilesError, match=r"model\.safetensors"):
        build_hf_dir(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
