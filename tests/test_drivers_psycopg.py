"""psycopg 3 (server-side binding, binary format, pipeline mode, COPY, notifies, cancel, async) through
the proxy."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from psycopg import errors, pq
from psycopg.types.json import Jsonb

from .conftest import SCRAM_PASSWORD
from .helpers import direct, direct_copy_out, scratch_table, session_activity, unique
from .pgcluster import PgCluster
from .proxyproc import ProxyProcess


@pytest.fixture
def conn(proxy: ProxyProcess) -> Iterator[psycopg.Connection]:
    connection = psycopg.connect(proxy.dsn(), autocommit=True)
    yield connection
    connection.close()


def test_tls_and_scram(proxy: ProxyProcess, tls_files: dict[str, Path]) -> None:
    """libpq over verified TLS to the proxy, SCRAM relayed; channel binding is not offered (see DESIGN)."""
    dsn = proxy.dsn("scram_user", SCRAM_PASSWORD, sslmode="verify-full", sslrootcert=str(tls_files["ca"]))
    with psycopg.connect(dsn) as connection:
        assert connection.pgconn.ssl_in_use
        assert connection.execute("SELECT current_user").fetchone() == ("scram_user",)
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(dsn + "&channel_binding=require")


# --------------------------------------------------------------------------- parameters

def test_server_side_binding(conn: psycopg.Connection) -> None:
    """Parameters travel in Bind messages ($1, $2 ...), typed by the client."""
    cur = conn.cursor()
    cur.execute("SELECT %s + %s, %s || %s, pg_typeof(%s)::text, %s::numeric * 2",
                (40, 2, "a'b", "\\c", 7, Decimal("1.25")))
    assert cur.fetchone() == (42, "a'b\\c", "smallint", Decimal("2.50"))
    assert cur._query is not None and b"$1" in cur._query.query  # bound server-side, not interpolated
    cur.execute("SELECT %(x)s::text, %(x)s::text = %(y)s", {"x": "same", "y": "same"})
    assert cur.fetchone() == ("same", True)


def test_prepared_statements_reused(proxy: ProxyProcess) -> None:
    """prepare_threshold=0: every query becomes a named server-side statement, reused."""
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as connection:
        for i in range(300):
            assert connection.execute("SELECT %s::int * 3", [i]).fetchone() == (i * 3,)
        names = connection.execute(
            "SELECT name, statement FROM pg_prepared_statements WHERE statement LIKE %s", ["%* 3%"]
        ).fetchall()
        assert len(names) == 1 and names[0][0].startswith("_pg3_")


def test_executemany_and_returning(conn: psycopg.Connection, pg: PgCluster) -> None:
    with scratch_table(pg, "i int, t text") as name:
        cur = conn.cursor()
        cur.executemany(f"INSERT INTO {name} VALUES (%s, %s) RETURNING i * 10", [(i, f"t{i}") for i in range(300)],
                        returning=True)
        results = []
        while True:
            results.append(cur.fetchone()[0])  # type: ignore[index]
            if not cur.nextset():
                break
        assert results == [i * 10 for i in range(300)]
        with direct(pg) as check:
            assert check.execute(f"SELECT count(*), sum(i) FROM {name}").fetchone() == (300, sum(range(300)))


def test_errors_keep_session(conn: psycopg.Connection) -> None:
    with pytest.raises(errors.DivisionByZero) as info:
        conn.execute("SELECT 1 / %s", [0])
    assert info.value.sqlstate == "22012"
    with pytest.raises(errors.UndefinedColumn):
        conn.execute("SELECT no_such_column FROM pg_class")
    assert conn.execute("SELECT 'ok'").fetchone() == ("ok",)


# --------------------------------------------------------------------------- binary

VALUES_SQL = """
SELECT n, n::int8 * 3000000000, (n / 3.0)::numeric(20, 10), n / 7.0::float8, md5(n::text),
       decode(md5(n::text), 'hex'), timestamptz '2000-01-01 00:00:00+00' + n * interval '1 day 1 us',
       md5(n::text)::uuid, jsonb_build_object('n', n, 'l', array[n]), array[n, NULL], n % 2 = 0,
       ('[' || n || ',0.5]')::vector::text
