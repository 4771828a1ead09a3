"""A pool of remote embeddings servers (proxy/remote/pool.py) against real stand-in server processes
(standin_embeddings.py) that fail on demand: 500s, 429s with Retry-After, malformed and slow bodies, an
endpoint failing until it is marked down and then coming back, every endpoint failing, a server whose
vectors are not the model's, and a caller that goes away while its request hangs. Each test checks the
vectors the caller gets and what the pool recorded (errors by cause, state, cooling, requests in flight).

The vectors are random unit vectors, the same in the stand-ins' files and in the pool's reference (the
"local engine" the probe compares with), so that the ONNX engine plays no part."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from proxy.remote.pool import DOWN_AFTER, RemotePool, RemoteUnavailable
from proxy.remote.probe import PROBES
from proxy.remote.spec import parse_pools
from proxy.remote.texts import Outgoing

from .daemon import start_standin, stop, write_vectors
from .pgcluster import free_port

DIMENSIONS = 384
TEXTS = [f"remote fault text {i}" for i in range(16)]  # two batches of max_batch=8


def _unit_vectors(count: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, DIMENSIONS)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


#: What every right server answers (and what the pool's reference says for the probes).
TABLE = dict(zip([*PROBES, *TEXTS], _unit_vectors(len(PROBES) + len(TEXTS), 1), strict=True))


async def reference(texts: list[str]) -> np.ndarray:
    return np.stack([TABLE[text] for text in texts])


def expected(texts: list[str]) -> np.ndarray:
    return np.stack([TABLE[text] for text in texts])


class StandIns:
    """Stand-in server processes started by a test, stopped after it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.procs: dict[int, object] = {}
        self.right = write_vectors(directory / "right.npz", list(TABLE), np.stack(list(TABLE.values())))

    def start(self, vectors: Path | None = None) -> int:
        port = free_port()
        self.procs[port] = start_standin(port, vectors or self.right)
        return port

    def stop(self, port: int) -> None:
        stop(self.procs[port])  # type: ignore[arg-type]

    def stop_all(self) -> None:
        for proc in self.procs.values():
            stop(proc)  # type: ignore[arg-type]


@pytest.fixture
def standins(tmp_path: Path) -> Iterator[StandIns]:
    servers = StandIns(tmp_path)
    try:
        yield servers
    finally:
        servers.stop_all()


async def behave(port: int, mode: str, count: int | None = None, retry_after: float | None = None) -> None:
    """Make the stand-in on `port` misbehave (the next `count` requests, or all)."""
    order: dict[str, object] = {"mode": mode}
    if count is not None:
        order["count"] = count
    if retry_after is not None:
        order["retry_after"] = retry_after
    url = f"http://127.0.0.1:{port}/_behave"
    async with aiohttp.ClientSession() as session, session.post(url, json=order) as reply:
        assert reply.status == 200, await reply.text()


async def served(port: int) -> dict[str, int]:
    """What the stand-in on `port` counted: requests (including failed ones) and texts answered."""
    url = f"http://127.0.0.1:{port}/_counts"
    async with aiohttp.ClientSession() as session, session.get(url) as reply:
        return await reply.json()


