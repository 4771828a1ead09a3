"""asyncpg (extended protocol, binary formats, COPY, LISTEN/NOTIFY, cancel) through the proxy."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import ipaddress
import json
import math
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from .conftest import MD5_PASSWORD, SCRAM_PASSWORD
from .helpers import direct, direct_copy_out, scratch_table, send_cancel_request, session_activity, unique
from .pgcluster import PgCluster
from .proxyproc import ProxyProcess


@pytest.fixture
async def conn(proxy: ProxyProcess) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(proxy.dsn())
    yield connection
    await connection.close()


@pytest.fixture
async def ref(pg: PgCluster) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the server, the reference for comparisons."""
    connection = await asyncpg.connect(pg.dsn())
    yield connection
    await connection.close()


# --------------------------------------------------------------------------- connecting

@pytest.mark.parametrize(("user", "password"), [("postgres", None), ("scram_user", SCRAM_PASSWORD),
                                                ("md5_user", MD5_PASSWORD)])
async def test_auth_methods(proxy: ProxyProcess, user: str, password: str | None) -> None:
    """trust, SCRAM-SHA-256 and MD5 exchanges relayed to the server."""
    connection = await asyncpg.connect(proxy.dsn(user, password))
    try:
        assert await connection.fetchval("SELECT current_user") == user
    finally:
        await connection.close()


async def test_wrong_password_is_refused(proxy: ProxyProcess) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(proxy.dsn("scram_user", "wrong"))


async def test_tls_verified(proxy: ProxyProcess, tls_files: dict[str, Path]) -> None:
    """asyncpg over TLS to the proxy, the certificate verified against the test CA and host name."""
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    connection = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres", ssl=context)
    try:
        assert connection.get_server_version().major == 18
        assert await connection.fetchval("SELECT $1::int * 3", 14) == 42
    finally:
        await connection.close()


# --------------------------------------------------------------------------- prepared statements

async def test_named_prepared_statement_reused(conn: asyncpg.Connection) -> None:
    """One named statement, executed 500 times with different parameters."""
    stmt = await conn.prepare("SELECT $1::int * 2, $2::text || '!', $1::int + length($2::text)")
    name = stmt.get_name()
    assert name  # asyncpg names its statements: Parse once, Bind/Execute many times
    for i in range(500):
        text = "x" * (i % 13)
        assert tuple(await stmt.fetchrow(i, text)) == (i * 2, text + "!", i + len(text))
    names = [r[0] for r in await conn.fetch("SELECT name FROM pg_prepared_statements")]
    assert name in names


async def test_many_prepared_statements(conn: asyncpg.Connection) -> None:
    """Many statements prepared side by side, each used interleaved with the others."""
    stmts = [await conn.prepare(f"SELECT $1::bigint + {k}") for k in range(50)]
    assert len({s.get_name() for s in stmts}) == 50
    for round_ in range(10):
        for k, stmt in enumerate(stmts):
            assert await stmt.fetchval(round_ * 1000) == round_ * 1000 + k


async def test_statement_cache_and_cursor(conn: asyncpg.Connection) -> None:
    """The implicit statement cache plus a portal read in chunks inside a transaction."""
    for i in range(200):
        assert await conn.fetchval("SELECT $1::int - 1", i) == i - 1
    async with conn.transaction():
        cursor = await conn.cursor("SELECT n FROM generate_series(1, 10000) n")
        seen = []
        while chunk := await cursor.fetch(777):
            seen += [r[0] for r in chunk]
    assert seen == list(range(1, 10001))


async def test_prepare_error_keeps_session(conn: asyncpg.Connection) -> None:
    """An error at Parse, then at Execute; the connection goes on."""
    with pytest.raises(asyncpg.UndefinedTableError):
        await conn.prepare("SELECT * FROM no_such_table_here")
    with pytest.raises(asyncpg.DivisionByZeroError) as info:
        await conn.fetchval("SELECT 1 / $1::int", 0)
    assert info.value.sqlstate == "22012"
    assert await conn.fetchval("SELECT 1 / $1::int", 1) == 1


# --------------------------------------------------------------------------- binary values

