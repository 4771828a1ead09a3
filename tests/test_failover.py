"""Two proxies behind HAProxy (TCP, /healthz checks), one catalog in the server: one proxy is stopped
while 8 clients insert into a generated column and search. Its sessions end cleanly (57P01, or the
connection closed), new sessions land on the other, and no committed row is lost or left without its
embedding."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from .haproxy import start_haproxy
from .helpers import new_database, unique
from .pgcluster import PgCluster, free_port, proxy_data_dir
from .proxyproc import start_proxy
from .test_extension import CALL, constant_path

RUN_S = 8.0
STOP_AFTER_S = 3.0


@pytest.fixture
def database(pg: PgCluster) -> Iterator[str]:
    with new_database(pg, "failover", "vector") as name:
        yield name


def test_a_proxy_stopped_behind_haproxy_loses_no_committed_row(pg: PgCluster, model_data_dir: Path,
                                                               database: str) -> None:
    login = unique("svc")
    pg.psql(f"CREATE ROLE {login} LOGIN; GRANT pg_read_all_data TO {login}; GRANT CREATE ON DATABASE {database} "
            f"TO {login}")
    with proxy_data_dir(model_data_dir) as first_dir, proxy_data_dir(model_data_dir) as second_dir:
        http_ports = [free_port(), free_port()]
        # One catalog in the server (in this test's database), as replicas behind a balancer share.
        proxies = [start_proxy(directory, "--service-user", login, "--http-listen", f"127.0.0.1:{http}",
                               "--shutdown-grace", "1", "--catalog", "server", "--admin-auth-database", database,
                               upstream=pg.url(), preload=True)
                   for directory, http in zip((first_dir, second_dir), http_ports, strict=True)]
        balancer = None
        try:
            for proxy in proxies:
                proxy.wait_for_model()
            balancer = start_haproxy([(p.port, h) for p, h in zip(proxies, http_ports, strict=True)])
            _run(balancer.dsn(database), proxies[0])
        finally:
            if balancer is not None:
                balancer.stop()
            for proxy in proxies:
                proxy.stop()


def _run(dsn: str, victim) -> None:  # type: ignore[no-untyped-def]
    with psycopg.connect(dsn, autocommit=True) as setup:
        setup.execute("CREATE EXTENSION azure_local_ai")
        setup.execute(f"CREATE TABLE docs (id int PRIMARY KEY, body text, "
                      f"v real[] GENERATED ALWAYS AS ({CALL.format('body')}) STORED)")
    committed: list[int] = []
    ended: list[str] = []
    unexpected: list[BaseException] = []
    deadline = time.monotonic() + RUN_S

    def client(n: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
                    while time.monotonic() < deadline:
                        row = n * 100_000 + i
                        i += 1
                        conn.execute("INSERT INTO docs (id, body) VALUES (%s, %s)", (row, f"client {n} row {row}"))
                        committed.append(row)
                        conn.execute(f"SELECT id FROM docs ORDER BY v::vector <-> {CALL.format('%s')}::vector "
                                     "LIMIT 1", (f"client {n}",)).fetchone()
            except psycopg.OperationalError as exc:  # its proxy went away: a clean end, then a new session
                ended.append(getattr(exc, "sqlstate", None) or "closed")
                time.sleep(0.1)
            except BaseException as exc:  # reported below
                unexpected.append(exc)
                return

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(STOP_AFTER_S)
    victim.stop(signal.SIGTERM)
    for thread in threads:
        thread.join(RUN_S + 60)
    assert not unexpected, unexpected
    assert ended, "no session was on the stopped proxy"
    assert set(ended) <= {"57P01", "08006", "closed"}, ended
    with psycopg.connect(dsn, autocommit=True) as conn:
        stored = dict(conn.execute("SELECT id, v IS NOT NULL FROM docs").fetchall())
        assert set(committed) <= set(stored), sorted(set(committed) - set(stored))[:10]
        assert all(stored.values())
        late = conn.execute("SELECT count(*) FROM docs").fetchone()[0]
        assert late >= len(committed) > 16
        for body, vector in conn.execute("SELECT body, v::text FROM docs ORDER BY id DESC LIMIT 4").fetchall():
            assert vector == constant_path(conn, body), body
