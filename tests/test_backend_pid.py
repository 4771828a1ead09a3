"""Clients see the server's real backend process id: every driver's notion of it agrees with
pg_backend_pid(), with NOTIFY's sender pid, and a cancel request needs the proxy's secret too."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time

import asyncpg
import psycopg
import psycopg2
import pytest

from proxy import protocol as pg

from .proxyproc import ProxyProcess
from .rawclient import RawClient
from .test_smoke import PSQL_18


def test_psycopg2_backend_pid(proxy: ProxyProcess) -> None:
    conn = psycopg2.connect(proxy.dsn())
    try:
        cur = conn.cursor()
        cur.execute("SELECT pg_backend_pid()")
        assert conn.get_backend_pid() == cur.fetchone()[0]
    finally:
        conn.close()


def test_psycopg_backend_pid_and_notify_sender(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as listener, \
            psycopg.connect(proxy.dsn(), autocommit=True) as sender:
        assert listener.info.backend_pid == listener.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        listener.execute("LISTEN alp_pid_channel")
        sender.execute("NOTIFY alp_pid_channel, 'from the other one'")
        listener.execute("NOTIFY alp_pid_channel, 'from myself'")
        received = {n.payload: n.pid for n in listener.notifies(timeout=5, stop_after=2)}
        assert received == {"from the other one": sender.info.backend_pid, "from myself": listener.info.backend_pid}


async def test_asyncpg_server_pid(proxy: ProxyProcess) -> None:
    conn = await asyncpg.connect(proxy.dsn())
    try:
        assert conn.get_server_pid() == await conn.fetchval("SELECT pg_backend_pid()")
    finally:
        await conn.close()


def test_a_cancel_needs_the_proxys_secret(proxy: ProxyProcess) -> None:
    """The real pid with a wrong secret cancels nothing; the driver's own cancel (right secret) does."""
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        pid = conn.info.backend_pid

        def wrong_cancel() -> None:
            time.sleep(0.5)
            canceller = RawClient(proxy.port)
            canceller.send(pg.cancel_request(pid, os.urandom(4)))
            canceller.closed()

        thread = threading.Thread(target=wrong_cancel)
        thread.start()
        assert conn.execute("SELECT pg_sleep(1.5), 'not cancelled'").fetchone()[1] == "not cancelled"  # type: ignore[index]
        thread.join()
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(10)")
        timer.join()


def test_a_session_refused_at_start_up_logs_its_end(proxy: ProxyProcess) -> None:
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(database="no_such_database_here"))
    (session,) = re.findall(r"session=(\w+) event=connect .*database=no_such_database_here", proxy.log)
    deadline = time.monotonic() + 5
    while not (ends := [line for line in proxy.log.splitlines() if f"session={session} event=refused" in line]):
        assert time.monotonic() < deadline, proxy.log[-2000:]
        time.sleep(0.05)
    assert "sqlstate=3D000" in ends[0] and "by=server" in ends[0]


@pytest.mark.parametrize("protocol", ["3.0", "3.2"])
def test_psql_backend_pid(proxy: ProxyProcess, protocol: str) -> None:
    """libpq 18's \\conninfo shows PQbackendPID; with protocol 3.2 the cancel secret is longer."""
    out = subprocess.run(
        [PSQL_18, "-X", "-At", proxy.dsn(max_protocol_version=protocol), "-c", "\\conninfo",
         "-c", "SELECT 'pid=' || pg_backend_pid()"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    reported = re.search(r"Backend PID\|(\d+)", out.stdout)
    assert reported and f"pid={reported.group(1)}" in out.stdout
