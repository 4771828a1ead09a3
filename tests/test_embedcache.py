"""The cache of computed embeddings (embedcache.py): bounded in bytes, least recently used out first;
promises that a look-ahead keeps or abandons."""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import pytest

from proxy.intercept.embedcache import MAX_CACHED_TEXT, Abandoned, EmbeddingCache

M = "m:v1"


def vector(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(384).astype(np.float32)


def test_kept_vectors_are_copies_that_cannot_change() -> None:
    cache = EmbeddingCache(1 << 20)
    batch = np.stack([vector(1), vector(2)])
    kept = cache.put(M, "a", batch[0])
    batch[0] = 0
    got = cache.get(M, "a")
    assert got is kept and np.array_equal(got, vector(1)) and got.base is None
    with pytest.raises(ValueError):
        got[0] = 1.0
    assert cache.get(M, "b") is None and cache.get("other:v1", "a") is None
    assert (cache.hits, cache.misses) == (1, 2)


def test_the_least_recently_used_go_first_and_the_bytes_stay_bounded() -> None:
    cache = EmbeddingCache(10 * (384 * 4 + sys.getsizeof("u99") + 200))  # ten entries of the longest key
    for i in range(10):
        cache.put(M, f"t{i}", vector(i))
    assert len(cache) == 10
    cache.get(M, "t0")  # now the most recently used
    cache.put(M, "t10", vector(10))
    assert cache.get(M, "t1") is None and cache.get(M, "t0") is not None
    for i in range(100):
        cache.put(M, f"u{i}", vector(i))
    assert cache.bytes <= cache.max_bytes and len(cache) == 10


def test_long_texts_and_a_cache_of_zero_bytes_keep_nothing() -> None:
    cache = EmbeddingCache(1 << 20)
    cache.put(M, "x" * (MAX_CACHED_TEXT + 1), vector(1))
    assert len(cache) == 0
    off = EmbeddingCache(0)
    off.put(M, "a", vector(1))
    assert len(off) == 0 and not off.enabled


def test_forgetting_a_model_drops_its_vectors_only() -> None:
    cache = EmbeddingCache(1 << 20)
    cache.put(M, "a", vector(1))
    cache.put("other:v1", "a", vector(2))
    cache.forget_model(M)
    assert cache.get(M, "a") is None and cache.get("other:v1", "a") is not None
    assert cache.bytes == 384 * 4 + sys.getsizeof("a") + 200


def test_a_text_counts_the_bytes_python_stores_it_in() -> None:
    ascii_, wide = EmbeddingCache(1 << 20), EmbeddingCache(1 << 20)
    ascii_.put(M, "n" * 10_000, vector(1))
    wide.put(M, "猫" * 10_000, vector(1))  # two bytes a character
    assert wide.bytes - ascii_.bytes >= 10_000


def test_a_promise_is_kept_by_put_and_broken_by_abandon() -> None:
    async def scenario() -> None:
        cache = EmbeddingCache(1 << 20)
        kept = cache.promise(M, "a")
        broken = cache.promise(M, "b")
        assert kept is not None and broken is not None
        assert cache.promise(M, "a") is None  # promised once only
        assert cache.promised(M, "a") is kept
        cache.put(M, "a", vector(1))
        assert np.array_equal(await kept, vector(1)) and cache.promised(M, "a") is None
        cache.abandon(M, "b")
        with pytest.raises(Abandoned):
            await broken
        assert cache.promise(M, "a") is None  # kept already
        assert cache.promise(M, "b") is not None  # may be promised again
    asyncio.run(scenario())