ROUND_TRIP = [
    ("int2", -32768), ("int4", 2**31 - 1), ("int8", -(2**63)), ("bool", True),
    ("float8", 1.0000000000000002), ("float4", 0.5),
    ("numeric", Decimal("123456789012345678901234567890.000000000000000000001")),
    ("numeric", Decimal("-0.000001")), ("numeric", Decimal("1E+30")),
    ("text", ""), ("text", "ünïcødé ✓ 漢字 \t\n" * 100), ("bytea", bytes(range(256)) * 64), ("bytea", b""),
    ("timestamptz", dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC)),
    ("timestamptz", dt.datetime(2038, 1, 19, 3, 14, 8, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))),
    ("timestamp", dt.datetime(1, 1, 1)), ("date", dt.date(9999, 12, 31)),
    ("interval", dt.timedelta(days=-3, seconds=7, microseconds=11)), ("time", dt.time(23, 59, 59)),
    ("uuid", uuid.UUID("12345678-1234-5678-1234-567812345678")),
    ("int4[]", [1, None, 3, -4]), ("text[]", ["a", "", None, "quote\"comma,brace}"]),
    ("int8[]", []), ("float8[]", [1.5, -2.25]),
    ("inet", ipaddress.ip_interface("192.168.0.1/24")),
    ("jsonb", json.dumps({"a": [1, 2, {"b": None}], "ü": "✓"})),
]


@pytest.mark.parametrize(("typ", "value"), ROUND_TRIP, ids=[f"{t}-{i}" for i, (t, _) in enumerate(ROUND_TRIP)])
async def test_binary_round_trip(conn: asyncpg.Connection, typ: str, value: object) -> None:
    """Parameters and results in binary format: what goes in comes back."""
    got = await conn.fetchval(f"SELECT $1::{typ}", value)
    if typ == "jsonb":
        assert json.loads(got) == json.loads(value)  # type: ignore[arg-type]
    else:
        assert got == value


SERVER_VALUES = """
SELECT n::int2 AS i2, n * 100000 AS i4, n::int8 * 10000000000 AS i8,
       (n / 7.0)::numeric(30, 20) AS num, n::float8 / 3 AS f8,
       md5(n::text) AS txt, decode(md5(n::text), 'hex') AS bin,
       timestamptz '2024-02-29 12:00:00+00' + n * interval '1 hour 1 second' AS ts,
       md5(n::text)::uuid AS id, jsonb_build_object('n', n, 'arr', array[n, n + 1]) AS doc,
       array[n, NULL, -n] AS arr, array[md5(n::text), NULL] AS tarr,
       ('[' || n || ',' || n / 2.0 || ',-1]')::vector::text AS vec,
       n % 2 = 0 AS even, ('2024-01-01'::date + n) AS day
FROM generate_series(1, 500) n ORDER BY n
"""


async def test_binary_results_match_direct(conn: asyncpg.Connection, ref: asyncpg.Connection) -> None:
    """Many types produced by the server: identical through the proxy and directly."""
    through = [tuple(r) for r in await conn.fetch(SERVER_VALUES)]
    straight = [tuple(r) for r in await ref.fetch(SERVER_VALUES)]
    assert len(through) == 500
    assert through == straight


async def test_vector_values(conn: asyncpg.Connection) -> None:
    """pgvector through text casts; the distance is computed here too."""
    a, b = [1.5, -2.0, 3.25], [0.5, 4.0, -1.0]
    text = await conn.fetchval("SELECT $1::text::vector::text", str(a).replace(" ", ""))
    assert [float(x) for x in text.strip("[]").split(",")] == a
    distance = await conn.fetchval("SELECT $1::text::vector <-> $2::text::vector", str(a), str(b))
    assert distance == pytest.approx(math.dist(a, b), rel=1e-6)


# --------------------------------------------------------------------------- executemany and COPY

async def test_executemany(conn: asyncpg.Connection, pg: PgCluster) -> None:
    rows = [(i, f"row {i}", Decimal(i) / 4) for i in range(2000)]
    with scratch_table(pg, "i int, t text, n numeric") as name:
        await conn.executemany(f"INSERT INTO {name} VALUES ($1, $2, $3)", rows)
        with direct(pg) as check:
            got = check.execute(f"SELECT i, t, n FROM {name} ORDER BY i").fetchall()
        assert got == rows


def text_rows(count: int) -> bytes:
    """COPY text format written here: id, a text with an escaped tab and backslash, a number."""
    return b"".join(f"{i}\tcell\\t{i}\\\\é\t{i * 3}.5\n".encode() for i in range(count))


