"""Which models the configured pools compute: the built-in one (remote_builtin) and models registered
with a model_path of `remote:POOL`. The Backend asks here where a model's texts go."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from inference.tokenizer import load_tokenizer
from inference.unigram import UnigramTokenizer

from .pool import RemotePool
from .spec import PoolSpec
from .texts import RemoteTexts

REMOTE_PREFIX = "remote:"


@dataclass(frozen=True)
class RemoteModel:
    """A registered model that only a pool computes (the proxy has none of its files)."""

    uri: str
    pool: str
    dimensions: int
    max_seq_length: int


def remote_pool_name(model_path: str | None) -> str | None:
    """The pool a registered model's path names (`remote:POOL`), or None for files."""
    if model_path and model_path.startswith(REMOTE_PREFIX):
        return model_path[len(REMOTE_PREFIX):]
    return None


class RemoteModels:
    """The configured pools, started once the local model they are checked against can run."""

    def __init__(self, specs: dict[str, PoolSpec], builtin: str, fallback: bool) -> None:
        self.specs = specs
        self.builtin = builtin
        self.fallback = fallback
        self.pools: dict[str, RemotePool] = {}
        self._texts: dict[str, RemoteTexts] = {}
        #: Texts for each pool that the local engine computed instead (no e5 prefix, a cut that would
        #: not read back the same, remote_fallback).
        self.local_texts: Counter[str] = Counter()

    def start(self, builtin_dimensions: int, reference: Callable[[list[str]], Awaitable[np.ndarray]]) -> None:
        """Start every pool: the built-in model's is checked against `reference` (the local engine)."""
        for name, spec in self.specs.items():
            ours = name == self.builtin
            self.pools[name] = RemotePool(spec, builtin_dimensions if ours else (spec.dimensions or None),
                                          reference if ours else None)
            self.pools[name].start()

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self.pools.values()))

    @property
    def builtin_pool(self) -> RemotePool | None:
        return self.pools.get(self.builtin) if self.builtin else None

    def prepared(self, name: str) -> RemoteTexts | None:
        return self._texts.get(name)

    def texts(self, name: str, tokenizer_path: object | None = None, max_length: int = 0) -> RemoteTexts:
        """How texts are sent to pool `name`: cut to the model's limit where the proxy has its
        tokenizer (the built-in model's, loaded once)."""
        prepared = self._texts.get(name)
        if prepared is None:
            tokenizer = load_tokenizer(tokenizer_path, max_length) if tokenizer_path else None  # type: ignore[arg-type]
            unigram = tokenizer if isinstance(tokenizer, UnigramTokenizer) else None
            prepared = self._texts[name] = RemoteTexts(self.specs[name].prefixes, unigram)
        return prepared

    def problems(self) -> list[str]:
        """What stops the proxy serving (/healthz fails): the built-in model's pool with no endpoint up
        (none still being checked), without remote_fallback."""
        pool = self.builtin_pool
        if pool is None or self.fallback or not self._down(pool):
            return []
        return [f"remote pool {self.builtin} (the built-in model's) has no endpoint up: " + "; ".join(pool.problems())]

    def warnings(self) -> list[str]:
        """What leaves the proxy serving: endpoints down or refused while their pool has another up, a
        registered model's pool down (its calls fail, the rest works), the built-in model's pool down
        with remote_fallback (computed here meanwhile)."""
        out = []
        for name, pool in self.pools.items():
            if not self._down(pool):
                out += pool.problems()
            elif name != self.builtin or self.fallback:
                out.append(f"remote pool {name} has no endpoint up: " + "; ".join(pool.problems()))
        return out

    @staticmethod
    def _down(pool: RemotePool) -> bool:
        return not pool.loaded and all(e.state != "checking" for e in pool.endpoints)
