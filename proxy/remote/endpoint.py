"""One OpenAI-compatible embeddings server: a request of a batch of texts, its reply checked and read
into vectors, and what happened counted. The pool (pool.py) decides where each batch goes."""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import numpy as np

from ..stats import Histogram
from .spec import PoolSpec, PoolSpecError

#: Why a request failed, as counted and shown.
CAUSES = ("timeout", "connect", "http_429", "http_5xx", "http_4xx", "malformed", "api_key")
ENDPOINT_STATES = ("checking", "up", "down", "refused")


class RequestFailed(Exception):
    """A request that gave no vectors: `cause` (one of CAUSES), the server's words, and for 429 how
    long the server asked to be left alone."""

    def __init__(self, cause: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.retry_after = retry_after


@dataclass
class EndpointStats:
    requests: int = 0
    texts: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    seconds: Histogram = field(default_factory=Histogram)


class Endpoint:
    """A server of a pool, and its state: "checking" (not yet probed), "up", "down" (failed
    repeatedly, probed until it answers again) or "refused" (its vectors are not the model's)."""

    def __init__(self, url: str, spec: PoolSpec) -> None:
        self.url = url
        self.spec = spec
        self.state = "checking"
        self.in_flight = 0
        self.failures = 0  # in a row
        self.cooling_until = 0.0  # a 429's Retry-After
        self.problem: str | None = None  # why it is down or refused
        self.stats = EndpointStats()

    @property
    def label(self) -> str:
        """The URL without its path's query, for logs and metrics."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}{parts.path}"

    def usable(self, now: float) -> bool:
        return self.state == "up" and self.cooling_until <= now and self.in_flight < self.spec.max_in_flight

    async def embed(self, session: aiohttp.ClientSession, texts: list[str], kind: str | None,
                    dimensions: int | None) -> np.ndarray:
        """The vectors of `texts` (L2-normalised, float32), or RequestFailed."""
        body: dict[str, object] = {"model": self.spec.model, "input": texts, "encoding_format": self.spec.encoding}
        if kind is not None:
            body["input_type"] = kind
        started = time.monotonic()
        self.stats.requests += 1
        try:
            vectors = await self._post(session, body, await self._headers(), len(texts), dimensions)
        except RequestFailed as failed:
            self.stats.errors[failed.cause] += 1
            raise
        finally:
            self.stats.seconds.observe(time.monotonic() - started)
        self.stats.texts += len(texts)
        return vectors

    async def _headers(self) -> dict[str, str]:
        """The key, read where the pool says at each request (a key file rotated in place is used at once;
        read off the event loop)."""
        try:
            key = await asyncio.to_thread(self.spec.api_key) if self.spec.api_key_file else self.spec.api_key()
        except PoolSpecError as exc:
            raise RequestFailed("api_key", str(exc)) from None
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def _post(self, session: aiohttp.ClientSession, body: dict[str, object], headers: dict[str, str],
                    count: int, dimensions: int | None) -> np.ndarray:
        timeout = aiohttp.ClientTimeout(total=self.spec.timeout)
        try:
            async with session.post(self.url, json=body, headers=headers, timeout=timeout) as reply:
                payload = await reply.read()
                if reply.status == 429:
                    raise RequestFailed("http_429", f"429 {_said(payload)}", _retry_after(reply.headers))
                if reply.status >= 500:
                    raise RequestFailed("http_5xx", f"{reply.status} {_said(payload)}")
                if reply.status != 200:
                    raise RequestFailed("http_4xx", f"{reply.status} {_said(payload)}")
        except TimeoutError:
            raise RequestFailed("timeout", f"no answer within {self.spec.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise RequestFailed("connect", str(exc) or type(exc).__name__) from None
        return read_vectors(payload, count, dimensions)


def read_vectors(payload: bytes, count: int, dimensions: int | None) -> np.ndarray:
    """The vectors of an embeddings reply, in input order, L2-normalised; RequestFailed("malformed")
    for a reply that is not one for `count` inputs of `dimensions` finite values."""
    try:
        data = json.loads(payload)["data"]
        rows: list[np.ndarray | None] = [None] * count
        for item in data:
            index = item["index"]
            if type(index) is not int or not 0 <= index < count or rows[index] is not None:
                raise ValueError(f"index {index!r}")
            rows[index] = _vector(item["embedding"])
        if any(row is None for row in rows):
            raise ValueError(f"{sum(r is None for r in rows)} of {count} embeddings missing")
        vectors = np.stack(rows)  # type: ignore[arg-type]  # ValueError if their lengths differ
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise RequestFailed("malformed", f"not an embeddings reply ({exc})") from None
    if dimensions is not None and vectors.shape[1] != dimensions:
        raise RequestFailed("malformed", f"embeddings of {vectors.shape[1]} dimensions, not {dimensions}")
    if not np.isfinite(vectors).all():
        raise RequestFailed("malformed", "embeddings with values that are not finite")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not (norms > 0).all():
        raise RequestFailed("malformed", "an embedding of zeros")
    return (vectors / norms).astype(np.float32)


def _vector(value: object) -> np.ndarray:
    if isinstance(value, str):  # encoding_format "base64": little-endian float32
        raw = base64.b64decode(value, validate=True)
        if not raw or len(raw) % 4:
            raise ValueError("a base64 embedding that is not float32 values")
        return np.frombuffer(raw, "<f4").astype(np.float32)
    if not isinstance(value, list) or not value:
        raise ValueError("an embedding that is not a list of numbers")
    return np.asarray(value, dtype=np.float32)


def _said(payload: bytes) -> str:
    """The server's error message (OpenAI's {"error": {"message": ...}}), or the start of its body."""
    try:
        message = json.loads(payload)["error"]["message"]
        if isinstance(message, str):
            return message[:300]
    except (ValueError, KeyError, TypeError):
        pass
    return payload[:200].decode("utf-8", "replace")


def _retry_after(headers: object) -> float | None:
    """Retry-After in seconds from now (a number of seconds, or an HTTP date), if given."""
    value = getattr(headers, "get", lambda _: None)("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


async def closed(session: aiohttp.ClientSession | None) -> None:
    if session is not None and not session.closed:
        await session.close()
        await asyncio.sleep(0)