async def test_copy_to_table_then_from_query(conn: asyncpg.Connection, pg: PgCluster) -> None:
    """copy_to_table from bytes written here; copy_from_query gives the same bytes back, as directly."""
    data = text_rows(20000)
    with scratch_table(pg, "i int, t text, n numeric") as name:
        status = await conn.copy_to_table(name, source=io.BytesIO(data))
        assert status == "COPY 20000"
        with direct(pg) as check:
            assert check.execute(f"SELECT count(*), sum(i), min(t) FROM {name}").fetchone() == (
                20000, sum(range(20000)), "cell\t0\\é")
        out = io.BytesIO()
        await conn.copy_from_query(f"SELECT * FROM {name} ORDER BY i", output=out)
        assert out.getvalue() == data
        assert out.getvalue() == direct_copy_out(pg, f"COPY (SELECT * FROM {name} ORDER BY i) TO STDOUT")


async def test_copy_binary_and_records(conn: asyncpg.Connection, pg: PgCluster) -> None:
    """Binary COPY both ways (copy_records_to_table), compared with a direct binary COPY."""
    records = [(i, bytes([i % 256]) * (i % 50), f"t{i}") for i in range(5000)]
    with scratch_table(pg, "i int, b bytea, t text") as name:
        await conn.copy_records_to_table(name, records=records)
        out = io.BytesIO()
        await conn.copy_from_query(f"SELECT * FROM {name} ORDER BY i", output=out, format="binary")
        assert out.getvalue() == direct_copy_out(
            pg, f"COPY (SELECT * FROM {name} ORDER BY i) TO STDOUT (FORMAT binary)")
        assert [tuple(r) for r in await conn.fetch(f"SELECT * FROM {name} ORDER BY i")] == records


async def test_copy_error_keeps_session(conn: asyncpg.Connection, pg: PgCluster) -> None:
    with scratch_table(pg, "i int") as name:
        with pytest.raises(asyncpg.InvalidTextRepresentationError):
            await conn.copy_to_table(name, source=io.BytesIO(b"1\n2\nthree\n"))
        assert await conn.fetchval(f"SELECT count(*) FROM {name}") == 0


# --------------------------------------------------------------------------- LISTEN / NOTIFY

async def test_listen_notify_across_sessions(proxy: ProxyProcess) -> None:
    """add_listener on one connection, NOTIFY from another: payloads arrive, in order."""
    channel = unique("chan")
    listener = await asyncpg.connect(proxy.dsn())
    sender = await asyncpg.connect(proxy.dsn())
    received: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()
    try:
        await listener.add_listener(channel, lambda _c, pid, chan, payload: received.put_nowait((pid, chan, payload)))
        sender_pid = await sender.fetchval("SELECT pg_backend_pid()")
        payloads = [f"payload {i} ✓" for i in range(20)] + ["x" * 7000]
        for payload in payloads[:10]:
            await sender.execute(f"NOTIFY {channel}, '{payload}'")
        for payload in payloads[10:]:
            await sender.execute("SELECT pg_notify($1, $2)", channel, payload)
        got = [await asyncio.wait_for(received.get(), 10) for _ in payloads]
        assert [p for _, _, p in got] == payloads
        assert {(pid, chan) for pid, chan, _ in got} == {(sender_pid, channel)}
        await listener.remove_listener(channel, lambda *a: None)
    finally:
        await listener.close()
        await sender.close()


async def test_notify_inside_transaction_delivered_on_commit(proxy: ProxyProcess) -> None:
    channel = unique("chan")
    listener = await asyncpg.connect(proxy.dsn())
    sender = await asyncpg.connect(proxy.dsn())
    received: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener(channel, lambda _c, _p, _ch, payload: received.put_nowait(payload))
        tr = sender.transaction()
        await tr.start()
        await sender.execute("SELECT pg_notify($1, 'rolled back')", channel)
        await tr.rollback()
        async with sender.transaction():
            await sender.execute("SELECT pg_notify($1, 'committed')", channel)
        assert await asyncio.wait_for(received.get(), 10) == "committed"
        await asyncio.sleep(0.2)
        assert received.empty()
    finally:
        await listener.close()
        await sender.close()


# --------------------------------------------------------------------------- cancel

async def test_timeout_cancels_query(proxy: ProxyProcess, pg: PgCluster) -> None:
    """asyncio.wait_for times out; asyncpg sends a CancelRequest through the proxy; the server stops
    sleeping at once and the connection is usable."""
    app = unique("cancel")
    connection = await asyncpg.connect(proxy.dsn(application_name=app))
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(connection.fetchval("SELECT pg_sleep(30)"), timeout=0.5)
        # asyncpg waits for the server's answer to the cancelled query before the next one runs, so
        # this returns quickly only if the CancelRequest reached the right backend.
        assert await connection.fetchval("SELECT 41 + 1") == 42
        assert time.monotonic() - start < 5
        assert [q for s, q in session_activity(pg, app) if "pg_sleep" in q and s == "active"] == []
    finally:
        await connection.close()


