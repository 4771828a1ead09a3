"""Embedding through a pool of inference servers (remote_pools; proxy/remote/), for Backend: the texts
the pool computes go to it, those it cannot compute as the local engine would go to the engine, and,
with remote_fallback on, all of them where no endpoint can answer."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from inference.engine import EmbeddingEngine
from inference.model_dir import ModelFiles

from ..remote.models import RemoteModels
from ..remote.pool import RemotePool, RemoteUnavailable
from .errors import CallError


def pool_named(remote: RemoteModels | None, name: str) -> RemotePool:
    """The pool `name` of this proxy's configuration (remote_pools)."""
    pool = remote.pools.get(name) if remote is not None else None
    if pool is None:
        raise CallError("22023", f"remote pool {name} is not in this proxy's configuration",
                        "Every proxy sharing the catalog needs the pools its models name (remote_pools).")
    return pool


async def embed_remote(remote: RemoteModels | None, engine: EmbeddingEngine, name: str, files: ModelFiles | None,
                       texts: list[str], registered_dimensions: int = 0) -> np.ndarray:
    """Texts to pool `name`; those it cannot compute as the local engine would (`files`: the model
    runs here too) go to the local engine, and all of them if no endpoint can answer and
    remote_fallback is on."""
    assert remote is not None
    pool = pool_named(remote, name)
    prepared = remote.prepared(name) or await asyncio.to_thread(
        remote.texts, name, files.tokenizer_path if files else None, files.max_seq_length if files else 0)
    outgoing = [prepared.outgoing(text) for text in texts]
    here = [i for i, sent in enumerate(outgoing) if sent is None]
    if here and files is None:
        raise CallError("22023", f"remote pool {name} puts e5's prefix in front of every text itself: the text "
                        f"{texts[here[0]][:40]!r} has none", "Begin each text with 'query: ' or 'passage: '.")
    there = [i for i, sent in enumerate(outgoing) if sent is not None]
    remote.local_texts[name] += len(here)
    try:
        parts = await _together([
            pool.embed([outgoing[i] for i in there]),  # type: ignore[misc]
            engine.embed(files, [texts[i] for i in here]) if files is not None and here else _none(),
        ])
    except RemoteUnavailable as exc:
        if files is None or not remote.fallback:
            raise CallError("58030", str(exc), "See /healthz and SHOW REMOTE; with remote_fallback on, the "
                            "built-in model is computed here when no endpoint can answer.") from exc
        remote.local_texts[name] += len(there)
        return await engine.embed(files, texts)
    width = parts[0].shape[1] if there else parts[1].shape[1]
    expected = files.dimensions if files is not None else registered_dimensions
    if expected and width != expected:
        raise CallError("22023", f"remote pool {name} answers with vectors of {width} dimensions, and the "
                        f"model has {expected}", "The pool computes another model: check its urls and model.")
    vectors = np.empty((len(texts), width), np.float32)
    if there:
        vectors[there] = parts[0]
    if here:
        vectors[here] = parts[1]
    return vectors


async def _none() -> None:
    return None


async def _together(works: list[Any]) -> list[Any]:
    """The works' results, in order; the first failure cancels the others (and is raised)."""
    tasks = [asyncio.ensure_future(work) for work in works]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
