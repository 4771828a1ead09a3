"""Embeddings computed lately, by model and text, shared by every session: a statement that embeds
row by row finds the texts a look-ahead embedded in batches (prefetch.py), and repeated texts cost
no model run. Bounded in bytes, least recently used first out.

A vector depends, in its last bits, on which texts shared its model run (ONNX Runtime's kernels sum
in another order for another batch shape). Served from here, the same text gives the same vector to
every path that asks while it is kept: a call the proxy answers and one the server evaluates agree."""

from __future__ import annotations

import asyncio
import sys
from collections import OrderedDict

import numpy as np

#: Texts longer than this are not kept: they would crowd out many short ones, and are rarely repeated.
MAX_CACHED_TEXT = 1 << 16
_ENTRY_OVERHEAD = 200  # the key tuple, the dictionary slot, the array object (the text is counted as stored)


class Abandoned(Exception):
    """The look-ahead that promised this text stopped: whoever waits for it computes it instead."""


class EmbeddingCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._promised: dict[tuple[str, str], asyncio.Future[np.ndarray]] = {}

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, model_uri: str, text: str) -> np.ndarray | None:
        vector = self._entries.get((model_uri, text))
        if vector is None:
            self.misses += 1
            return None
        self._entries.move_to_end((model_uri, text))
        self.hits += 1
        return vector

    def peek(self, model_uri: str, text: str) -> np.ndarray | None:
        """The kept vector, if any, neither counted nor made recent (a look-ahead looking)."""
        return self._entries.get((model_uri, text))

    def promised(self, model_uri: str, text: str) -> asyncio.Future[np.ndarray] | None:
        """The vector a look-ahead is computing for this text, if one is."""
        return self._promised.get((model_uri, text))

    def promise(self, model_uri: str, text: str) -> asyncio.Future[np.ndarray] | None:
        """Say that this text is being computed (None: it is kept, or promised already, or not kept at all)."""
        key = (model_uri, text)
        if not self.enabled or len(text) > MAX_CACHED_TEXT or key in self._entries or key in self._promised:
            return None
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._promised[key] = future
        return future

    def put(self, model_uri: str, text: str, vector: np.ndarray) -> np.ndarray:
        """Keep a copy of `vector` (a row of a batch's array must not keep the whole batch alive); resolve
        the promise of it, if any. Returns the copy that is kept."""
        kept = np.array(vector, dtype=np.float32, copy=True)
        kept.setflags(write=False)
        key = (model_uri, text)
        future = self._promised.pop(key, None)
        if future is not None and not future.done():
            future.set_result(kept)
        if not self.enabled or len(text) > MAX_CACHED_TEXT:
            return kept
        if key in self._entries:
            return self._entries[key]
        self._entries[key] = kept
        self.bytes += _cost(text, kept)
        while self.bytes > self.max_bytes and self._entries:
            (_, old_text), old = self._entries.popitem(last=False)
            self.bytes -= _cost(old_text, old)
        return kept

    def abandon(self, model_uri: str, text: str) -> None:
        future = self._promised.pop((model_uri, text), None)
        if future is not None and not future.done():
            future.set_exception(Abandoned())
            future.exception()  # retrieved: nobody may be waiting

    def forget_model(self, model_uri: str) -> None:
        """Drop a model's vectors (it was registered anew, or removed)."""
        for key in [k for k in self._entries if k[0] == model_uri]:
            self.bytes -= _cost(key[1], self._entries.pop(key))


def _cost(text: str, vector: np.ndarray) -> int:
    """Bytes an entry holds: the text as Python stores it (1, 2 or 4 bytes a character, by its widest)."""
    return sys.getsizeof(text) + vector.nbytes + _ENTRY_OVERHEAD
