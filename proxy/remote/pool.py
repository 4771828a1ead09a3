"""A pool of servers for one model: texts from every session (calls, look-aheads, COPY) queue here and
go out in batches, each to the endpoint with the fewest requests in flight, as long as one has room.
A batch that fails is tried again elsewhere after a back-off; an endpoint that fails repeatedly is
marked down and probed until it answers, and checked, again (probe.py). A text whose caller is gone
is not sent, and a request all of whose texts' callers are gone is cut off."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from ..tasks import retrieve
from .endpoint import Endpoint, RequestFailed, closed
from .probe import Probe
from .spec import PoolSpec
from .texts import Outgoing

log = logging.getLogger("azure_local_ai_proxy.remote")

#: Failures in a row that mark an endpoint down (a 429 does not count: the server is busy, not gone).
DOWN_AFTER = 3
#: Seconds between probes of a down endpoint, doubling up to the last.
PROBE_EVERY = (1.0, 2.0, 4.0, 8.0, 15.0)
#: Seconds between probes of an endpoint whose vectors were refused (a mis-configuration).
REFUSED_PROBE_EVERY = 60.0
#: Request timeouts a text may wait in all while the servers answer 429 (busy) before it fails.
RATE_LIMITED_FOR = 4
#: Back-off before a failed batch is tried again: base doubling per attempt, at most the cap.
BACKOFF_BASE, BACKOFF_CAP = 0.05, 2.0


class RemoteUnavailable(Exception):
    """No endpoint could answer: the message names each, its state (and why it is down or refused),
    and the text's last failure."""


@dataclass(eq=False)
class _Item:
    outgoing: Outgoing
    future: asyncio.Future[np.ndarray]
    queued: float
    attempts: int = 0
    not_before: float = 0.0
    avoid: set[Endpoint] = field(default_factory=set)
    last: str = ""  # the last failure, for the error
    alone: bool = False  # in a request of its own: its batch was refused (4xx), maybe for this text


