"""A model's vectors as Backend computes them, with the cache in front (embedcache.py): kept ones at
once, those a look-ahead is computing when it has them, the others in one run of the model (the
engine's, or a pool's: Backend.embed), kept; and a look-ahead's texts ahead of the calls that ask
for them, a chunk at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from inference.engine import EmbeddingEngine, Usage
from inference.model_dir import ModelFiles

from ..remote.models import RemoteModel
from ..tasks import retrieve
from .embedcache import Abandoned, EmbeddingCache

LOOKAHEAD_CHUNK = 256  # texts per engine call of a look-ahead: two such keep the engine's batches full
#: What a look-ahead is told of texts whose vectors it has: (model, texts, their vectors).
Ready = Callable[[str, list[str], list[np.ndarray]], None]
#: How a model's texts are run (Backend._embed: files, texts, batch_size=None, usage=None).
Embed = Callable[..., Awaitable[np.ndarray]]


class Vectors:
    """Backend's: see the module docstring."""

    def __init__(self, engine: EmbeddingEngine, cache: EmbeddingCache, embed: Embed,
                 chunks_at_once: Callable[[ModelFiles | RemoteModel], int]) -> None:
        self.engine = engine
        self.cache = cache
        self._embed = embed
        #: Chunks of a look-ahead computed at once, for a model (Backend._chunks_at_once).
        self._chunks_at_once = chunks_at_once

    async def get(
        self, files: ModelFiles, uri: str, texts: list[str], batch_size: int | None, usage: Usage | None = None
    ) -> list[np.ndarray]:
        """The texts' vectors: kept ones from the cache, those a look-ahead is computing when it has them,
        the others from one engine call (and kept). `usage` gets the tokens of all of them."""
        out: list[np.ndarray | None] = [self.cache.get(uri, t) for t in texts]
        promised = {i: f for i, t in enumerate(texts) if out[i] is None and (f := self.cache.promised(uri, t))}
        missing = [i for i in range(len(texts)) if out[i] is None and i not in promised]
        if usage is not None and len(missing) < len(texts) and isinstance(files, ModelFiles):
            # what the model did not run on now counts too (a remote-only model's tokens are not known here)
            usage.tokens += await self.engine.count_tokens(files, [t for i, t in enumerate(texts) if i not in missing])
        if not missing and not promised:
            return out  # type: ignore[return-value]  # all kept: at once, without a turn of the event loop
        if not promised:  # computed here, in this task: no task of its own to wait for
            await self._compute(files, uri, texts, missing, batch_size, out, usage)
            return out  # type: ignore[return-value]
        computing = asyncio.ensure_future(self._compute(files, uri, texts, missing, batch_size, out, usage))
        computing.add_done_callback(retrieve)
        try:
            late = []
            for i, future in promised.items():
                try:
                    out[i] = await asyncio.shield(future)
                except Abandoned:
                    late.append(i)
            await computing
            await self._compute(files, uri, texts, late, batch_size, out)  # counted above
        finally:
            computing.cancel()
        return out  # type: ignore[return-value]

    async def ahead(self, files: ModelFiles, uri: str, texts: Sequence[str], ready: Ready | None = None) -> int:
        """Compute texts into the cache, a chunk at a time with the next one queued, so that the engine
        runs full batches while a statement asks for them one by one; those not yet computed are
        promised, so that a call for one waits for it rather than computing it again. `ready` is given
        the texts kept already, then each chunk as it is computed. Returns how many were computed."""
        unique = list(dict.fromkeys(texts))
        if ready is not None:
            kept = [(t, v) for t in unique if (v := self.cache.peek(uri, t)) is not None]
            if kept:
                ready(uri, [t for t, _ in kept], [v for _, v in kept])
        promised = [t for t in unique if self.cache.promise(uri, t) is not None]
        chunks = [promised[i : i + LOOKAHEAD_CHUNK] for i in range(0, len(promised), LOOKAHEAD_CHUNK)]
        running: list[asyncio.Task[None]] = []
        at_once = self._chunks_at_once(files)
        try:
            for chunk in chunks:
                running.append(asyncio.ensure_future(self._keep(files, uri, chunk, ready)))
                if len(running) >= at_once:
                    await running.pop(0)
            for task in running:
                await task
        finally:
            for task in running:
                task.cancel()
            for text in promised:
                self.cache.abandon(uri, text)  # a no-op for those computed
        return len(promised)


    async def _keep(self, files: ModelFiles, uri: str, texts: list[str], ready: Ready | None) -> None:
        vectors = [self.cache.put(uri, text, vector)
                   for text, vector in zip(texts, await self._embed(files, texts), strict=True)]
        if ready is not None:
            ready(uri, texts, vectors)

    async def _compute(
        self, files: ModelFiles, uri: str, texts: list[str], which: list[int], batch_size: int | None,
        out: list[np.ndarray | None], usage: Usage | None = None,
    ) -> None:
        if not which:
            return
        # Promised while computed, so that a look-ahead started meanwhile does not compute them again.
        promised = [texts[i] for i in which if self.cache.promise(uri, texts[i]) is not None]
        try:
            vectors = await self._embed(files, [texts[i] for i in which], batch_size, usage)
            for i, vector in zip(which, vectors, strict=True):
                out[i] = self.cache.put(uri, texts[i], vector)
        finally:
            for text in promised:
                self.cache.abandon(uri, text)  # a no-op for those computed
