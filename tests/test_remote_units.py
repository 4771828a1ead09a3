"""The pure parts of remote inference: the remote_pools option, reading an embeddings reply, and what
is sent for a text (e5 prefix as input_type; a long text cut as the local engine cuts it)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from proxy.config import ConfigError, load
from proxy.remote.endpoint import RequestFailed, read_vectors
from proxy.remote.spec import PoolSpecError, parse_pools
from proxy.remote.texts import Outgoing, RemoteTexts


def test_pools_are_read_with_their_keys_and_defaults() -> None:
    pools = parse_pools("e5 = urls=http://a:8000/v1,https://b/v1/embeddings model=e5 prefixes=e5 max_batch=16;\n"
                        "bge = urls=http://c/v1 model=BAAI/bge-m3 api_key_env=KEY tls_verify=false timeout=2.5")
    assert pools["e5"].urls == ("http://a:8000/v1/embeddings", "https://b/v1/embeddings")
    assert (pools["e5"].prefixes, pools["e5"].max_batch, pools["e5"].max_in_flight) == ("e5", 16, 4)
    assert (pools["bge"].model, pools["bge"].tls_verify, pools["bge"].timeout) == ("BAAI/bge-m3", False, 2.5)


@pytest.mark.parametrize(("value", "says"), [
    ("e5 urls=http://a/v1 model=m", "NAME = KEY=VALUE"),
    ("e5 = model=m", "urls and model are required"),
    ("e5 = urls=ftp://a/v1 model=m", "not an http"),
    ("e5 = urls=http://user:secret@a/v1 model=m", "no credentials"),
    ("e5 = urls=http://a/v1 model=m api_key=sk-123", "api_key_env or api_key_file"),
    ("e5 = urls=http://a/v1 model=m prefixes=bert", "prefixes must be"),
    ("e5 = urls=http://a/v1 model=m max_batch=0", "must be positive"),
    ("e5 = urls=http://a/v1 model=m colour=red", "unknown key"),
    ("e5 = urls=http://a/v1 model=m; e5 = urls=http://b/v1 model=m", "given twice"),
])
def test_a_bad_pool_is_refused_naming_what_is_wrong(value: str, says: str) -> None:
    with pytest.raises(PoolSpecError, match=says):
        parse_pools(value)


def test_a_key_is_read_from_where_the_pool_says_and_never_kept_in_the_option(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "key").write_text("sk-from-file\n")
    monkeypatch.setenv("POOL_KEY", "sk-from-env")
    pools = parse_pools(f"a = urls=http://a/v1 model=m api_key_file={tmp_path / 'key'}; "
                        "b = urls=http://b/v1 model=m api_key_env=POOL_KEY")
    assert (pools["a"].api_key(), pools["b"].api_key()) == ("sk-from-file", "sk-from-env")


def test_remote_builtin_must_name_a_pool(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[remote]\nremote_pools = "e5 = urls=http://a/v1 model=m"\nremote_builtin = "nope"\n')
    with pytest.raises(ConfigError, match="remote_builtin names pool 'nope'"):
        load(config)


def _reply(rows: list[object]) -> bytes:
    return json.dumps({"data": [{"index": i, "embedding": row} for i, row in reversed(list(enumerate(rows)))]}).encode()


def test_a_reply_is_read_in_input_order_normalised_from_floats_or_base64() -> None:
    a, b = np.array([3.0, 4.0], np.float32), np.array([0.0, 2.0], np.float32)
    as_base64 = base64.b64encode(b.astype("<f4").tobytes()).decode()
    vectors = read_vectors(_reply([a.tolist(), as_base64]), 2, 2)
    assert np.allclose(vectors, [[0.6, 0.8], [0.0, 1.0]])


@pytest.mark.parametrize("payload", [
    b"<html>busy</html>",
    _reply([[1.0, 0.0]]),  # one of two
    _reply([[1.0, 0.0], [1.0, 0.0, 0.0]]),  # ragged
    _reply([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]),  # three dimensions, not two
    _reply([[float("nan"), 1.0], [1.0, 0.0]]),
    _reply([[0.0, 0.0], [1.0, 0.0]]),
    _reply(["not base64!", [1.0, 0.0]]),
    json.dumps({"data": [{"index": 0, "embedding": [1.0, 0.0]}, {"index": 0, "embedding": [1.0, 0.0]}]}).encode(),
])
def test_a_malformed_reply_is_never_a_vector(payload: bytes) -> None:
    with pytest.raises(RequestFailed) as failed:
        read_vectors(payload, 2, 2)
    assert failed.value.cause == "malformed"


@pytest.fixture(scope="module")
def tokenizer(model_data_dir: Path):
    from inference import builtin_model
    from inference.tokenizer import load_tokenizer

    files = builtin_model(model_data_dir)
    return load_tokenizer(files.tokenizer_path, files.max_seq_length)


def test_e5_prefixes_become_the_input_type(tokenizer) -> None:
    texts = RemoteTexts("e5", tokenizer)
    assert texts.outgoing("query: hello") == Outgoing("query", "hello")
    assert texts.outgoing("passage: hello") == Outgoing("passage", "hello")
    assert texts.outgoing("hello") is None  # the server would put a prefix in front: computed here
    assert RemoteTexts("none", tokenizer).outgoing("hello") == Outgoing(None, "hello")


@pytest.mark.parametrize("text", [
    " ".join(f"Katze{i % 7}" for i in range(900)), " ".join(["unbelievably"] * 900), "東京タワー" * 500,
    "naïve " * 900, "abcdefghij" * 300,  # one long word, cut inside it
])
def test_a_long_text_is_cut_to_the_tokens_the_local_engine_keeps(tokenizer, text: str) -> None:
    text = "passage: " + text
    sent = RemoteTexts("e5", tokenizer).outgoing(text)
    assert sent is not None and len(sent.text) < len(text)
    assert tokenizer.encode(f"{sent.kind}: {sent.text}") == tokenizer.encode(text)


def test_a_text_that_cannot_reach_the_limit_is_not_tokenised(tokenizer) -> None:
    assert tokenizer.cannot_exceed("passage: a short text")
    assert not tokenizer.cannot_exceed("word " * 600)
    assert tokenizer.over_limit("word " * 600) is not None and tokenizer.over_limit("a short text") is None