async def until(condition, timeout: float, what: str, every: float = 0.02) -> float:  # type: ignore[no-untyped-def]
    """Poll `condition()` until it holds; the seconds it took. Fails with `what` after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(every)
    return time.monotonic() - started


def spec_of(ports: list[int], timeout: float = 2.0):  # type: ignore[no-untyped-def]
    urls = ",".join(f"http://127.0.0.1:{port}/v1" for port in ports)
    return parse_pools(f"p = urls={urls} model=m max_batch=8 timeout={timeout:g}")["p"]


@asynccontextmanager
async def running_pool(ports: list[int], timeout: float = 2.0, up: int | None = None) -> AsyncIterator[RemotePool]:
    """A started RemotePool of the stand-ins on `ports`, once `up` of its endpoints (all by default)
    passed the probe; closed afterwards."""
    pool = RemotePool(spec_of(ports, timeout), DIMENSIONS, reference)
    pool.start()
    try:
        want = len(ports) if up is None else up
        await until(lambda: sum(e.state == "up" for e in pool.endpoints) >= want, 20, "endpoints up")
        yield pool
    finally:
        await pool.close()


async def embed(pool: RemotePool, texts: list[str]) -> np.ndarray:
    return await pool.embed([Outgoing(None, text) for text in texts])


def assert_right(got: np.ndarray, texts: list[str]) -> None:
    assert got.shape == (len(texts), DIMENSIONS)
    cosines = np.sum(got * expected(texts), axis=1)
    assert cosines.min() > 0.9999, cosines


# ---------------------------------------------------------------------------------------- the cases


@pytest.mark.timeout(60)
async def test_500s_are_retried_on_the_other_endpoint(standins: StandIns) -> None:
    """A few 500s from one endpoint: every text is still answered right, by the other endpoint; the
    failures are counted as http_5xx; fewer than DOWN_AFTER in a row leave it up, and it serves again
    once it answers."""
    a, b = standins.start(), standins.start()
    async with running_pool([a, b]) as pool:
        first, second = pool.endpoints
        await behave(a, "500", count=DOWN_AFTER - 1)
        before_a, before_b = first.stats.texts, second.stats.texts
        for _ in range(DOWN_AFTER - 1):  # both idle: the first endpoint gets the first batch each time
            assert_right(await embed(pool, TEXTS), TEXTS)
        assert first.stats.errors == {"http_5xx": DOWN_AFTER - 1}
        assert first.failures == DOWN_AFTER - 1 and first.state == "up"
        assert first.stats.texts == before_a  # it answered none
        assert second.stats.texts - before_b == len(TEXTS) * (DOWN_AFTER - 1)
        assert not second.stats.errors
        assert pool.problems() == []

        assert_right(await embed(pool, TEXTS), TEXTS)  # its 500s are over
        assert first.stats.texts > before_a and first.failures == 0
        assert first.stats.errors == {"http_5xx": DOWN_AFTER - 1}


@pytest.mark.timeout(60)
async def test_429_retry_after_cools_the_endpoint(standins: StandIns) -> None:
    """A 429 with Retry-After: 2: the texts are answered by the other endpoint at once; the endpoint
    that said 429 is left alone for 2 s (cooling_until) and is not counted as failing or marked down."""
    a, b = standins.start(), standins.start()
    async with running_pool([a, b]) as pool:
        first, second = pool.endpoints
        await behave(a, "429", count=1, retry_after=2)
        started = time.monotonic()
        assert_right(await embed(pool, TEXTS), TEXTS)
        finished = time.monotonic()
        assert finished - started < 1.5  # not waiting for the 429's pause
        assert first.stats.errors == {"http_429": 1}
        assert started + 2 <= first.cooling_until <= finished + 2
        assert first.state == "up" and first.failures == 0
        assert not first.usable(finished) and first.usable(first.cooling_until)
        assert first.stats.texts == len(PROBES)  # the probe's only
        assert second.stats.texts == len(PROBES) + len(TEXTS)  # the probe's and all of these


@pytest.mark.timeout(60)
async def test_429_retry_after_is_waited_out_by_a_single_endpoint(standins: StandIns) -> None:
    """With no other endpoint, a 429's Retry-After is honoured: the texts go again after 2 s, and are
    answered right."""
    a = standins.start()
    async with running_pool([a]) as pool:
        (only,) = pool.endpoints
        await behave(a, "429", count=1, retry_after=2)
        started = time.monotonic()
        assert_right(await embed(pool, TEXTS[:3]), TEXTS[:3])
        took = time.monotonic() - started
        assert 1.95 <= took < 4, took
        assert only.stats.errors == {"http_429": 1}
        assert only.state == "up" and only.failures == 0
        assert (await served(a))["requests"] == 3  # the probe, the 429, the one answered


@pytest.mark.timeout(60)
async def test_malformed_reply_is_retried_elsewhere(standins: StandIns) -> None:
    """A body that is not an embeddings reply is counted "malformed" and its texts go to the other
    endpoint."""
    a, b = standins.start(), standins.start()
    async with running_pool([a, b]) as pool:
        first, second = pool.endpoints
        await behave(a, "garbage", count=1)
        before_a = first.stats.texts
        assert_right(await embed(pool, TEXTS), TEXTS)
        assert first.stats.errors == {"malformed": 1}
        assert first.stats.texts == before_a
        assert first.state == "up" and first.failures == 1
        assert not second.stats.errors and second.stats.texts == len(PROBES) + len(TEXTS)


@pytest.mark.timeout(60)
async def test_slow_body_times_out_and_is_retried_elsewhere(standins: StandIns) -> None:
    """A body trickling in at 64 bytes a second is given up after the pool's timeout (2 s), counted
    "timeout", and its texts are answered by the other endpoint within a few seconds."""
    a, b = standins.start(), standins.start()
    async with running_pool([a, b], timeout=2) as pool:
        first, second = pool.endpoints
        await behave(a, "slow", count=1)
        before_a = first.stats.texts
        started = time.monotonic()
        assert_right(await embed(pool, TEXTS), TEXTS)
        took = time.monotonic() - started
        assert 1.9 <= took < 5, took  # the timeout, then the other endpoint at once
        assert first.stats.errors == {"timeout": 1}
        assert first.stats.texts == before_a
        assert first.state == "up" and first.failures == 1 and first.in_flight == 0
        assert not second.stats.errors and second.stats.texts == len(PROBES) + len(TEXTS)


@pytest.mark.timeout(60)
async def test_failing_endpoint_is_marked_down_and_comes_back(standins: StandIns) -> None:
    """An endpoint that fails DOWN_AFTER times in a row is marked down (and named by problems()); the
    texts are answered by the other meanwhile; once it answers again the probe finds it and it is up
    and serving again."""
    a, b = standins.start(), standins.start()
    async with running_pool([a, b]) as pool:
        first, second = pool.endpoints
        await behave(a, "500")
        for _ in range(DOWN_AFTER):
            assert first.state == "up"
            assert_right(await embed(pool, TEXTS), TEXTS)
        assert first.state == "down"
        assert first.stats.errors["http_5xx"] >= DOWN_AFTER
        assert "500" in (first.problem or "")
        [problem] = pool.problems()
        assert first.label in problem and "down" in problem
        assert second.state == "up" and not second.stats.errors

        # down: it gets no texts, only probes
        before_a = first.stats.texts
        assert_right(await embed(pool, TEXTS), TEXTS)
        assert first.stats.texts == before_a

        await behave(a, "ok")
        await until(lambda: first.state == "up", 10, "the endpoint back up")
        assert first.problem is None and first.failures == 0 and pool.problems() == []
        before_a = first.stats.texts - len(PROBES)  # the probe that passed
        assert_right(await embed(pool, TEXTS), TEXTS)
        assert first.stats.texts > before_a  # serving again


@pytest.mark.timeout(60)
async def test_every_endpoint_failing_raises_remote_unavailable(standins: StandIns) -> None:
    """500s from every endpoint: embed raises RemoteUnavailable soon, naming both endpoints and the last
    failure; with both servers gone (connections refused), it raises too, and once both are down it
    still does within about a request timeout."""
    a, b = standins.start(), standins.start()
    async with running_pool([a, b], timeout=2) as pool:
        first, second = pool.endpoints
        await behave(a, "500")
        await behave(b, "500")
        started = time.monotonic()
        with pytest.raises(RemoteUnavailable) as raised:
            await embed(pool, TEXTS[:3])
        assert time.monotonic() - started < 15
        message = str(raised.value)
        assert first.label in message and second.label in message, message
        assert "the last failure" in message and "500 out of memory" in message, message
        assert first.stats.errors["http_5xx"] >= 1 and second.stats.errors["http_5xx"] >= 1

        standins.stop(a)
        standins.stop(b)
        deadline = time.monotonic() + 30
        while not (first.state == "down" and second.state == "down"):
            assert time.monotonic() < deadline, (first.state, second.state)
            started = time.monotonic()
            with pytest.raises(RemoteUnavailable) as raised:
                await embed(pool, TEXTS[:3])
            assert time.monotonic() - started < 15
        assert first.stats.errors["connect"] + second.stats.errors["connect"] >= 1

        started = time.monotonic()  # nothing up: it waits a request timeout for one to come back
        with pytest.raises(RemoteUnavailable) as raised:
            await embed(pool, TEXTS[:3])
        took = time.monotonic() - started
        assert took < 15, took
        message = str(raised.value)
        assert f"{first.label} down" in message and f"{second.label} down" in message, message
        assert len(pool.problems()) == 2


@pytest.mark.timeout(60)
async def test_endpoint_with_other_vectors_is_refused(standins: StandIns) -> None:
    """A server whose vectors are not the model's (other vectors for the probe texts) is refused, with
    the cosine in its problem, named by problems(), and never gets a text; the other one serves."""
    other = write_vectors(standins.directory / "other.npz", list(PROBES), _unit_vectors(len(PROBES), 2))
    a, wrong = standins.start(), standins.start(other)
    async with running_pool([a, wrong], up=1) as pool:
        right, refused = pool.endpoints
        await until(lambda: refused.state != "checking", 10, "the probe of the wrong server")
        assert right.state == "up" and refused.state == "refused"
        assert "cosine" in (refused.problem or "") and "below 0.999" in (refused.problem or ""), refused.problem
        [problem] = pool.problems()
        assert refused.label in problem and "refused" in problem and "cosine" in problem
        assert_right(await embed(pool, TEXTS), TEXTS)
        assert refused.stats.requests == 1  # the probe only
        assert (await served(wrong))["requests"] == 1
        assert right.stats.texts == len(PROBES) + len(TEXTS)


@pytest.mark.timeout(60)
async def test_cancelled_call_cuts_off_its_hanging_request(standins: StandIns) -> None:
    """A call cancelled while its request hangs (timeout 30 s): the request is cut off at once (nothing
    in flight, nothing left queued, no failure counted), and a later call is answered by the other
    endpoint."""
    a, b = standins.start(), standins.start()
    async with running_pool([a, b], timeout=30) as pool:
        first, second = pool.endpoints
        await behave(b, "hang")  # the first batch goes to the first endpoint, the second to this one
        call = asyncio.ensure_future(embed(pool, TEXTS))
        await until(lambda: second.in_flight == 1 and first.in_flight == 0 and first.stats.texts > len(PROBES),
                    10, "the second batch sent, the first answered")
        assert not call.done()
        requests = (await served(b))["requests"]
        assert requests == 2  # the probe and the hanging one: it reached the server
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        took = await until(lambda: second.in_flight == 0, 2, "the hanging request cut off")
        assert took < 1
        assert not pool._queue
        assert not second.stats.errors and second.failures == 0 and second.state == "up"

        before_a = first.stats.texts
        started = time.monotonic()
        assert_right(await embed(pool, TEXTS[:3]), TEXTS[:3])
        assert time.monotonic() - started < 2
        assert first.stats.texts == before_a + 3
        assert second.in_flight == 0


@pytest.mark.timeout(60)
async def test_the_key_is_sent_from_where_the_pool_says(standins: StandIns, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """api_key_env: sent as Authorization: Bearer; a wrong key is the server's 401 (http_4xx), not a
    vector; a key file that cannot be read is counted as api_key, and never sent."""
    port = free_port()
    standins.procs[port] = start_standin(port, standins.right, api_key="sk-test-123")
    monkeypatch.setenv("STANDIN_KEY", "sk-test-123")
    spec = parse_pools(f"p = urls=http://127.0.0.1:{port}/v1 model=m max_batch=8 timeout=2 api_key_env=STANDIN_KEY")
    pool = RemotePool(spec["p"], DIMENSIONS, reference)
    pool.start()
    try:
        await until(lambda: pool.endpoints[0].state == "up", 20, "endpoint up")
        assert np.allclose(await embed(pool, TEXTS[:4]), expected(TEXTS[:4]), atol=1e-6)
        monkeypatch.setenv("STANDIN_KEY", "sk-wrong")
        with pytest.raises(RemoteUnavailable, match="401 invalid api key"):
            await embed(pool, TEXTS[4:8])
        assert pool.endpoints[0].stats.errors["http_4xx"] >= 1
    finally:
        await pool.close()
    spec = parse_pools(f"p = urls=http://127.0.0.1:{port}/v1 model=m timeout=2 api_key_file={tmp_path / 'absent'}")
    pool = RemotePool(spec["p"], DIMENSIONS, reference)
    pool.start()
    try:
        await until(lambda: pool.endpoints[0].stats.errors["api_key"] >= 1, 20, "the key file refused")
        assert pool.endpoints[0].state != "up" and "api_key_file cannot be read" in (pool.endpoints[0].problem or "")
    finally:
        await pool.close()


@pytest.mark.timeout(60)
async def test_a_text_a_server_refuses_fails_alone(standins: StandIns) -> None:
    """A 400 for a request of several texts may be one text's fault: each is tried again in a request of
    its own, so that the others are answered and only that one fails."""
    async with running_pool([standins.start(), standins.start()]) as pool:
        bad = Outgoing(None, "REFUSE: far too long")
        good = [Outgoing(None, text) for text in TEXTS[:5]]
        results = await asyncio.gather(*(pool.embed([item]) for item in [*good, bad]), return_exceptions=True)
        assert all(np.allclose(got, expected([text.text]), atol=1e-6) for got, text in zip(results, good, strict=False))
        assert isinstance(results[-1], RemoteUnavailable) and "400 input is too long" in str(results[-1])
        assert all(e.state == "up" and e.failures == 0 for e in pool.endpoints)  # a 4xx is not the server's fault
