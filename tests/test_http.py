"""The HTTP listener: OpenAI's embeddings API gives SQL's vectors bit for bit, the API key is enforced,
bodies are bounded; /metrics counts what happened; /healthz sees a dead engine worker, a model that
cannot load and an unreachable upstream. The proxy runs as users run it, in front of the real server."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import platform
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inference.build import builtin_dir
from inference.engine import EmbeddingEngine
from inference.errors import EmbeddingTimeout
from proxy import config as cfg
from proxy.embeddings_api import ApiError, check_dimensions, embeddings_response, parse_embeddings_request
from proxy.health import HealthCheck
from proxy.http import HttpApi, HttpListener
from proxy.intercept.functions import BUILTIN_URI, Backend
from proxy.intercept.modelpaths import default_model_roots
from proxy.metrics import Metrics
from proxy.stats import STATS, Histogram
from proxy.upstream import Upstream

from .pgcluster import PgCluster, free_port
from .proxyproc import ProxyProcess, start_proxy
from .test_portability import EMULATED_CPU, QEMU

API_KEY = "test-key-4f1c"
MAX_BODY = 1 << 20
TEXTS = ["query: how do I reset my password?", "passage: Zum Zurücksetzen des Passworts auf „Vergessen“ klicken.",
         "パスワードを忘れた場合", "", "x" * 3000]


@pytest.fixture(scope="module")
def http_proxy(pg: PgCluster, model_data_dir: Path) -> Iterator[tuple[ProxyProcess, str]]:
    port = free_port()
    running = start_proxy(model_data_dir, "--http-listen", f"127.0.0.1:{port}", "--http-max-body", str(MAX_BODY),
                          upstream=pg.url(), preload=True, env={"AZURE_LOCAL_AI_PROXY_HTTP_API_KEY": API_KEY})
    base = f"http://127.0.0.1:{port}"
    wait_until_healthy(base)
    yield running, base
    running.stop()


def wait_until_healthy(base: str, timeout: float = 120) -> None:
    """Until the built-in model is loaded and warmed up (/healthz says so). A call that came earlier would
    share its model run with the warm-up text, and a text's last bits depend on the run it is in (its
    padding): the comparisons below need each call alone in its run, as it is in the SQL call it is
    compared with."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
        yield session


async def post_embeddings(http: aiohttp.ClientSession, base: str, body: object) -> tuple[int, dict]:
    async with http.post(f"{base}/v1/embeddings", json=body) as response:
        return response.status, await response.json()


