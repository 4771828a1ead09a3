"""The proxy with a real PgBouncer: in front of it, in session and in transaction mode (client → proxy
→ PgBouncer → server), and behind it in transaction mode (client → PgBouncer → proxy → server). In each:
the first psql session of docs/getting-started.md gives the same output, and the calls the server
evaluates are answered correctly and in batches (a back-fill and a COPY are computed ahead, not asked row by row)."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from .helpers import new_database, unique
from .pgbouncer import PgBouncer, start_pgbouncer
from .pgcluster import PgCluster, free_port, proxy_data_dir
from .proxyproc import PSQL, ProxyProcess, start_proxy
from .test_extension import CALL, answered, constant_path
from .transcripts import assert_same_session, first_session, run_session

GENERATED = f"v real[] GENERATED ALWAYS AS ({CALL.format('body')}) STORED"


@dataclass
class Topology:
    name: str
    proxy: ProxyProcess
    bouncer: PgBouncer
    entry: str  # where clients connect: "proxy" or "bouncer"

    def dsn(self, database: str) -> str:
        return self.proxy.dsn(database=database) if self.entry == "proxy" else self.bouncer.dsn(database=database)


def connect(dsn: str) -> psycopg.Connection:
    """A client as a transaction pooler wants it: no prepared statement of its own (PgBouncer 1.18 does
    not carry them from one server connection to the next)."""
    return psycopg.connect(dsn, autocommit=True, prepare_threshold=None)


@pytest.fixture(scope="module")
def service_login(pg: PgCluster) -> str:
    """The service login the docs ask for: no superuser, reads every table."""
    login = unique("svc")
    pg.psql(f"CREATE ROLE {login} LOGIN; GRANT pg_read_all_data TO {login}")
    return login


@pytest.fixture(scope="module", params=["proxy-session", "proxy-transaction", "bouncer-transaction"])
def topology(request: pytest.FixtureRequest, pg: PgCluster, model_data_dir: Path,
             service_login: str) -> Iterator[Topology]:
    entry, mode = request.param.split("-")
    with proxy_data_dir(model_data_dir) as data_dir:
        if entry == "proxy":
            bouncer = start_pgbouncer(pg.port, mode, users=("postgres", service_login))
            # In session mode the service connections go through the pooler too (its defaults); in
            # transaction mode they must not: they hold advisory locks from one transaction to the next.
            bypass = ["--service-upstream", pg.url()] if mode == "transaction" else []
            proxy = start_proxy(data_dir, "--service-user", service_login, *bypass, upstream=bouncer.url(),
                                preload=True)
        else:
            proxy = start_proxy(data_dir, "--service-user", service_login, upstream=pg.url(), preload=True)
            bouncer = start_pgbouncer(proxy.port, mode)
        try:
            proxy.wait_for_model()
            yield Topology(request.param, proxy, bouncer, entry)
        finally:
            proxy.stop()
            bouncer.stop()


@pytest.fixture
def database(pg: PgCluster) -> Iterator[str]:
    with new_database(pg, "topo") as name:
        yield name


def test_the_docs_first_session_gives_the_same_output(topology: Topology, database: str) -> None:
    admin = topology.proxy.dsn(database=database)
    with psycopg.connect(admin, autocommit=True) as conn:  # what the session shows first
        conn.execute("SELECT azure_local_ai.set_setting('intra_op_parallelism', '2'), "
                     "azure_local_ai.set_setting('spin_control', 'true')")
    session = first_session()
    done = run_session(PSQL, topology.dsn(database), session)
    assert_same_session(done, session)


def test_back_fill_copy_one_row_insert_and_trigger(topology: Topology, database: str) -> None:
    """A 1,000-row back-fill and a 1,000-row COPY into a generated column are computed ahead (SHOW STATS
    counts them kept ahead, not asked row by row); a one-row INSERT and a trigger get their answers;
    every vector is the one a constant call gets."""
    with connect(topology.dsn(database)) as conn:
        conn.execute("CREATE EXTENSION azure_local_ai")
        conn.execute("CREATE TABLE docs (id int, body text, v real[])")
        conn.execute("INSERT INTO docs SELECT i, 'pooled back-fill ' || i FROM generate_series(1, 1000) i")
        before = answered(topology.proxy)
        assert conn.execute(f"UPDATE docs SET v = {CALL.format('body')}").rowcount == 1000
        asked, ahead = (b - a for a, b in zip(before, answered(topology.proxy), strict=True))
        assert ahead >= 800 and asked <= 200, (asked, ahead)  # the first rows ask, before the first batch is in

        conn.execute(f"CREATE TABLE copied (id int, body text, {GENERATED})")
        conn.execute("INSERT INTO copied (id, body) VALUES (0, 'the table is learnt')")  # its first asks
        before = answered(topology.proxy)
        data = "".join(f"{i}\tpooled copy {i}\n" for i in range(1, 1001))
        with conn.cursor().copy("COPY copied (id, body) FROM STDIN") as copy:
            copy.write(data)
        asked, ahead = (b - a for a, b in zip(before, answered(topology.proxy), strict=True))
        assert ahead >= 800 and asked <= 200, (asked, ahead)  # the first rows ask, before the first batch is in

        conn.execute("INSERT INTO copied (id, body) VALUES (2000, 'one pooled row')")
        conn.execute("CREATE TABLE notes (id int, body text, v real[])")
        conn.execute(f"""CREATE FUNCTION embed_note() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN NEW.v := {CALL.format('NEW.body')}; RETURN NEW; END $$""")
        conn.execute("CREATE TRIGGER embed BEFORE INSERT ON notes FOR EACH ROW EXECUTE FUNCTION embed_note()")
        conn.execute("INSERT INTO notes VALUES (1, 'a pooled trigger'), (2, 'another pooled trigger')")
        checked = [*conn.execute("SELECT body, v::text FROM docs WHERE id % 100 = 7").fetchall(),
                   *conn.execute("SELECT body, v::text FROM copied WHERE id % 100 = 3 OR id = 2000").fetchall(),
                   *conn.execute("SELECT body, v::text FROM notes").fetchall()]
        assert len(checked) == 10 + 11 + 2
        for body, stored in checked:
            assert stored == constant_path(conn, body), body


def test_many_clients_at_once(topology: Topology, database: str) -> None:
    """8 clients insert into a generated column and search, at once: every row gets its own text's vector."""
    with connect(topology.dsn(database)) as conn:
        conn.execute("CREATE EXTENSION vector")
        conn.execute("CREATE EXTENSION azure_local_ai")
        conn.execute(f"CREATE TABLE docs (id int, body text, {GENERATED})")
    failures: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with connect(topology.dsn(database)) as session:
                for i in range(10):
                    session.execute("INSERT INTO docs (id, body) VALUES (%s, %s)", (n * 100 + i, f"client {n} row {i}"))
                    session.execute(f"SELECT id FROM docs ORDER BY v::vector <-> {CALL.format('%s')}::vector LIMIT 1",
                                    (f"client {n} row {i}",)).fetchone()
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    with connect(topology.dsn(database)) as conn:
        rows = conn.execute("SELECT body, v::text FROM docs WHERE id % 10 IN (0, 9)").fetchall()
        assert len(rows) == 16 and conn.execute("SELECT count(*) FROM docs").fetchone() == (80,)
        for body, stored in rows:
            assert stored == constant_path(conn, body), body


