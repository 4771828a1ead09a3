"""The relay thread (proxy/_fastrelay.c, proxy/fastpath.py): resting sessions are moved there, and
back at the first byte of whatever the proxy must see, with nothing lost, reordered or miscounted."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from proxy import _fastrelay
from proxy.intercept.functions import BUILTIN_URI
from proxy.intercept.sqlcalls import SCHEMA_MARKER, mentions_schema
from proxy.relaythread import STAY_AFTER_HAND_BACK

from .pgcluster import PgCluster, free_port
from .proxyproc import ProxyProcess, start_proxy
from .test_http import wait_until_healthy
from .test_portability import EMULATED_CPU, QEMU

EMBED = f"SELECT azure_local_ai.create_embeddings('{BUILTIN_URI}', 'query: relay thread')::text"


@pytest.fixture(scope="module")
def proxies(pg: PgCluster, model_data_dir: Path, tls_files: dict[str, Path]) -> Iterator[dict[str, tuple]]:
    """The same proxy twice: with the relay thread (the default) and without; each with /metrics."""
    running: dict[str, tuple[ProxyProcess, str]] = {}
    for label, args in (("thread", ()), ("python", ("--relay-thread", "false"))):
        port = free_port()
        proxy = start_proxy(model_data_dir, "--http-listen", f"127.0.0.1:{port}", "--tls-cert",
                            str(tls_files["cert"]), "--tls-key", str(tls_files["key"]), *args,
                            upstream=pg.url(), preload=True)
        running[label] = (proxy, f"http://127.0.0.1:{port}")
        wait_until_healthy(running[label][1])
    yield running
    for proxy, _ in running.values():
        proxy.stop()


def metric(base: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "azure_local_ai_proxy_" + name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"no sample {name} {labels}")


def on_thread(base: str) -> float:
    return metric(base, "relay_thread_sessions")


def rest_on_thread(conn: psycopg.Connection, base: str) -> None:
    """Let the session go back to the thread: once its stay with the event loop is over, the next
    statement hands it over."""
    time.sleep(STAY_AFTER_HAND_BACK + 0.1)
    conn.execute("SELECT 1")
    until(lambda: on_thread(base) >= 1)


def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@given(st.binary(max_size=64), st.sampled_from([b"azure_local_ai", b"AZURE_LOCAL_AI", b"Azure_Local_Ai", b""]),
       st.binary(max_size=64))
def test_the_threads_marker_test_is_the_hooks(before: bytes, middle: bytes, after: bytes) -> None:
    data = before + middle + after
    assert _fastrelay.has_marker(data, SCHEMA_MARKER) == mentions_schema(data)


def run_probe(*emulator: str) -> None:
    """tests/relay_thread_probe.py in a process of its own: its eventfd is then no event loop's."""
    out = subprocess.run([*emulator, sys.executable, "-m", "tests.relay_thread_probe"], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_thread_forwards_stops_and_counts_over_socket_pairs() -> None:
    run_probe()


def test_the_thread_runs_on_a_cpu_without_avx512() -> None:
    run_probe(QEMU, "-cpu", EMULATED_CPU)


def test_a_marker_of_letters_only_is_found_in_any_case() -> None:
    assert _fastrelay.has_marker(b"select HoOk_ 1", b"hook_")
    assert _fastrelay.has_marker(b"xxABCd", b"abcd")
    assert not _fastrelay.has_marker(b"abc", b"abcd")


def test_a_resting_session_moves_to_the_thread_and_comes_back_for_each_call(proxies) -> None:
    (proxy, base), (plain, _) = proxies["thread"], proxies["python"]
    before = on_thread(base)
    sent_before = metric(base, "relayed_bytes_total", direction="client_to_server")
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, psycopg.connect(plain.dsn(), autocommit=True) as ref:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        until(lambda: on_thread(base) == before + 1)
        for _ in range(3):
            called = time.monotonic()
            assert conn.execute(EMBED).fetchone() == ref.execute(EMBED).fetchone()
            assert conn.execute("SELECT 'plain', 2").fetchone() == ("plain", 2)
            stayed = on_thread(base) == before
            # It stays with the event loop a while after a call (where the machine took less to get here).
            assert stayed or time.monotonic() - called >= STAY_AFTER_HAND_BACK
            rest_on_thread(conn, base)
        assert metric(base, "relayed_bytes_total", direction="client_to_server") > sent_before
    until(lambda: on_thread(base) == before)


def test_tls_sessions_and_a_proxy_without_the_thread_keep_to_python(proxies) -> None:
    (proxy, base), (plain, plain_base) = proxies["thread"], proxies["python"]
    before = on_thread(base)
    with psycopg.connect(proxy.dsn(sslmode="require"), autocommit=True) as tls, \
            psycopg.connect(plain.dsn(), autocommit=True) as conn:
        assert tls.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        time.sleep(0.2)
        assert on_thread(base) == before
        assert on_thread(plain_base) == 0


def test_server_notices_and_parameter_changes_reach_the_client_through_the_thread(proxies) -> None:
    proxy, base = proxies["thread"]
    notices: list[str] = []
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        conn.execute("SET escape_string_warning = off")
        for round_ in range(3):
            rest_on_thread(conn, base)
            conn.execute(f"DO $$ BEGIN RAISE NOTICE 'notice {round_}'; END $$")
            conn.execute(f"SET application_name = 'relay-thread-{round_}'")
            assert conn.info.parameter_status("application_name") == f"relay-thread-{round_}"
            # What the hook reads SQL with (ParameterStatus) is followed through the thread: with
            # standard_conforming_strings off, '\\' in a literal is one backslash.
            conforming = round_ % 2 == 0
            conn.execute(f"SET standard_conforming_strings = {'on' if conforming else 'off'}")
            call = f"SELECT azure_local_ai.create_embeddings('{BUILTIN_URI}', {{}})::text"
            got = conn.execute(call.format(f"'it''s \\\\ {round_}'")).fetchone()
            meant = "it's " + ("\\\\" if conforming else "\\") + f" {round_}"
            assert got == conn.execute(call.format(f"$${meant}$$")).fetchone()
        assert notices == ["notice 0", "notice 1", "notice 2"]


def test_long_statements_results_and_copy_pass_through_the_thread_whole(proxies) -> None:
    proxy, base = proxies["thread"]
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1")
        until(lambda: on_thread(base) >= 1)
        literal = "x" * 300_000  # longer than the thread reads whole: handed back, then over again
        assert conn.execute(f"SELECT length('{literal}')").fetchone() == (300_000,)
        rest_on_thread(conn, base)
        (big,) = conn.execute("SELECT repeat('y', 20000000)").fetchone()
        assert len(big) == 20_000_000 and set(big) == {"y"}
        conn.execute("CREATE TEMP TABLE copied (n int, t text)")
        with conn.cursor() as cur, cur.copy("COPY copied FROM STDIN") as copy:
            for n in range(20000):
                copy.write_row((n, f"row {n} " + "z" * 50))
        assert conn.execute("SELECT count(*), sum(n) FROM copied").fetchone() == (20000, sum(range(20000)))
        with conn.cursor() as cur, cur.copy("COPY copied TO STDOUT") as copy:
            assert sum(1 for _ in copy.rows()) == 20000
        assert conn.execute(EMBED).fetchone() is not None


async def test_prepared_calls_pipelines_and_errors_in_batches_keep_their_counts(proxies) -> None:
    proxy, base = proxies["thread"]
    conn = await asyncpg.connect(proxy.dsn())
    try:
        embed = await conn.prepare(f"SELECT azure_local_ai.create_embeddings('{BUILTIN_URI}', $1)::text")
        plain = await conn.prepare("SELECT $1::int + 1")
        for n in range(3):
            await asyncio.sleep(STAY_AFTER_HAND_BACK + 0.1)
            assert await plain.fetchval(n) == n + 1
            await asyncio.to_thread(until, lambda: on_thread(base) >= 1)
            assert (await embed.fetchval(f"query: {n}")).count(",") == 383
        # A batch with an error in its middle: the server skips to the Sync; the session goes on.
        await conn.execute("CREATE TEMP TABLE batched (n int)")
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.executemany("INSERT INTO batched VALUES (1 / $1)", [(1,), (0,), (2,)])
        assert (await embed.fetchval("query: after the batch")).count(",") == 383
        assert await plain.fetchval(41) == 42
    finally:
        await conn.close()
    with psycopg.connect(proxy.dsn(), autocommit=True) as sync_conn:
        sync_conn.execute("CREATE TEMP TABLE piped (n int)")
        with sync_conn.pipeline():
            cursors = [sync_conn.execute("INSERT INTO piped VALUES (%s) RETURNING n", (n,)) for n in range(50)]
            vector = sync_conn.execute(f"SELECT azure_local_ai.create_embeddings('{BUILTIN_URI}', %s)::text",
                                       ("query: in a pipeline",))
            more = [sync_conn.execute("SELECT %s::int * 2", (n,)) for n in range(50)]
        assert [c.fetchone()[0] for c in cursors] == list(range(50))
        assert vector.fetchone()[0].count(",") == 383
        assert [c.fetchone()[0] for c in more] == [2 * n for n in range(50)]


def test_a_client_that_leaves_while_on_the_thread_ends_its_server_session(proxies, pg: PgCluster) -> None:
    proxy, base = proxies["thread"]
    before = on_thread(base)
    conn = psycopg.connect(proxy.dsn(application_name="leaves-on-thread"), autocommit=True)
    conn.execute("SELECT 1")
    until(lambda: on_thread(base) == before + 1)
    conn.pgconn.finish()  # the socket closes with no Terminate
    until(lambda: on_thread(base) == before)
    with psycopg.connect(pg.dsn(), autocommit=True) as direct:
        until(lambda: direct.execute("SELECT count(*) FROM pg_stat_activity "
                                     "WHERE application_name = 'leaves-on-thread'").fetchone() == (0,))


def test_cancel_and_statement_timeout_reach_a_query_the_thread_relays(proxies) -> None:
    proxy, base = proxies["thread"]
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1")
        until(lambda: on_thread(base) >= 1)
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        timer.join()
        assert conn.execute("SELECT 3").fetchone() == (3,)


def test_idle_sessions_on_the_thread_time_out(pg: PgCluster, model_data_dir: Path) -> None:
    port = free_port()
    proxy = start_proxy(model_data_dir, "--idle-timeout", "1", "--http-listen", f"127.0.0.1:{port}",
                        upstream=pg.url())
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute("SELECT 1")
            assert on_thread(f"http://127.0.0.1:{port}") == 1
            conn.execute("SELECT pg_sleep(1.5)")  # busy is not idle, even on the thread
            time.sleep(2.5)
            with pytest.raises(psycopg.OperationalError, match="idle-session timeout"):
                conn.execute("SELECT 1")
    finally:
        proxy.stop()
