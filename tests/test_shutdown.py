"""Shutdown on SIGTERM or SIGINT, as PostgreSQL and PgBouncer do it: idle sessions end at once (57P01);
sessions in a query or a transaction block get the grace, each ending as soon as it is idle outside a
block; a second signal ends everything; and an embedded server is never left behind."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from proxy import protocol as pg_protocol

from .pgcluster import PgCluster, free_port, proxy_data_dir
from .proxyproc import ProxyProcess, start_proxy
from .rawclient import RawClient
from .test_relay_thread import metric, until

ADMIN_COMMAND = "terminating connection due to administrator command"
#: How long the proxy may take to exit when nothing holds it (the brief's "at once").
PROMPT = 2.0


@pytest.fixture(params=[True, False], ids=["relay thread", "python"])
def relay_thread(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture()
def proxy_factory(pg: PgCluster, tmp_path: Path, relay_thread: bool) -> Iterator[Callable[..., tuple]]:
    """Proxies in front of `pg` with /metrics, with or without the relay thread; killed at the end."""
    started: list[ProxyProcess] = []

    def make(*args: str) -> tuple[ProxyProcess, str]:
        http = free_port()
        running = start_proxy(tmp_path / str(len(started)), "--http-listen", f"127.0.0.1:{http}",
                              "--relay-thread", str(relay_thread).lower(), *args, upstream=pg.url())
        started.append(running)
        return running, f"http://127.0.0.1:{http}"

    yield make
    for running in started:
        running.stop(signal.SIGKILL)


def _settle(base: str, relay_thread: bool, sessions: int) -> None:
    """With the relay thread, wait until the thread has the `sessions` (the shutdown must take them back)."""
    if relay_thread:
        until(lambda: metric(base, "relay_thread_sessions") >= sessions)


def _exits_within(proxy: ProxyProcess, seconds: float) -> float:
    """Wait for the proxy to exit with 0; how long that took."""
    started = time.monotonic()
    assert proxy.proc.wait(seconds + 5) == 0, proxy.log
    took = time.monotonic() - started
    assert took < seconds, (took, proxy.log)
    return took


def _assert_clean_log(proxy: ProxyProcess) -> None:
    assert "Traceback" not in proxy.log, proxy.log
    assert "level=error" not in proxy.log, proxy.log


def _wait_for_log(proxy: ProxyProcess, text: str, timeout: float = 10) -> None:
    until(lambda: text in proxy.log, timeout)


def _fatal_code(client: RawClient) -> str:
    """The SQLSTATE of the FATAL error the proxy sends before it closes the connection."""
    fields = pg_protocol.parse_fields(client.read_until(b"E")[-1][1])
    assert fields["S"] == "FATAL" and fields["M"] == ADMIN_COMMAND, fields
    assert client.closed()
    return fields["C"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_idle_sessions_end_at_once(proxy_factory, relay_thread: bool, sig: int) -> None:
    proxy, base = proxy_factory("--shutdown-grace", "30")
    idle = [RawClient(proxy.port) for _ in range(2)]
    for client in idle:
        client.login()
        _simple_query(client, "select 1")
    _settle(base, relay_thread, len(idle))
    proxy.proc.send_signal(sig)
    for client in idle:
        assert _fatal_code(client) == "57P01"
    _exits_within(proxy, PROMPT)
    _assert_clean_log(proxy)


def test_transaction_block_gets_the_grace(proxy_factory, relay_thread: bool) -> None:
    proxy, base = proxy_factory("--shutdown-grace", "3")
    busy = psycopg.connect(proxy.dsn())
    busy.execute("create temporary table kept (n int)")  # a transaction block is open
    idle = RawClient(proxy.port)
    idle.login()
    _settle(base, relay_thread, 2)
    signalled = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    assert _fatal_code(idle) == "57P01"
    _wait_for_log(proxy, "waiting up to 3 s for 1 session in a query or transaction block")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(), connect_timeout=2)
    busy.execute("insert into kept values (1)")
    assert busy.execute("select count(*) from kept").fetchone() == (1,)
    assert proxy.alive()
    assert proxy.proc.wait(10) == 0
    assert 2.5 < time.monotonic() - signalled < 3 + 2 * PROMPT  # ended at the grace, not by the client
    with pytest.raises(psycopg.OperationalError, match="administrator command"):
        busy.execute("select 1")
    _assert_clean_log(proxy)


def _simple_query(client: RawClient, sql: str) -> list[tuple[bytes, bytes]]:
    """Run `sql` as a simple Query; the messages up to and including its ReadyForQuery."""
    client.send(pg_protocol.message(pg_protocol.QUERY, sql.encode() + b"\0"))
    return client.read_until(b"Z")


def test_commit_ends_the_session_and_the_wait(proxy_factory, relay_thread: bool) -> None:
    """A raw client: a driver's next statement could meet the closed connection before the FATAL error."""
    proxy, base = proxy_factory("--shutdown-grace", "30")
    busy = RawClient(proxy.port)
    busy.login()
    assert _simple_query(busy, "begin")[-1] == (b"Z", b"T")
    _settle(base, relay_thread, 1)
    proxy.proc.send_signal(signal.SIGTERM)
    _wait_for_log(proxy, "waiting up to 30 s for 1 session")
    assert (b"D", b"\x00\x01\x00\x00\x00\x0astill here") in _simple_query(busy, "select 'still here'")
    assert _simple_query(busy, "commit")[-1] == (b"Z", b"I")
    assert _fatal_code(busy) == "57P01"
    _exits_within(proxy, PROMPT)
    _assert_clean_log(proxy)