FROM generate_series(1, 300) n ORDER BY n
"""


def test_binary_results_match_text(conn: psycopg.Connection, pg: PgCluster) -> None:
    """Binary results through the proxy equal text results taken directly from the server."""
    cur = conn.cursor(binary=True)
    cur.execute(VALUES_SQL)
    assert cur.pgresult is not None
    assert {cur.pgresult.fformat(i) for i in range(cur.pgresult.nfields)} == {pq.Format.BINARY}
    binary_rows = cur.fetchall()
    with direct(pg) as ref:
        text_rows = ref.execute(VALUES_SQL).fetchall()
    assert len(binary_rows) == 300
    assert binary_rows == text_rows


def test_binary_parameters_round_trip(conn: psycopg.Connection) -> None:
    """Binary parameters and binary results: values come back as sent."""
    values = [
        2**62, Decimal("-98765432109876543210.0123456789"), "ünï ✓\n\t", bytes(range(256)) * 100,
        dt.datetime(2020, 2, 29, 12, 34, 56, 789, tzinfo=dt.UTC), uuid.uuid4(), [1, 2, None], ["x", None],
        dt.date(1900, 3, 1), 3.5, True, None,
    ]
    placeholders = ", ".join(["%b"] * len(values))
    got = conn.execute(f"SELECT {placeholders}", values, binary=True).fetchone()
    assert list(got) == values  # type: ignore[arg-type]
    doc = {"k": [1, "two", None], "ü": {"nested": True}}
    assert conn.execute("SELECT %b::jsonb", [Jsonb(doc)], binary=True).fetchone() == (doc,)


# --------------------------------------------------------------------------- pipeline

def test_pipeline_many_statements(conn: psycopg.Connection, pg: PgCluster) -> None:
    """Many statements sent before any result is read; every result checked."""
    with scratch_table(pg, "i int PRIMARY KEY, t text") as name:
        with conn.pipeline():
            cursors = []
            for i in range(200):
                conn.execute(f"INSERT INTO {name} VALUES (%s, %s)", (i, f"v{i}"))
                cursors.append(conn.execute("SELECT %s::int * %s::int", (i, i)))
            count = conn.execute(f"SELECT count(*) FROM {name}")
        assert [c.fetchone() for c in cursors] == [(i * i,) for i in range(200)]
        assert count.fetchone() == (200,)


def pipeline_with_error(connection: psycopg.Connection, name: str) -> list[int]:
    """Insert 1 (sync), then 2, a duplicate 1 and 3 (sync), then read the table (sync)."""
    with connection.pipeline() as p:
        connection.execute(f"INSERT INTO {name} VALUES (1)")
        p.sync()
        with pytest.raises(errors.UniqueViolation):
            connection.execute(f"INSERT INTO {name} VALUES (2)")
            connection.execute(f"INSERT INTO {name} VALUES (1)")
            connection.execute(f"INSERT INTO {name} VALUES (3)")
            p.sync()
        after = connection.execute(f"SELECT array_agg(i ORDER BY i) FROM {name}")
        p.sync()
        return after.fetchone()[0]  # type: ignore[index]


def test_pipeline_error_and_recovery(conn: psycopg.Connection, pg: PgCluster) -> None:
    """An erroring statement in a pipeline: the statements up to the next Sync form one implicit
    transaction, so the insert of 2 is undone with it and 3 is never run; the pipeline and the
    connection recover. Same outcome as on a direct connection."""
    with scratch_table(pg, "i int PRIMARY KEY") as name:
        assert pipeline_with_error(conn, name) == [1]
        with direct(pg) as check:
            assert [r[0] for r in check.execute(f"SELECT i FROM {name} ORDER BY i")] == [1]
        assert conn.execute("SELECT 'recovered'").fetchone() == ("recovered",)
        assert conn.info.transaction_status == pq.TransactionStatus.IDLE
    with scratch_table(pg, "i int PRIMARY KEY") as name, direct(pg) as ref:
        assert pipeline_with_error(ref, name) == [1]


def test_pipeline_in_transaction_rolls_back(proxy: ProxyProcess, pg: PgCluster) -> None:
    """A pipeline inside a transaction: the error aborts the transaction, nothing is kept."""
    with scratch_table(pg, "i int PRIMARY KEY") as name, psycopg.connect(proxy.dsn()) as connection:
        with pytest.raises(errors.UniqueViolation), connection.transaction(), connection.pipeline():
            for i in range(50):
                connection.execute(f"INSERT INTO {name} VALUES (%s)", [i])
            connection.execute(f"INSERT INTO {name} VALUES (0)")
        assert connection.info.transaction_status == pq.TransactionStatus.IDLE
        with direct(pg) as check:
            assert check.execute(f"SELECT count(*) FROM {name}").fetchone() == (0,)


# --------------------------------------------------------------------------- COPY

def test_copy_write_and_read(conn: psycopg.Connection, pg: PgCluster) -> None:
    """copy.write of bytes built here; copy.read gives the same bytes back, as a direct COPY does."""
    data = b"".join(f"{i}\tline {i} \\\\ \\t ✓\t\\\\x{(i % 256):02x}ff\n".encode() for i in range(30000))
    with scratch_table(pg, "i int, t text, b bytea") as name:
        cur = conn.cursor()
        with cur.copy(f"COPY {name} FROM STDIN") as copy:
            for start in range(0, len(data), 65536):
                copy.write(data[start:start + 65536])
        assert cur.rowcount == 30000
        with direct(pg) as check:
            assert check.execute(f"SELECT count(*), sum(i), min(t) FROM {name} WHERE b = decode(lpad(to_hex(i % 256), "
                                 "2, '0') || 'ff', 'hex')").fetchone() == (30000, sum(range(30000)), "line 0 \\ \t ✓")
        out = bytearray()
        with cur.copy(f"COPY (SELECT * FROM {name} ORDER BY i) TO STDOUT") as copy:
            while chunk := copy.read():
                out += chunk
        assert bytes(out) == data
        assert bytes(out) == direct_copy_out(pg, f"COPY (SELECT * FROM {name} ORDER BY i) TO STDOUT")


def test_copy_rows_binary(conn: psycopg.Connection, pg: PgCluster) -> None:
    """Binary COPY with write_row/rows, types set explicitly."""
    rows = [(i, f"t{i}", Decimal(i) / 8, bytes([i % 256]) * 3) for i in range(2000)]
    with scratch_table(pg, "i int, t text, n numeric, b bytea") as name:
        cur = conn.cursor()
        with cur.copy(f"COPY {name} FROM STDIN (FORMAT binary)") as copy:
            copy.set_types(["int4", "text", "numeric", "bytea"])
            for row in rows:
                copy.write_row(row)
        with cur.copy(f"COPY (SELECT * FROM {name} ORDER BY i) TO STDOUT (FORMAT binary)") as copy:
            copy.set_types(["int4", "text", "numeric", "bytea"])
            assert list(copy.rows()) == rows


def test_copy_error_from_client(conn: psycopg.Connection, pg: PgCluster) -> None:
    """An exception inside the copy block sends CopyFail; the server aborts; nothing is kept."""
    with scratch_table(pg, "i int") as name:
        with pytest.raises(RuntimeError, match="client gave up"), \
                conn.cursor().copy(f"COPY {name} FROM STDIN") as copy:
            copy.write(b"1\n2\n")
            raise RuntimeError("client gave up")  # psycopg sends CopyFail, then re-raises this
        assert conn.execute(f"SELECT count(*) FROM {name}").fetchone() == (0,)
        assert conn.info.transaction_status == pq.TransactionStatus.IDLE


# --------------------------------------------------------------------------- notifies

def test_notifies(proxy: ProxyProcess, conn: psycopg.Connection) -> None:
    channel = unique("chan")
    with psycopg.connect(proxy.dsn(), autocommit=True) as listener:
        listener.execute(f"LISTEN {channel}")
        sender_pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        payloads = [f"message {i}" for i in range(5)]
        for payload in payloads:
            conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        got = list(listener.notifies(timeout=10, stop_after=len(payloads)))
        assert [(n.channel, n.payload, n.pid) for n in got] == [(channel, p, sender_pid) for p in payloads]


# --------------------------------------------------------------------------- cancel

@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_cancel_from_another_thread(proxy: ProxyProcess, pg: PgCluster, method: str) -> None:
    """conn.cancel() (a legacy CancelRequest) or cancel_safe() (libpq's cancel API) from a thread
    ends pg_sleep(30) with QueryCanceled 57014; the connection goes on."""
    app = unique("cancel")
    with psycopg.connect(proxy.dsn(application_name=app), autocommit=True) as connection:
        timer = threading.Timer(0.5, getattr(connection, method))
        start = time.monotonic()
        timer.start()
        try:
            with pytest.raises(errors.QueryCanceled) as info:
                connection.execute("SELECT pg_sleep(30)")
        finally:
            timer.cancel()
        assert info.value.sqlstate == "57014"
        assert time.monotonic() - start < 5
        assert connection.execute("SELECT 'usable'").fetchone() == ("usable",)
        assert [q for s, q in session_activity(pg, app) if s == "active"] == []


def test_cancel_over_tls(proxy: ProxyProcess, tls_files: dict[str, Path]) -> None:
    """Cancel of a session that talks TLS to the proxy (the CancelRequest goes in clear or over TLS as
    libpq chooses)."""
    dsn = proxy.dsn(sslmode="verify-full", sslrootcert=str(tls_files["ca"]))
    with psycopg.connect(dsn, autocommit=True) as connection:
        timer = threading.Timer(0.5, connection.cancel_safe)
        timer.start()
        with pytest.raises(errors.QueryCanceled):
            connection.execute("SELECT pg_sleep(30)")
        timer.cancel()
        assert connection.execute("SELECT 1").fetchone() == (1,)


# --------------------------------------------------------------------------- async

async def test_async_connection(proxy: ProxyProcess, pg: PgCluster) -> None:
    """AsyncConnection: parameters, pipeline, COPY, transaction rollback and cancel_safe."""
    async with await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True) as aconn:
        cur = await aconn.execute("SELECT %s::int + 1, %s::text", (41, "async"))
        assert await cur.fetchone() == (42, "async")
        async with aconn.pipeline():
            cursors = [await aconn.execute("SELECT %s::int * 2", [i]) for i in range(100)]
        assert [await c.fetchone() for c in cursors] == [(i * 2,) for i in range(100)]

        with scratch_table(pg, "i int") as name:
            data = b"".join(f"{i}\n".encode() for i in range(5000))
            async with aconn.cursor() as acur:
                async with acur.copy(f"COPY {name} FROM STDIN") as copy:
                    await copy.write(data)
                out = bytearray()
                async with acur.copy(f"COPY (SELECT i FROM {name} ORDER BY i) TO STDOUT") as copy:
                    async for chunk in copy:
                        out += chunk
            assert bytes(out) == data
            with pytest.raises(RuntimeError):
                async with aconn.transaction():
                    await aconn.execute(f"DELETE FROM {name}")
                    raise RuntimeError("roll back")
            assert await (await aconn.execute(f"SELECT count(*) FROM {name}")).fetchone() == (5000,)

        query = asyncio.ensure_future(aconn.execute("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.5)
        start = time.monotonic()
        await aconn.cancel_safe()
        with pytest.raises(errors.QueryCanceled):
            await query
        assert time.monotonic() - start < 5
        assert await (await aconn.execute("SELECT 'after'")).fetchone() == ("after",)


async def test_async_notifies(proxy: ProxyProcess) -> None:
    channel = unique("chan")
    async with await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True) as listener, \
            await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True) as sender:
        await listener.execute(f"LISTEN {channel}")
        await sender.execute(f"NOTIFY {channel}, 'hello async'")
        got = [n async for n in listener.notifies(timeout=10, stop_after=1)]
        assert [(n.channel, n.payload) for n in got] == [(channel, "hello async")]
