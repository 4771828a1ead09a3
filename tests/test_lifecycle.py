"""The upstream coming and going, time-outs, and shutdown on SIGTERM."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from proxy import protocol as pg_protocol

from .pgcluster import PgCluster, free_port, start_cluster
from .proxyproc import ProxyProcess, start_proxy
from .rawclient import RawClient, startup_packet


@pytest.fixture()
def own_pg() -> Iterator[PgCluster]:
    """A server of this test's own, which it may stop."""
    cluster = start_cluster()
    yield cluster
    cluster.destroy()


def fatal(err: psycopg.Error) -> str | None:
    return err.sqlstate or (err.diag.sqlstate if err.diag else None)


def test_upstream_down_at_connect(tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path, upstream=f"postgresql://127.0.0.1:{free_port()}/x?sslmode=disable")
    try:
        client = RawClient(proxy.port)
        client.send(startup_packet())
        msg = client.read_until(b"E")[-1]
        fields = pg_protocol.parse_fields(msg[1])
        assert fields["C"] == "08001"
        assert "could not connect to the upstream server" in fields["M"]
        assert client.closed()
        assert proxy.alive()
    finally:
        proxy.stop()


def test_upstream_that_never_answers_times_out(tmp_path: Path) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)  # accepts into the backlog, never answers
    port = silent.getsockname()[1]
    proxy = start_proxy(tmp_path, "--connect-timeout", "0.5", upstream=f"postgresql://127.0.0.1:{port}/x")
    try:
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="timeout expired"):
            psycopg.connect(proxy.dsn(), connect_timeout=10)
        assert time.monotonic() - started < 5
        assert proxy.alive()
    finally:
        proxy.stop()
        silent.close()


def test_upstream_stopped_mid_session(own_pg: PgCluster, tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path, upstream=own_pg.url())
    try:
        conn = psycopg.connect(proxy.dsn(), autocommit=True)
        assert conn.execute("select 1").fetchone() == (1,)
        own_pg.stop("fast")
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select 1")
        assert fatal(info.value) in ("57P01", "08006", None)
        assert conn.closed or conn.broken
        with pytest.raises(psycopg.OperationalError, match="could not connect to the upstream server"):
            psycopg.connect(proxy.dsn())
        own_pg.start()
        with psycopg.connect(proxy.dsn()) as again:
            assert again.execute("select 2").fetchone() == (2,)
        assert proxy.alive()
    finally:
        proxy.stop()


def test_upstream_killed_mid_session_gives_08006(own_pg: PgCluster, tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path, upstream=own_pg.url())
    try:
        client = RawClient(proxy.port)
        client.login()
        own_pg.stop("immediate")
        client.send(pg_protocol.message(pg_protocol.QUERY, b"select 1\0"))
        codes = [pg_protocol.parse_fields(b)["C"] for t, b in client.read_until(b"E") if t == b"E"]
        assert codes[-1] in ("08006", "57P01")
        assert client.closed()
    finally:
        proxy.stop()


def test_startup_timeout(proxy_factory) -> None:
    proxy = proxy_factory("--startup-timeout", "0.5")
    client = RawClient(proxy.port)
    started = time.monotonic()
    assert client.error_code() == "08P01"
    assert client.closed()
    assert time.monotonic() - started < 5


def test_idle_timeout_spares_running_queries(proxy_factory) -> None:
    proxy = proxy_factory("--idle-timeout", "1")
    idle = psycopg.connect(proxy.dsn(), autocommit=True)
    busy = psycopg.connect(proxy.dsn(), autocommit=True)
    busy.execute("select pg_sleep(2)")  # quiet on the wire for longer than the timeout, but not idle
    time.sleep(0.5)
    with pytest.raises(psycopg.OperationalError, match="idle-session timeout"):
        idle.execute("select 1")
    assert busy.execute("select 1").fetchone() == (1,)


def test_sigterm_lets_sessions_finish_then_closes(proxy_factory) -> None:
    """A session in a transaction block gets the grace (an idle one would end at once: test_shutdown.py)."""
    proxy = proxy_factory("--shutdown-grace", "2")
    conn = psycopg.connect(proxy.dsn())
    conn.execute("select 1")  # opens the transaction block
    proxy.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(), connect_timeout=2)
    assert conn.execute("select 'still here'").fetchone() == ("still here",)
    time.sleep(2.5)
    with pytest.raises(psycopg.OperationalError, match="administrator command"):
        conn.execute("select 1")
    assert proxy.proc.wait(10) == 0


def test_sigterm_without_sessions_exits_at_once(proxy_factory) -> None:
    proxy = proxy_factory("--shutdown-grace", "30")
    started = time.monotonic()
    assert proxy.stop() == 0
    assert time.monotonic() - started < 5


def test_session_ending_within_grace_lets_proxy_exit_early(proxy_factory) -> None:
    proxy = proxy_factory("--shutdown-grace", "30")
    conn = psycopg.connect(proxy.dsn(), autocommit=True)
    proxy.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    conn.close()
    assert proxy.proc.wait(5) == 0


@pytest.fixture()
def proxy_factory(pg: PgCluster, tmp_path: Path) -> Iterator:
    started: list[ProxyProcess] = []

    def make(*args: str) -> ProxyProcess:
        running = start_proxy(tmp_path / str(len(started)), *args, upstream=pg.url())
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop(signal.SIGKILL)