def test_running_query_finishes_then_ends(proxy_factory) -> None:
    proxy, _ = proxy_factory("--shutdown-grace", "30")
    client = RawClient(proxy.port)
    client.login()
    client.send(pg_protocol.message(pg_protocol.QUERY, b"select 'slept' from pg_sleep(1)\0"))
    time.sleep(0.2)
    proxy.proc.send_signal(signal.SIGTERM)
    answer = client.read_until(b"Z")
    assert (b"D", b"\x00\x01\x00\x00\x00\x05slept") in answer
    assert answer[-1] == (b"Z", b"I")
    assert _fatal_code(client) == "57P01"
    _exits_within(proxy, PROMPT)
    _assert_clean_log(proxy)


def test_connections_in_start_up_end_at_once(proxy_factory) -> None:
    proxy, _ = proxy_factory("--shutdown-grace", "30")
    starting = RawClient(proxy.port)  # no start-up packet yet
    time.sleep(0.2)
    proxy.proc.send_signal(signal.SIGTERM)
    assert _fatal_code(starting) == "57P01"
    _exits_within(proxy, PROMPT)
    _assert_clean_log(proxy)


def test_second_signal_ends_everything(proxy_factory, relay_thread: bool) -> None:
    proxy, base = proxy_factory("--shutdown-grace", "30")
    busy = [psycopg.connect(proxy.dsn()) for _ in range(3)]
    for conn in busy:
        conn.execute("select 1")  # idle in a transaction block
    _settle(base, relay_thread, len(busy))
    proxy.proc.send_signal(signal.SIGTERM)
    _wait_for_log(proxy, "waiting up to 30 s for 3 sessions in a query or transaction block; "
                  "send SIGTERM or SIGINT again to close them now")
    proxy.proc.send_signal(signal.SIGINT)
    _exits_within(proxy, PROMPT)
    for conn in busy:
        with pytest.raises(psycopg.OperationalError, match="administrator command"):
            conn.execute("select 1")
    _assert_clean_log(proxy)


def test_no_grace_ends_sessions_coming_back_from_the_thread(proxy_factory, relay_thread: bool) -> None:
    """With no grace, the sessions in a transaction block end in the same turn of the event loop in which
    the shutdown takes them back from the relay thread: before their transports are made again."""
    proxy, base = proxy_factory("--shutdown-grace", "0")
    busy = [RawClient(proxy.port) for _ in range(4)]
    for client in busy:
        client.login()
        assert _simple_query(client, "begin")[-1] == (b"Z", b"T")
    _settle(base, relay_thread, len(busy))
    proxy.proc.send_signal(signal.SIGTERM)
    for client in busy:
        assert _fatal_code(client) == "57P01"
    _exits_within(proxy, PROMPT)
    _assert_clean_log(proxy)


def _postmasters(pgdata: Path) -> list[psutil.Process]:
    """Running postgres processes started on `pgdata`."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] == "postgres" and str(pgdata) in cmdline:
            found.append(proc)
    return found


def test_restart_after_kill_stops_the_embedded_server(model_data_dir: Path) -> None:
    """A proxy killed with SIGKILL leaves its embedded server running: the next proxy on the data
    directory adopts it, and stops it when it stops."""
    with proxy_data_dir(model_data_dir) as data_dir:
        _restart_after_kill(data_dir)


def _restart_after_kill(data_dir: Path) -> None:
    pgdata = (data_dir / "postgres").resolve()
    try:
        first = start_proxy(data_dir, upstream=None)
        assert first.psql("-At", "-c", "select 1").stdout.strip() == "1"
        first.stop(signal.SIGKILL)
        assert _postmasters(pgdata), "the embedded server outlives a proxy killed with SIGKILL"
        second = start_proxy(data_dir, upstream=None)
        try:
            assert second.psql("-At", "-c", "select 2").stdout.strip() == "2"
        finally:
            assert second.stop() == 0
        until(lambda: not _postmasters(pgdata), timeout=5)
        _assert_clean_log(second)
    finally:
        for leftover in _postmasters(pgdata):  # this test's own server, where the proxy failed to stop it
            leftover.terminate()