async def sql_vectors(proxy: ProxyProcess, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The same texts through SQL (asyncpg: binary real[]): one call each, and one call with the array."""
    conn = await asyncpg.connect(proxy.dsn())
    try:
        one = [await conn.fetchval("SELECT azure_local_ai.create_embeddings($1, $2)", BUILTIN_URI, t) for t in texts]
        rows = await conn.fetch("SELECT embedding FROM azure_local_ai.create_embeddings($1, $2::text[])",
                                BUILTIN_URI, texts)
    finally:
        await conn.close()
    return np.array(one, np.float32), np.array([r["embedding"] for r in rows], np.float32)


# ---------------------------------------------------------------- the embeddings API, end to end


async def test_vectors_equal_the_sql_functions_bit_for_bit(
    http_proxy: tuple[ProxyProcess, str], http: aiohttp.ClientSession
) -> None:
    proxy, base = http_proxy
    singles, batch = await sql_vectors(proxy, TEXTS)
    for index, text in enumerate(TEXTS):
        status, answer = await post_embeddings(http, base, {"model": BUILTIN_URI, "input": text})
        assert status == 200, answer
        (item,) = answer["data"]
        assert (item["object"], item["index"]) == ("embedding", 0)
        assert np.array(item["embedding"], np.float32).tobytes() == singles[index].tobytes()
    status, answer = await post_embeddings(http, base, {"model": BUILTIN_URI, "input": TEXTS})
    assert status == 200, answer
    assert answer["object"] == "list" and answer["model"] == BUILTIN_URI
    assert [item["index"] for item in answer["data"]] == list(range(len(TEXTS)))
    assert np.array([item["embedding"] for item in answer["data"]], np.float32).tobytes() == batch.tobytes()
    assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"]
    assert answer["usage"]["prompt_tokens"] > 512  # the long text alone is truncated to 512 tokens
    status, encoded = await post_embeddings(
        http, base, {"model": BUILTIN_URI, "input": TEXTS, "encoding_format": "base64", "dimensions": 384})
    assert status == 200, encoded
    decoded = np.array([np.frombuffer(base64.b64decode(item["embedding"]), "<f4") for item in encoded["data"]])
    assert decoded.tobytes() == batch.tobytes()
    assert encoded["usage"] == answer["usage"]


def test_openais_own_client_gets_the_sql_functions_vectors(http_proxy: tuple[ProxyProcess, str]) -> None:
    """The OpenAI Python SDK (which asks for base64 and decodes it itself), as applications use it."""
    proxy, base = http_proxy
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0)
    answer = client.embeddings.create(model=BUILTIN_URI, input=TEXTS[:3])
    _, batch = asyncio.run(sql_vectors(proxy, TEXTS[:3]))
    assert np.array([item.embedding for item in answer.data], np.float32).tobytes() == batch.tobytes()
    assert answer.model == BUILTIN_URI and answer.usage.prompt_tokens > 3
    assert BUILTIN_URI in [model.id for model in client.models.list()]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).embeddings.create(
            model=BUILTIN_URI, input="query: x")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model:v1", input="query: x")


async def test_models_lists_what_the_sql_functions_take(
    http_proxy: tuple[ProxyProcess, str], http: aiohttp.ClientSession
) -> None:
    _, base = http_proxy
    async with http.get(f"{base}/v1/models") as response:
        assert response.status == 200
        listing = await response.json()
    assert listing["object"] == "list"
    assert BUILTIN_URI in [model["id"] for model in listing["data"]]
    assert all(model["object"] == "model" and isinstance(model["created"], int) for model in listing["data"])


async def test_the_api_key_is_enforced(http_proxy: tuple[ProxyProcess, str]) -> None:
    _, base = http_proxy
    body = {"model": BUILTIN_URI, "input": "query: key"}
    async with aiohttp.ClientSession() as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
            for method, path in (("POST", "/v1/embeddings"), ("GET", "/v1/models")):
                async with anonymous.request(method, f"{base}{path}", json=body, headers=headers) as response:
                    assert response.status == 401, (headers, path)
                    error = (await response.json())["error"]
                    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        async with anonymous.post(f"{base}/v1/embeddings", json=body,
                                  headers={"Authorization": f"Bearer {API_KEY}"}) as response:
            assert response.status == 200
        for path in ("/metrics", "/healthz"):  # for the monitoring, which holds no key
            async with anonymous.get(f"{base}{path}") as response:
                assert response.status == 200, path


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "no-such-model:v1", "input": "x"}, 404, None),
    ({"model": BUILTIN_URI, "input": "x", "dimensions": 128}, 400, "dimensions"),
    ({"model": BUILTIN_URI, "input": [1, 2, 3]}, 400, "input"),
    ({"model": BUILTIN_URI, "input": []}, 400, "input"),
    ({"model": BUILTIN_URI, "input": "x", "encoding_format": "float16"}, 400, "encoding_format"),
    ({"input": "x"}, 400, "model"),
])
async def test_bad_requests_get_openais_error_shape(
    http_proxy: tuple[ProxyProcess, str], http: aiohttp.ClientSession, body: dict, status: int, param: str | None
) -> None:
    _, base = http_proxy
    got, answer = await post_embeddings(http, base, body)
    assert got == status
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and answer["error"]["message"]
    if status == 404:
        assert answer["error"]["code"] == "model_not_found"


async def test_bodies_are_bounded_and_large_ones_decoded(
    http_proxy: tuple[ProxyProcess, str], http: aiohttp.ClientSession
) -> None:
    proxy, base = http_proxy
    too_big = json.dumps({"model": BUILTIN_URI, "input": "y" * MAX_BODY}).encode()
    async with http.post(f"{base}/v1/embeddings", data=too_big,
                         headers={"Content-Type": "application/json"}) as response:
        assert response.status == 413
        assert "http_max_body" in (await response.json())["error"]["message"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
        for _ in range(4):
            yield b" " * (MAX_BODY // 2)

    async with http.post(f"{base}/v1/embeddings", data=chunks()) as response:
        assert response.status == 413
    # 600 kB of JSON (decoded in a worker thread) that means one short text.
    padded = b'{"model": "' + BUILTIN_URI.encode() + b'", "input": "query: padded"' + b" " * 600_000 + b"}"
    async with http.post(f"{base}/v1/embeddings", data=padded) as response:
        assert response.status == 200
        vector = np.array((await response.json())["data"][0]["embedding"], np.float32)
    singles, _ = await sql_vectors(proxy, ["query: padded"])
    assert vector.tobytes() == singles[0].tobytes()
    async with http.post(f"{base}/v1/embeddings", data=b"{not json") as response:
        assert response.status == 400
    assert proxy.alive()


def nested(depth: int, opening: str, closing: str) -> bytes:
    return (opening * depth + closing * depth).encode()


@pytest.mark.parametrize("body", [
    nested(100_000, "[", "]"),
    nested(100_000, '{"a":', "}"),
    b'{"model": "' + BUILTIN_URI.encode() + b'", "input": ' + nested(100_000, "[", "]") + b"}",
    nested(5_000, "[", "]"),  # short enough to be decoded on the event loop, not in a worker thread
], ids=["array", "object", "input", "short-array"])
async def test_deeply_nested_json_is_a_bad_request(
    http_proxy: tuple[ProxyProcess, str], http: aiohttp.ClientSession, body: bytes
) -> None:
    """JSON nested past the decoder's depth limit is the client's error (400, in OpenAI's shape), not the
    proxy's (500 and a traceback in its log)."""
    proxy, base = http_proxy
    assert len(body) < MAX_BODY
    logged = len(proxy.log)
    async with http.post(f"{base}/v1/embeddings", data=body, headers={"Content-Type": "application/json"}) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error" and "too deeply" in error["message"]
    new_lines = proxy.log[logged:]
    assert "RecursionError" not in new_lines and "Traceback" not in new_lines and "level=error" not in new_lines
    assert proxy.alive()


# ---------------------------------------------------------------- /metrics and /healthz


async def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser, by (name, labels)."""
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = await response.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_count_sessions_bytes_calls_errors_and_engine_work(
    http_proxy: tuple[ProxyProcess, str], http: aiohttp.ClientSession
) -> None:
    proxy, base = http_proxy
    before = await scrape(base)
    conn = await asyncpg.connect(proxy.dsn())
    try:
        await conn.fetchval("SELECT azure_local_ai.create_embeddings($1, 'query: counted')", BUILTIN_URI)
        with pytest.raises(asyncpg.UndefinedObjectError):
            await conn.fetchval("SELECT azure_local_ai.create_embeddings('no-such-model:v1', 'x')")
        during = await scrape(base)
    finally:
        await conn.close()
    await post_embeddings(http, base, {"model": BUILTIN_URI, "input": ["query: a", "query: b", "query: c"]})
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(proxy.dsn("scram_user", "wrong"))
    after = await scrape(base)

    def grew(name: str, amount: float | None = None, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        growth = after.get(key, 0.0) - before.get(key, 0.0)
        assert growth > 0 if amount is None else growth == amount, (name, labels, growth)
        return growth

    prefix = "azure_local_ai_proxy_"
    assert during[(prefix + "sessions", ())] >= 1
    grew(prefix + "sessions_total", 1)
    grew(prefix + "sessions_refused_total", 1, by="server")
    grew(prefix + "relayed_bytes_total", direction="client_to_server")
    grew(prefix + "relayed_bytes_total", direction="server_to_client")
    grew(prefix + "calls_total", 2, function="create_embeddings", origin="sql")
    grew(prefix + "calls_total", 1, function="create_embeddings", origin="http")
    grew(prefix + "errors_total", 1, sqlstate="42704", origin="sql")
    grew(prefix + "call_duration_seconds_count", 3, function="create_embeddings")
    grew(prefix + "http_requests_total", 1, path="/v1/embeddings", code="200")
    grew(prefix + "embedded_texts_total", 4)
    assert grew(prefix + "embedded_tokens_total") >= 4 * 3  # CLS, SEP and the words
    grew(prefix + "engine_batch_rows_count", 2)
    grew(prefix + "engine_batch_rows_sum", 4)
    assert after[(prefix + "engine_queue_depth", ())] == 0
    assert after[(prefix + "engine_up", ())] == 1
    assert after[(prefix + "model_loaded", (("model", BUILTIN_URI),))] == 1
    assert after[(prefix + "builtin_model_state", (("state", "ready"),))] == 1
    assert after[(prefix + "upstream_connect_failures_total", ())] == 0


async def test_health_is_ok_in_front_of_a_running_server(http_proxy: tuple[ProxyProcess, str]) -> None:
    _, base = http_proxy
    async with aiohttp.ClientSession() as session, session.get(f"{base}/healthz") as response:
        assert (response.status, await response.json()) == (200, {"status": "ok"})


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
async def in_process(pg: PgCluster, model_data_dir: Path) -> AsyncIterator[tuple[Backend, str, HttpListener]]:
    """The listener in this process, over a real engine and the real server, so that a test can stop the
    engine's worker thread as a failure inside it would."""
    backend = Backend.open(model_data_dir, default_model_roots(model_data_dir), EmbeddingEngine())
    await backend.prepare_builtin()
    health = HealthCheck(backend, Upstream.from_url(pg.url()))
    api = HttpApi(backend, Metrics(STATS, backend, lambda: 0), health, api_key="", max_body=MAX_BODY)
    listener = HttpListener(api, "127.0.0.1", 0)
    await listener.start()
    yield backend, f"http://127.0.0.1:{listener.port}", listener
    await listener.close()
    await backend.engine.close()


async def health(base: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.get(f"{base}/healthz") as response:
        return response.status, await response.json()


async def test_health_catches_a_dead_engine_worker(in_process: tuple[Backend, str, HttpListener]) -> None:
    backend, base, _ = in_process
    engine = backend.engine
    assert await health(base) == (200, {"status": "ok"})

    def stop_thread(snapshot: list) -> None:
        raise SystemExit  # ends the dispatcher thread, as an escaped BaseException would

    engine._dispatch = stop_thread  # type: ignore[method-assign]
    files = await backend.model_files(BUILTIN_URI)
    with pytest.raises(EmbeddingTimeout):
        await engine.embed(files, ["query: lost"], timeout=0.5)
    engine._dispatcher.join(5)
    status, answer = await health(base)
    assert status == 503 and answer["status"] == "unavailable"
    assert any("worker thread is not running" in problem for problem in answer["problems"]), answer
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/metrics") as response:
            assert "azure_local_ai_proxy_engine_up 0.0" in await response.text()
        del engine._dispatch  # the class's own again: the next request restarts the thread and is served
        async with session.post(f"{base}/v1/embeddings", json={"model": BUILTIN_URI, "input": "query: x"}) as response:
            assert response.status == 200
    assert engine.stats.restarts == 1
    assert await health(base) == (200, {"status": "ok"})


async def test_health_catches_an_unreachable_upstream(in_process: tuple[Backend, str, HttpListener]) -> None:
    _, base, listener = in_process
    listener.api.health = HealthCheck(listener.api.backend, Upstream("127.0.0.1", closed_port(), connect_timeout=1))
    status, answer = await health(base)
    assert status == 503
    assert any("does not accept connections" in problem for problem in answer["problems"]), answer


async def test_health_catches_a_model_that_cannot_load(model_data_dir: Path, tmp_path: Path) -> None:
    """The built-in model's build is there, but its ONNX file was damaged on disk: it cannot load."""
    shutil.copytree(builtin_dir(model_data_dir), builtin_dir(tmp_path))
    (onnx,) = builtin_dir(tmp_path).glob("*.onnx")
    onnx.write_bytes(b"not an ONNX model")
    backend = Backend.open(tmp_path, default_model_roots(tmp_path), EmbeddingEngine())
    try:
        with pytest.raises(Exception, match=r"(?i)onnx|protobuf|model"):
            await backend.prepare_builtin()
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        upstream = Upstream("127.0.0.1", server.sockets[0].getsockname()[1])
        problems = await HealthCheck(backend, upstream).problems()
        server.close()
        assert len(problems) == 1 and "could not be loaded" in problems[0], problems
    finally:
        await backend.engine.close()


# ---------------------------------------------------------------- the pieces, without sockets


def test_request_parsing_follows_openai() -> None:
    one = parse_embeddings_request({"model": "m:v1", "input": "text"})
    assert (one.inputs, one.single, one.encoding_format, one.dimensions) == (["text"], True, "float", None)
    many = parse_embeddings_request({"model": "m:v1", "input": ["a", "b"], "encoding_format": "base64",
                                     "dimensions": 384, "user": "ignored"})
    assert (many.inputs, many.single, many.encoding_format, many.dimensions) == (["a", "b"], False, "base64", 384)
    for bad, param in (([], None), ({"model": "m", "input": ["a", 1]}, "input"),
                       ({"model": "m", "input": ["a"] * 2049}, "input"),
                       ({"model": "m", "input": "a", "dimensions": True}, "dimensions"),
                       ({"model": "", "input": "a"}, "model")):
        with pytest.raises(ApiError) as caught:
            parse_embeddings_request(bad)
        assert (caught.value.status, caught.value.param) == (400, param)
    check_dimensions(many, 384)
    with pytest.raises(ApiError):
        check_dimensions(many, 768)


def test_base64_is_little_endian_float32() -> None:
    request = parse_embeddings_request({"model": "m", "input": "a", "encoding_format": "base64"})
    vector = np.array([1.0, -2.5, 0.1], np.float32)
    answer = embeddings_response(request, [vector], 3)
    # 1.0, -2.5 and float32(0.1) as IEEE 754 little-endian bytes.
    expected = b"\x00\x00\x80\x3f" + b"\x00\x00\x20\xc0" + b"\xcd\xcc\xcc\x3d"
    assert base64.b64decode(answer["data"][0]["embedding"]) == expected  # type: ignore[index]
    assert answer["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_histogram_buckets_are_prometheus_le() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        histogram.observe(value)
    assert histogram.cumulative() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert histogram.sum == pytest.approx(8.65)


# ---------------------------------------------------------------- native code on an older CPU

EMULATED_SERVER = """
import asyncio
import aiohttp
from aiohttp import _http_parser, _http_writer, web  # noqa: F401 - the C parser (llhttp) and writer
import frozenlist._frozenlist, multidict._multidict, propcache._helpers_c, yarl._quoting_c  # noqa: F401

async def main():
    async def echo(request):
        return web.json_response({"n": len((await request.json())["input"]), "q": request.query["a"]})
    app = web.Application()
    app.router.add_post("/x", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/x?a=%C3%A9"
    async with aiohttp.ClientSession() as session, session.post(url, json={"input": ["a"] * 5}) as response:
        print(response.status, await response.json())
    await runner.cleanup()

asyncio.run(main())
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates an x86-64 CPU")
def test_the_listeners_native_code_runs_on_a_cpu_without_avx512() -> None:
    """aiohttp and its helpers ship compiled code (llhttp, multidict, yarl, ...): a build for newer CPUs than
    the wheels' baseline would kill the proxy with SIGILL at the first request (see test_portability)."""
    out = subprocess.run([QEMU, "-cpu", EMULATED_CPU, sys.executable, "-c", EMULATED_SERVER],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "200 {'n': 5, 'q': 'é'}"


def test_a_taken_http_port_stops_the_proxy_with_a_message(pg: PgCluster, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "serve", "--listen", f"127.0.0.1:{free_port()}", "--upstream", pg.url(),
             "--data-dir", str(tmp_path), "--preload-model", "false", "--http-listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr


def test_the_http_options() -> None:
    assert cfg.load(None).http_address is None  # off unless asked for
    flags = argparse.Namespace(http_listen=":9187", http_api_key=None, http_max_body=None)
    assert cfg.load(None, flags).http_address == ("127.0.0.1", 9187)  # a bare port is loopback
    for bad in (argparse.Namespace(http_listen="9187"), argparse.Namespace(http_max_body=0)):
        with pytest.raises(cfg.ConfigError):
            cfg.load(None, bad)
