"""Clients that vanish at every point of a session (idle, in a query, in a transaction block, in a
pipeline, in a COPY, waiting for calls the server evaluates, while a look-ahead reads): every session
ends, its server backend with it, with and without the relay thread. Bounded: a few dozen clients."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from .helpers import unique
from .pgcluster import PgCluster
from .proxyproc import ProxyProcess, start_proxy

MODEL = "multilingual-e5-small:v1"
CALL = f"azure_local_ai.create_embeddings('{MODEL}', {{}})"


@pytest.fixture(scope="module", params=[True, False], ids=["relay thread", "python"])
def soaked(request: pytest.FixtureRequest, pg: PgCluster, model_data_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, str]]:
    data_dir = tmp_path_factory.mktemp("soak")
    (data_dir / "models").symlink_to(model_data_dir / "models", target_is_directory=True)
    running = start_proxy(data_dir, "--service-user", "postgres", "--relay-thread", str(request.param).lower(),
                          upstream=pg.url(), preload=True)
    database = unique("soak")
    pg.psql(f"CREATE DATABASE {database}")
    with psycopg.connect(running.dsn(database=database), autocommit=True) as setup:
        setup.execute("CREATE EXTENSION azure_local_ai")
        setup.execute("CREATE TABLE src (id int, body text, v real[])")
        setup.execute("INSERT INTO src SELECT i, 'soak text ' || i FROM generate_series(1, 400) i")
        setup.execute(f"CREATE TABLE gen (id int, body text, v real[] GENERATED ALWAYS AS ({CALL.format('body')}) "
                      "STORED)")
    yield running, database
    running.stop()
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {database} WITH (FORCE)")


def vanish(conn: psycopg.Connection) -> None:
    """Cut the client's connection as a crashed client would: no Terminate, the socket just goes."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.shutdown(socket.SHUT_RDWR)


def _copy(conn: psycopg.Connection) -> None:
    with conn.cursor().copy("COPY gen (id, body) FROM STDIN") as copy:
        for i in range(100_000):
            copy.write_row((i, f"copied soak text {i}"))


def _pipeline(conn: psycopg.Connection) -> None:
    with conn.pipeline():
        for i in range(200):
            conn.execute(f"SELECT {CALL.format('%s')} IS NOT NULL", (f"pipelined {i}",))


BACK_FILL_TEXT = f"body || ' {os.urandom(4).hex()}'"  # texts new to this run: computed, not found cached
WORK: dict[str, Callable[[psycopg.Connection], object]] = {
    "idle": lambda conn: time.sleep(5),
    "in a query": lambda conn: conn.execute("SELECT pg_sleep(5)"),
    "in a transaction block": lambda conn: (conn.execute("BEGIN"), conn.execute("SELECT 1"), time.sleep(5)),
    "in a back-fill": lambda conn: conn.execute(f"UPDATE src SET v = {CALL.format(BACK_FILL_TEXT)}"),
    "in a COPY": _copy,
    "in a pipeline": _pipeline,
    "waiting for a call": lambda conn: conn.execute(
        f"SELECT count({CALL.format('body || random()::text')}) FROM src"),
}


def _run_and_vanish(dsn: str, work: Callable[[psycopg.Connection], object], after: float) -> None:
    conn = psycopg.connect(dsn, autocommit=True)
    worker = threading.Thread(target=lambda: _swallow(work, conn), daemon=True)
    worker.start()
    time.sleep(after)
    vanish(conn)
    worker.join(30)
    conn.close()


def _swallow(work: Callable[[psycopg.Connection], object], conn: psycopg.Connection) -> None:
    with contextlib.suppress(psycopg.Error, OSError):  # the client is gone: its own errors are expected
        work(conn)


def test_every_session_ends_when_its_client_vanishes(soaked: tuple[ProxyProcess, str], pg: PgCluster) -> None:
    proxy, database = soaked
    rng = random.Random(20261207)
    clients = [(name, rng.choice([0.0, 0.01, 0.05, 0.2, 0.5])) for name in WORK for _ in range(4)]
    rng.shuffle(clients)
    threads = [threading.Thread(target=_run_and_vanish, args=(proxy.dsn(database=database), WORK[name], after))
               for name, after in clients]
    for start in range(0, len(threads), 6):  # six clients at a time
        batch = threads[start : start + 6]
        for thread in batch:
            thread.start()
        for thread in batch:
            thread.join(60)
    deadline = time.monotonic() + 20
    while True:
        with psycopg.connect(proxy.dsn(database="azure_local_ai_proxy"), autocommit=True) as admin:
            sessions = [row for row in admin.execute("SHOW SESSIONS").fetchall() if row[2] == database]
        with psycopg.connect(pg.dsn(), autocommit=True) as direct:
            backends = direct.execute(
                "SELECT pid, state, left(query, 60) FROM pg_stat_activity WHERE datname = %s "
                "AND application_name <> 'azure-local-ai-proxy service' AND backend_type = 'client backend'",
                (database,)).fetchall()
        if (not sessions and not backends) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sessions == [], f"sessions left in the proxy: {sessions}"
    assert backends == [], f"server backends left: {backends}"
    log = proxy.log
    assert log.count("event=connect ") == log.count("event=disconnect"), "a session start without its end"
    assert "Traceback" not in log and "session task failed" not in log
    with psycopg.connect(proxy.dsn(database=database), autocommit=True) as after:
        assert after.execute(f"SELECT array_length({CALL.format(repr('still serving'))}, 1)").fetchone() == (384,)