async def test_cancel_request_gives_57014(proxy: ProxyProcess) -> None:
    """A CancelRequest (built by hand with the key the proxy gave the client) ends the query with
    QueryCanceledError 57014, and the connection goes on."""
    connection = await asyncpg.connect(proxy.dsn())
    try:
        pid = connection._protocol.backend_pid  # the cancel key the client was given (by the proxy)
        secret = connection._protocol.backend_secret
        if isinstance(secret, int):
            secret = secret.to_bytes(4, "big", signed=True)
        query = asyncio.ensure_future(connection.fetchval("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.5)
        start = time.monotonic()
        await asyncio.to_thread(send_cancel_request, proxy.port, pid, secret)
        with pytest.raises(asyncpg.QueryCanceledError) as info:
            await asyncio.wait_for(query, 10)
        assert info.value.sqlstate == "57014"
        assert time.monotonic() - start < 5
        assert await connection.fetchval("SELECT 'usable'") == "usable"
    finally:
        await connection.close()


async def test_wrong_cancel_key_is_ignored(proxy: ProxyProcess) -> None:
    """A CancelRequest with a wrong secret does not cancel anything."""
    connection = await asyncpg.connect(proxy.dsn())
    try:
        pid = connection._protocol.backend_pid
        query = asyncio.ensure_future(connection.fetchrow("SELECT pg_sleep(1.5), 'finished'"))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(send_cancel_request, proxy.port, pid, b"\0\0\0\0")
        row = await asyncio.wait_for(query, 10)
        assert row[1] == "finished"
    finally:
        await connection.close()


# --------------------------------------------------------------------------- concurrency, transactions

async def test_hundred_concurrent_sessions(proxy: ProxyProcess) -> None:
    """100 sessions at once, each with its own backend, prepared statements and a transaction."""

    async def one(k: int) -> tuple[int, int, list[int]]:
        connection = await asyncpg.connect(proxy.dsn(), timeout=60)
        try:
            pid = await connection.fetchval("SELECT pg_backend_pid()")
            stmt = await connection.prepare("SELECT $1::int * $2::int")
            products = [await stmt.fetchval(k, j) for j in range(20)]
            async with connection.transaction():
                await connection.execute("CREATE TEMP TABLE mine (k int) ON COMMIT DROP")
                await connection.executemany("INSERT INTO mine VALUES ($1)", [(k,)] * 5)
                total = await connection.fetchval("SELECT sum(k) FROM mine, pg_sleep(0.05)")
            return pid, total, products
        finally:
            await connection.close()

    start = time.monotonic()
    results = await asyncio.gather(*(one(k) for k in range(100)))
    elapsed = time.monotonic() - start
    assert len({pid for pid, _, _ in results}) == 100
    for k, (_, total, products) in enumerate(results):
        assert total == 5 * k
        assert products == [k * j for j in range(20)]
    assert elapsed < 60


async def test_transaction_rollback(conn: asyncpg.Connection, pg: PgCluster) -> None:
    """An exception in `async with transaction()` rolls back; a nested savepoint rolls back alone."""
    with scratch_table(pg, "i int PRIMARY KEY") as name:
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {name} VALUES (1)")
                raise RuntimeError("abort")
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {name} VALUES (2)")
            with pytest.raises(asyncpg.UniqueViolationError):
                async with conn.transaction():  # a savepoint
                    await conn.execute(f"INSERT INTO {name} VALUES (3)")
                    await conn.execute(f"INSERT INTO {name} VALUES (2)")
            await conn.execute(f"INSERT INTO {name} VALUES (4)")
        assert not conn.is_in_transaction()
        with direct(pg) as check:
            assert [r[0] for r in check.execute(f"SELECT i FROM {name} ORDER BY i")] == [2, 4]


async def test_failed_transaction_state(conn: asyncpg.Connection) -> None:
    """An error inside a transaction: the server refuses further statements until rollback."""
    tr = conn.transaction()
    await tr.start()
    with pytest.raises(asyncpg.DivisionByZeroError):
        await conn.execute("SELECT 1/0")
    with pytest.raises(asyncpg.InFailedSQLTransactionError):
        await conn.execute("SELECT 1")
    await tr.rollback()
    assert await conn.fetchval("SELECT 1") == 1