def test_two_clients_taking_turns_on_one_server_backend(pg: PgCluster, model_data_dir: Path, service_login: str,
                                                         database: str) -> None:
    """Transaction pooling with one server connection: two clients' transactions run in turn on the same
    backend. Each transaction's mailbox is its own: nothing of one is left for the other (its setting
    is gone when the transaction ends), and every row gets its own client's text's vector."""
    bouncer = start_pgbouncer(pg.port, "transaction", pool_size=1, users=("postgres", service_login))
    try:
        with proxy_data_dir(model_data_dir) as data_dir:
            proxy = start_proxy(data_dir, "--service-user", service_login, "--service-upstream", pg.url(),
                                upstream=bouncer.url(), preload=True)
            try:
                _take_turns(proxy, database)
            finally:
                proxy.stop()
    finally:
        bouncer.stop()


def _take_turns(proxy: ProxyProcess, database: str) -> None:
    with connect(proxy.dsn(database=database)) as setup:
        setup.execute("CREATE EXTENSION vector")
        setup.execute("CREATE EXTENSION azure_local_ai")
        setup.execute(f"CREATE TABLE docs (id int, who text, body text, {GENERATED})")
    clients = {who: connect(proxy.dsn(database=database)) for who in ("alice", "bob")}
    try:
        backends: set[int] = set()
        for turn in range(6):
            for who, conn in clients.items():
                with conn.transaction():
                    left = conn.execute("SELECT current_setting('azure_local_ai.proxy_session', true)").fetchone()[0]
                    assert not left, f"{who} found another transaction's mailbox: {left}"
                    backends.add(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
                    conn.execute("INSERT INTO docs (id, who, body) VALUES (%s, %s, %s)",
                                 (turn * 10, who, f"{who} alone {turn}"))
                    conn.execute("INSERT INTO docs (id, who, body) SELECT %s + i, %s, %s || i "
                                 "FROM generate_series(1, 3) i", (turn * 10, who, f"{who} in turn {turn} "))
        assert len(backends) == 1  # one server backend served both
        for who, conn in clients.items():
            for body, stored in conn.execute("SELECT body, v::text FROM docs").fetchall():
                assert stored == constant_path(conn, body), body
            assert conn.execute("SELECT count(*) FROM docs WHERE who = %s", (who,)).fetchone() == (24,)
    finally:
        for conn in clients.values():
            conn.close()


def test_service_connections_through_a_transaction_pooler_are_found_out(
        pg: PgCluster, model_data_dir: Path, service_login: str, database: str) -> None:
    """Without service_upstream in front of a pooler in transaction mode, the service connections' server
    backend changes between their transactions (here PgBouncer keeps two and takes them in turn): the
    proxy finds it out (its prepared statement gone, or another backend's pid), and the calls the server
    evaluates fail with what to set (08001), as /healthz and the log say, rather than leave advisory
    locks on backends that serve other clients."""
    bouncer = start_pgbouncer(pg.port, "transaction", users=("postgres", service_login),
                              settings={"min_pool_size": "2", "server_round_robin": "1"})
    http_port = free_port()
    try:
        with proxy_data_dir(model_data_dir) as data_dir:
            proxy = start_proxy(data_dir, "--service-user", service_login, "--http-listen", f"127.0.0.1:{http_port}",
                                upstream=bouncer.url(), preload=True)
            try:
                with connect(proxy.dsn(database=database)) as conn:
                    conn.execute("CREATE EXTENSION azure_local_ai")
                    conn.execute("CREATE TABLE docs (id int, body text)")
                    conn.execute("INSERT INTO docs SELECT i, 'pooled service ' || i FROM generate_series(1, 6) i")
                    # The service login's pool gets its second server connection a moment after its first.
                    conn.execute(f"SELECT {CALL.format('body')} FROM docs WHERE id = 1 AND random() >= 0")
                    time.sleep(3)
                    # Each row asks (random() is not read ahead).
                    with pytest.raises(psycopg.errors.SqlclientUnableToEstablishSqlconnection) as failed:
                        conn.execute(f"SELECT {CALL.format('body')} FROM docs WHERE random() >= 0").fetchall()
                    assert "set service_upstream to the server itself" in str(failed.value)
                assert "event=service_pooled" in proxy.log
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz") as response:
                    pytest.fail(f"healthy: {response.read()!r}")
            except urllib.error.HTTPError as unhealthy:
                assert unhealthy.code == 503 and b"set service_upstream" in unhealthy.read()
            finally:
                proxy.stop()
    finally:
        bouncer.stop()