class RemotePool:
    """The endpoints of one PoolSpec. `reference(texts)` gives the local engine's vectors of the probe
    texts, for a model the proxy can also run; None otherwise."""

    def __init__(self, spec: PoolSpec, dimensions: int | None,
                 reference: Callable[[list[str]], Awaitable[np.ndarray]] | None) -> None:
        self.spec = spec
        self.dimensions = dimensions
        self.endpoints = [Endpoint(url, spec) for url in spec.urls]
        self.probe = Probe(spec, reference)
        self._queue: deque[_Item] = deque()
        self._wake: asyncio.Event | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False

    # ------------------------------------------------------------------ life

    def start(self) -> None:
        """Probe every endpoint (in the background) and start sending."""
        self._wake = asyncio.Event()
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())
        for endpoint in self.endpoints:
            self._spawn(self._watch(endpoint))

    async def close(self) -> None:
        self._closing = True
        for task in [*self._tasks, *([self._dispatcher] if self._dispatcher else [])]:
            task.cancel()
        await asyncio.gather(*self._tasks, *([self._dispatcher] if self._dispatcher else []), return_exceptions=True)
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(RemoteUnavailable(f"remote pool {self.spec.name} is closing"))
        self._queue.clear()
        await self.release()

    async def release(self) -> None:
        """Let go of the connections (model_unload); the next request connects again."""
        session, self._session = self._session, None
        await closed(session)

    @property
    def loaded(self) -> bool:
        """Whether an endpoint is up (connected and checked)."""
        return any(e.state == "up" for e in self.endpoints)

    def problems(self) -> list[str]:
        return [f"remote endpoint {e.label} of pool {self.spec.name} is {e.state}: {e.problem}"
                for e in self.endpoints if e.state in ("down", "refused")]

    # ------------------------------------------------------------------ work

    async def embed(self, texts: list[Outgoing]) -> np.ndarray:
        """The texts' vectors; RemoteUnavailable when no endpoint could answer. Cancelling the call
        drops its texts (and cuts off requests that carry no other caller's)."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items = [_Item(text, loop.create_future(), now) for text in texts]
        self._queue.extend(items)
        self._poke()
        try:
            vectors = await asyncio.gather(*(item.future for item in items))
        finally:
            for item in items:
                item.future.cancel()  # a no-op for those answered
        return np.stack(vectors) if vectors else np.zeros((0, self.dimensions or 0), np.float32)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _dispatch(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._send_what_can_go()

    def _send_what_can_go(self) -> None:
        now = time.monotonic()
        self._fail_waiting_too_long(now)
        while self._queue:
            free = [e for e in self.endpoints if e.usable(now)]
            batch: list[_Item] = []
            for endpoint in sorted(free, key=lambda e: e.in_flight):  # the fewest in flight that has texts to take
                batch = self._take(endpoint, now, free)
                if batch:
                    break
            if not batch:
                break
            endpoint.in_flight += 1
            self._spawn(self._send(endpoint, batch))
        self._wake_later(now)

    def _take(self, endpoint: Endpoint, now: float, free: list[Endpoint]) -> list[_Item]:
        """Up to max_batch texts of one input_type for `endpoint`, oldest first: not those waiting out
        a back-off, nor those that failed there while a `free` endpoint where they have not failed has
        room (one that failed everywhere may go anywhere)."""
        batch: list[_Item] = []
        kept: deque[_Item] = deque()
        kind = None
        while self._queue and len(batch) < self.spec.max_batch:
            item = self._queue.popleft()
            if item.future.done():
                continue  # its caller is gone
            ready = item.not_before <= now and not (endpoint in item.avoid
                                                    and any(e not in item.avoid for e in free))
            if ready and not batch and item.alone:
                batch.append(item)
                break
            if ready and not item.alone and (not batch or item.outgoing.kind == kind):
                kind = item.outgoing.kind
                batch.append(item)
            else:
                kept.append(item)
        self._queue.extendleft(reversed(kept))
        return batch

    def _wake_later(self, now: float) -> None:
        """Come back when a back-off or a 429's pause ends."""
        waits = [i.not_before for i in self._queue if i.not_before > now]
        waits += [e.cooling_until for e in self.endpoints if e.cooling_until > now]
        if self._queue:
            waits.append(now + self.spec.timeout / 4)  # for _fail_waiting_too_long
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if waits:
            self._timer = asyncio.get_running_loop().call_later(min(waits) - now + 0.001, self._poke)

    def _fail_waiting_too_long(self, now: float) -> None:
        """Texts that found no endpoint up for a whole request timeout fail (the error names each
        endpoint and why it cannot answer)."""
        if any(e.state == "up" for e in self.endpoints) or not self._queue:
            return
        waiting = deque()
        for item in self._queue:
            if item.future.done():
                continue
            if now - item.queued >= self.spec.timeout:
                item.future.set_exception(self._unavailable(item, f"found no endpoint up for {self.spec.timeout:g} s"))
            else:
                waiting.append(item)
        self._queue = waiting

    async def _send(self, endpoint: Endpoint, batch: list[_Item]) -> None:
        request = asyncio.current_task()
        callback = _cut_off_when_all_gone(batch, request)
        for item in batch:
            item.future.add_done_callback(callback)
        try:
            vectors = await endpoint.embed(self._connection(), [i.outgoing.text for i in batch],
                                           batch[0].outgoing.kind, self.dimensions)
        except RequestFailed as failed:
            self._failed(endpoint, batch, failed)
        except asyncio.CancelledError:
            if not self._closing:
                self._queue.extendleft(reversed([i for i in batch if not i.future.done()]))
            raise
        else:
            endpoint.failures = 0
            if self.dimensions is None:
                self.dimensions = vectors.shape[1]
            for item, vector in zip(batch, vectors, strict=True):
                if not item.future.done():
                    item.future.set_result(vector)
        finally:
            for item in batch:
                item.future.remove_done_callback(callback)
            endpoint.in_flight -= 1
            self._poke()

    def _failed(self, endpoint: Endpoint, batch: list[_Item], failed: RequestFailed) -> None:
        """A request failed: its texts go back to the queue, to try elsewhere after a back-off, or fail.
        A 429 is not a try (the server is busy: it is left alone as long as it asks), only a text that
        has waited RATE_LIMITED_FOR request timeouts in all fails; a 4xx of several texts may be one
        text's fault: each goes again in a request of its own."""
        now = time.monotonic()
        cause = f"{endpoint.label}: {failed}"
        live = [item for item in batch if not item.future.done()]
        if failed.cause == "http_429":
            endpoint.cooling_until = now + (failed.retry_after if failed.retry_after is not None else 1.0)
        elif failed.cause != "http_4xx":
            endpoint.failures += 1
            if endpoint.failures >= DOWN_AFTER and endpoint.state == "up":
                self._down(endpoint, str(failed))
        split = failed.cause == "http_4xx" and len(live) > 1
        attempts = max(3, 2 * len(self.endpoints))
        for item in live:
            item.last = cause
            if split:
                item.alone = True
                continue
            if failed.cause == "http_429":
                if now - item.queued > RATE_LIMITED_FOR * self.spec.timeout:
                    item.future.set_exception(self._unavailable(item, "was refused with 429 for too long"))
                continue
            item.attempts += 1
            item.avoid.add(endpoint)
            if item.attempts >= attempts:
                item.future.set_exception(self._unavailable(item, f"failed {item.attempts} times"))
                continue
            item.not_before = now + min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (item.attempts - 1))
        self._queue.extendleft(reversed([i for i in live if not i.future.done()]))

    def _unavailable(self, item: _Item, what: str) -> RemoteUnavailable:
        states = "; ".join(f"{e.label} {e.state}" + (f" ({e.problem})" if e.problem else "") for e in self.endpoints)
        last = f"; the last failure: {item.last}" if item.last else ""
        return RemoteUnavailable(f"no endpoint of remote pool {self.spec.name} could embed a text (it {what}): "
                                 f"{states}{last}")

    def _connection(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            context: ssl.SSLContext | bool = False if not self.spec.tls_verify else ssl.create_default_context(
                cafile=self.spec.ca_file or None)
            connector = aiohttp.TCPConnector(limit=0, ssl=context)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._session

    # ------------------------------------------------------------------ health

    def _down(self, endpoint: Endpoint, why: str) -> None:
        endpoint.state = "down"
        endpoint.problem = why
        log.warning("remote endpoint down", extra={"event": "remote_endpoint_down", "pool": self.spec.name,
                                                    "endpoint": endpoint.label, "reason": why})
        self._spawn(self._watch(endpoint))

    async def _watch(self, endpoint: Endpoint) -> None:
        """Probe `endpoint` until it passes (then it is up), waiting longer between tries."""
        tries = 0
        while True:
            was = endpoint.state
            verdict = await self.probe.check(endpoint, self._connection(), self.dimensions)
            if verdict.passed:
                if self.dimensions is None:
                    self.dimensions = verdict.dimensions
                endpoint.state, endpoint.problem, endpoint.failures = "up", None, 0
                event = "remote_endpoint_up" if was == "checking" else "remote_endpoint_back"
                log.info("remote endpoint up" if was == "checking" else "remote endpoint came back",
                         extra={"event": event, "pool": self.spec.name, "endpoint": endpoint.label,
                                "cosine": verdict.cosine})
                self._poke()
                return
            endpoint.problem = verdict.problem
            if verdict.refused:
                if endpoint.state != "refused":
                    log.error("remote endpoint refused", extra={"event": "remote_endpoint_refused",
                                                                "pool": self.spec.name, "endpoint": endpoint.label,
                                                                "reason": verdict.problem})
                endpoint.state = "refused"
                await asyncio.sleep(REFUSED_PROBE_EVERY)
            else:
                if endpoint.state == "checking":
                    log.warning("remote endpoint down", extra={"event": "remote_endpoint_down", "pool": self.spec.name,
                                                               "endpoint": endpoint.label, "reason": verdict.problem})
                endpoint.state = "down"
                await asyncio.sleep(PROBE_EVERY[min(tries, len(PROBE_EVERY) - 1)])
                tries += 1

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(retrieve)


def _cut_off_when_all_gone(batch: list[_Item], request: asyncio.Task[None] | None) -> Callable[[object], None]:
    """A done-callback for the batch's futures: once every caller is gone, the request is cancelled
    (its texts go back to the queue, where they are dropped)."""
    def callback(_: object) -> None:
        if request is not None and all(item.future.cancelled() for item in batch):
            request.cancel()
    return callback
