"""psycopg2 (client-side interpolation, simple protocol, copy_expert, named cursors, cancel) through the
proxy."""

from __future__ import annotations

import datetime as dt
import io
import threading
import time
from collections.abc import Iterator
from decimal import Decimal

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
import pytest

from .helpers import direct, direct_copy_out, scratch_table, session_activity, unique
from .pgcluster import PgCluster
from .proxyproc import ProxyProcess


@pytest.fixture
def conn(proxy: ProxyProcess) -> Iterator[psycopg2.extensions.connection]:
    connection = psycopg2.connect(proxy.dsn())
    yield connection
    connection.close()


def test_basic_queries(conn: psycopg2.extensions.connection, pg: PgCluster) -> None:
    cur = conn.cursor()
    cur.execute("SELECT 1 + 1, 'text', NULL, 2.5::numeric, '2024-01-02'::date")
    assert cur.fetchone() == (2, "text", None, Decimal("2.5"), dt.date(2024, 1, 2))
    cur.execute("SELECT n, md5(n::text) FROM generate_series(1, 1000) n ORDER BY n")
    through = cur.fetchall()
    with direct(pg) as ref:
        assert through == ref.execute("SELECT n, md5(n::text) FROM generate_series(1, 1000) n ORDER BY n").fetchall()
    assert [n for n, _ in through] == list(range(1, 1001))
    assert [d.name for d in cur.description] == ["n", "md5"]
    conn.rollback()


def test_parameters(conn: psycopg2.extensions.connection, pg: PgCluster) -> None:
    """psycopg2 quotes parameters into the SQL text; tricky values survive."""
    cur = conn.cursor()
    tricky = "it's a \\ back'slash; DROP TABLE x; -- ✓"
    cur.execute("SELECT %s, %s::int * 2, %s, %s",
                (tricky, 21, psycopg2.Binary(bytes(range(256))), [1, None, 3]))
    text, number, blob, array = cur.fetchone()
    assert (text, number, bytes(blob), array) == (tricky, 42, bytes(range(256)), [1, None, 3])
    cur.execute("SELECT %(a)s || %(b)s", {"a": "x", "b": "y"})
    assert cur.fetchone() == ("xy",)
    with scratch_table(pg, "i int, t text") as name:
        psycopg2.extras.execute_values(cur, f"INSERT INTO {name} VALUES %s", [(i, tricky) for i in range(500)])
        conn.commit()
        with direct(pg) as ref:
            assert ref.execute(f"SELECT count(*), count(DISTINCT t), max(t) FROM {name}").fetchone() == (
                500, 1, tricky)


def test_error_then_rollback(conn: psycopg2.extensions.connection) -> None:
    cur = conn.cursor()
    with pytest.raises(psycopg2.errors.DivisionByZero) as info:
        cur.execute("SELECT 1/0")
    assert info.value.pgcode == "22012"
    with pytest.raises(psycopg2.errors.InFailedSqlTransaction):
        cur.execute("SELECT 1")
    conn.rollback()
    cur.execute("SELECT 'fine'")
    assert cur.fetchone() == ("fine",)


def test_copy_expert_both_ways(conn: psycopg2.extensions.connection, pg: PgCluster) -> None:
    """copy_expert FROM a buffer built here, TO a buffer: same bytes, and the same as a direct COPY."""
    data = b"".join(f"{i},\"q \"\" {i}\",{'' if i % 7 == 0 else format(i / 4, 'g')}\n".encode() for i in range(20000))
    with scratch_table(pg, "i int, t text, f float8") as name:
        cur = conn.cursor()
        cur.copy_expert(f"COPY {name} FROM STDIN WITH (FORMAT csv)", io.BytesIO(data), size=5000)
        conn.commit()
        with direct(pg) as ref:
            assert ref.execute(f"SELECT count(*), sum(i), count(f) FROM {name}").fetchone() == (
                20000, sum(range(20000)), sum(1 for i in range(20000) if i % 7))
        out = io.BytesIO()
        cur.copy_expert(f"COPY (SELECT * FROM {name} ORDER BY i) TO STDOUT WITH (FORMAT csv)", out)
        assert out.getvalue() == data
        assert out.getvalue() == direct_copy_out(pg, f"COPY (SELECT * FROM {name} ORDER BY i) TO STDOUT (FORMAT csv)")
        conn.commit()


def test_copy_expert_bad_input(conn: psycopg2.extensions.connection, pg: PgCluster) -> None:
    with scratch_table(pg, "i int") as name:
        cur = conn.cursor()
        with pytest.raises(psycopg2.errors.InvalidTextRepresentation):
            cur.copy_expert(f"COPY {name} FROM STDIN", io.BytesIO(b"1\nnot a number\n"))
        conn.rollback()
        cur.execute(f"SELECT count(*) FROM {name}")
        assert cur.fetchone() == (0,)
        conn.rollback()


def test_named_cursor_in_chunks(conn: psycopg2.extensions.connection) -> None:
    """A server-side cursor (DECLARE/FETCH) read in chunks of `itersize` and with fetchmany."""
    cur = conn.cursor(name=unique("cur"))
    cur.itersize = 333
    cur.execute("SELECT n, repeat('x', n % 50) FROM generate_series(1, 10000) n ORDER BY n")
    seen = [(n, s) for n, s in cur]
    assert seen == [(n, "x" * (n % 50)) for n in range(1, 10001)]
    cur.close()
    cur = conn.cursor(name=unique("cur"))
    cur.execute("SELECT n FROM generate_series(1, 1000) n")
    chunks = []
    while rows := cur.fetchmany(128):
        chunks.append(len(rows))
    assert chunks == [128] * 7 + [104]
    cur.close()
    conn.commit()


def test_transaction_commit_and_rollback(conn: psycopg2.extensions.connection, pg: PgCluster) -> None:
    with scratch_table(pg, "i int") as name:
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {name} VALUES (1)")
        conn.commit()
        cur.execute(f"INSERT INTO {name} VALUES (2)")
        cur.execute("SAVEPOINT s")
        cur.execute(f"INSERT INTO {name} VALUES (3)")
        cur.execute("ROLLBACK TO SAVEPOINT s")
        conn.commit()
        cur.execute(f"INSERT INTO {name} VALUES (4)")
        conn.rollback()
        with direct(pg) as ref:
            assert [r[0] for r in ref.execute(f"SELECT i FROM {name} ORDER BY i")] == [1, 2]


def test_cancel(proxy: ProxyProcess, pg: PgCluster) -> None:
    """connection.cancel() from another thread ends pg_sleep(30) with QueryCanceled 57014."""
    app = unique("cancel")
    connection = psycopg2.connect(proxy.dsn(application_name=app))
    connection.autocommit = True
    try:
        cur = connection.cursor()
        timer = threading.Timer(0.5, connection.cancel)
        start = time.monotonic()
        timer.start()
        with pytest.raises(psycopg2.errors.QueryCanceled) as info:
            cur.execute("SELECT pg_sleep(30)")
        timer.cancel()
        assert info.value.pgcode == "57014"
        assert time.monotonic() - start < 5
        cur.execute("SELECT 'usable'")
        assert cur.fetchone() == ("usable",)
        assert [q for s, q in session_activity(pg, app) if s == "active"] == []
    finally:
        connection.close()
