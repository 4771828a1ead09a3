"""Large values through the proxy: a 100 MB bytea, 1 GB of COPY each way, and backpressure with a
stalled reader or writer — while the proxy's resident memory is sampled and must stay bounded."""

from __future__ import annotations

import hashlib
import os
import ssl
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import psycopg
import psycopg2
import pytest

from .helpers import RssSampler, direct, rss_bytes, scratch_table, unique
from .pgcluster import PgCluster
from .proxyproc import ProxyProcess, start_proxy

MB = 1 << 20
#: The proxy's resident memory must stay below this while gigabytes go through it.
RSS_LIMIT = 300 * MB
#: ... and must not grow by more than this while one side stalls (backpressure).
STALL_GROWTH_LIMIT = 100 * MB

BYTEA_SIZE = 100 * MB

#: 1 GB of COPY text: rows of `i \t md5(i) \t md5(i) x PAD_REPEAT \n`, about 522 bytes each.
COPY_ROWS = 2_000_000
PAD_REPEAT = 15
COPY_QUERY = f"SELECT i, md5(i::text), repeat(md5(i::text), {PAD_REPEAT}) FROM generate_series(1, {COPY_ROWS}) i"


@pytest.fixture(scope="module")
def proxy(pg: PgCluster, tls_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """A proxy of this module's own, with no model loaded, so that its memory shows the relay alone."""
    running = start_proxy(tmp_path_factory.mktemp("large-values"), "--tls-cert", str(tls_files["cert"]),
                          "--tls-key", str(tls_files["key"]), upstream=pg.url())
    yield running
    running.stop()


def copy_line(i: int) -> bytes:
    """One row of the 1 GB data set, built here (the server builds the same with md5/repeat)."""
    digits = str(i).encode()
    digest = hashlib.md5(digits).hexdigest().encode()
    return b"%s\t%s\t%s\n" % (digits, digest, digest * PAD_REPEAT)


def expected_copy_bytes() -> int:
    """Total size of the data set: computed from the row layout, not measured."""
    fixed = 1 + 32 + 1 + 32 * PAD_REPEAT + 1
    return sum(len(str(i)) for i in range(1, COPY_ROWS + 1)) + fixed * COPY_ROWS


def report(what: str, sampler: RssSampler, nbytes: int, elapsed: float | None = None) -> None:
    speed = f" in {elapsed:.1f} s ({nbytes / MB / elapsed:.0f} MB/s)" if elapsed else ""
    print(f"\n{what}: {nbytes / MB:.0f} MB{speed}; proxy RSS {sampler.baseline / MB:.0f} MB before, "
          f"peak {sampler.peak / MB:.0f} MB ({sampler.samples} samples)")


async def connect(proxy: ProxyProcess, tls_files: dict[str, Path], tls: bool) -> asyncpg.Connection:
    if not tls:
        return await asyncpg.connect(proxy.dsn())
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    return await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres", ssl=context)


# --------------------------------------------------------------------------- 100 MB bytea

#: How much the proxy may grow while one 100 MB value passes: a streaming relay holds none of it whole.
VALUE_GROWTH_LIMIT = 50 * MB


async def insert_and_fetch(conn: asyncpg.Connection, pg: PgCluster, name: str, data: bytes,
                           proxy_pid: int) -> tuple[bytes, RssSampler, RssSampler]:
    """Insert `data` as a bind parameter, check it on the server, fetch it back; RSS sampled per phase."""
    with RssSampler(proxy_pid) as inserting:
        await conn.execute(f"INSERT INTO {name} VALUES ($1)", data)
    with direct(pg) as ref:
        assert ref.execute(f"SELECT octet_length(b), encode(sha256(b), 'hex') FROM {name}").fetchone() == (
            len(data), hashlib.sha256(data).hexdigest())
    with RssSampler(proxy_pid) as fetching:
        back = await conn.fetchval(f"SELECT b FROM {name}")
    return back, inserting, fetching


def external_bytea(pg: PgCluster, name: str) -> None:
    with direct(pg) as ref:
        ref.execute(f"ALTER TABLE {name} ALTER b SET STORAGE EXTERNAL")  # random bytes: skip compression


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_bytea_100mb_asyncpg(proxy: ProxyProcess, pg: PgCluster, tls_files: dict[str, Path], tls: bool) -> None:
    """A 100 MB bytea as a binary Bind parameter and back as a binary DataRow; sha256 on both sides
    (the server's sha256() of what it stored, and ours of what came back). The DataRow streams."""
    data = os.urandom(BYTEA_SIZE)
    conn = await connect(proxy, tls_files, tls)
    try:
        with scratch_table(pg, "b bytea") as name:
            external_bytea(pg, name)
            start = time.monotonic()
            back, inserting, fetching = await insert_and_fetch(conn, pg, name, data, proxy.proc.pid)
            mode = "tls" if tls else "plain"
            report(f"bytea 100 MB asyncpg {mode}, Bind", inserting, BYTEA_SIZE, fetching.started - start)
            report(f"bytea 100 MB asyncpg {mode}, DataRow", fetching, BYTEA_SIZE, time.monotonic() - fetching.started)
    finally:
        await conn.close()
    assert len(back) == BYTEA_SIZE
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest()
    assert fetching.peak - fetching.baseline < VALUE_GROWTH_LIMIT


@pytest.mark.timeout(300)
def test_bytea_100mb_psycopg_text(proxy: ProxyProcess, pg: PgCluster) -> None:
    """The same value fetched in text format: a 200 MB hex DataRow streams through the proxy."""
    data = os.urandom(BYTEA_SIZE)
    with scratch_table(pg, "b bytea") as name:
        external_bytea(pg, name)
        with direct(pg) as ref:
            ref.execute(f"INSERT INTO {name} VALUES (%b)", [data])
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn, RssSampler(proxy.proc.pid) as fetching:
            cur = conn.execute(f"SELECT b FROM {name}")
            (back,) = cur.fetchone()  # type: ignore[misc]
            assert cur.pgresult is not None and cur.pgresult.fformat(0) == 0  # text: 200 MB of hex
    report("bytea 100 MB psycopg text DataRow", fetching, 2 * BYTEA_SIZE)
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest()
    assert fetching.peak - fetching.baseline < VALUE_GROWTH_LIMIT


@pytest.mark.timeout(300)
@pytest.mark.parametrize("driver", ["asyncpg-binary", "psycopg-text"])
async def test_bytea_100mb_bind_streams(proxy: ProxyProcess, pg: PgCluster, driver: str) -> None:
    """A 100 MB parameter (binary, or 200 MB of hex in text format) in a Bind message must stream
    through the proxy like any other long message, not be held whole (and copied) before relaying."""
    data = os.urandom(BYTEA_SIZE)
    with scratch_table(pg, "b bytea") as name:
        external_bytea(pg, name)
        start = time.monotonic()
        with RssSampler(proxy.proc.pid) as inserting:
            if driver == "asyncpg-binary":
                conn = await asyncpg.connect(proxy.dsn())
                try:
                    await conn.execute(f"INSERT INTO {name} VALUES ($1)", data)
                finally:
                    await conn.close()
            else:
                async with await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True) as aconn:
                    await aconn.execute(f"INSERT INTO {name} VALUES (%t)", [data])
        elapsed = time.monotonic() - start
        with direct(pg) as ref:
            assert ref.execute(f"SELECT encode(sha256(b), 'hex') FROM {name}").fetchone() == (
                hashlib.sha256(data).hexdigest(),)
    report(f"bytea 100 MB {driver} Bind", inserting, BYTEA_SIZE, elapsed)
    assert inserting.peak - inserting.baseline < VALUE_GROWTH_LIMIT
    assert inserting.peak < RSS_LIMIT


# --------------------------------------------------------------------------- 1 GB COPY

class CopyChecker:
    """Checks a streamed COPY text output line by line: row i is `i, md5(i), md5(i) x PAD_REPEAT`,
    rows 1..N in order, nothing else."""

    def __init__(self) -> None:
        self.tail = b""
        self.rows = 0
        self.nbytes = 0
        self.bad: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        self.nbytes += len(chunk)
        lines = (self.tail + chunk).split(b"\n")
        self.tail = lines.pop()
        md5 = hashlib.md5
        expected = self.rows + 1
        for line in lines:
            digits, digest, pad = line.split(b"\t")
            if (int(digits) != expected or md5(digits).hexdigest().encode() != digest
                    or pad != digest * PAD_REPEAT) and len(self.bad) < 5:
                self.bad.append(line[:100])
            expected += 1
        self.rows = expected - 1


@pytest.mark.timeout(600)
async def test_copy_out_1gb(proxy: ProxyProcess) -> None:
    """1 GB generated by the server streams to asyncpg through the proxy; every row checked here."""
    conn = await asyncpg.connect(proxy.dsn())
    checker = CopyChecker()

    async def sink(chunk: bytes) -> None:
        checker.feed(chunk)

    try:
        start = time.monotonic()
        with RssSampler(proxy.proc.pid) as sampler:
            status = await conn.copy_from_query(COPY_QUERY, output=sink)
        elapsed = time.monotonic() - start
    finally:
        await conn.close()
    report("COPY TO STDOUT 1 GB", sampler, checker.nbytes, elapsed)
    assert status == f"COPY {COPY_ROWS}"
    assert checker.tail == b""
    assert checker.bad == []
    assert checker.rows == COPY_ROWS
    assert checker.nbytes == expected_copy_bytes()
    assert sampler.peak < RSS_LIMIT


@pytest.mark.timeout(600)
async def test_copy_in_1gb(proxy: ProxyProcess, pg: PgCluster) -> None:
    """1 GB generated here streams through the proxy into COPY FROM STDIN; the server checks every row."""
    sent = 0

    async def source() -> AsyncIterator[bytes]:
        nonlocal sent
        batch: list[bytes] = []
        size = 0
        for i in range(1, COPY_ROWS + 1):
            line = copy_line(i)
            batch.append(line)
            size += len(line)
            if size >= MB:
                sent += size
                yield b"".join(batch)
                batch, size = [], 0
        sent += size
        yield b"".join(batch)

    with scratch_table(pg, "i int, h text, p text", unlogged=True) as name:
        conn = await asyncpg.connect(proxy.dsn())
        try:
            start = time.monotonic()
            with RssSampler(proxy.proc.pid) as sampler:
                status = await conn.copy_to_table(name, source=source())
            elapsed = time.monotonic() - start
        finally:
            await conn.close()
        report("COPY FROM STDIN 1 GB", sampler, sent, elapsed)
        assert status == f"COPY {COPY_ROWS}"
        assert sent == expected_copy_bytes()
        with direct(pg) as ref:
            row = ref.execute(
                f"SELECT count(*), count(DISTINCT i), min(i), max(i), "
                f"sum(octet_length(i::text) + octet_length(h) + octet_length(p) + 3), "
                f"count(*) FILTER (WHERE h <> md5(i::text) OR p <> repeat(h, {PAD_REPEAT})) FROM {name}"
            ).fetchone()
        assert row == (COPY_ROWS, COPY_ROWS, 1, COPY_ROWS, sent, 0)
        assert sampler.peak < RSS_LIMIT


# --------------------------------------------------------------------------- backpressure

def backend_wait(pg: PgCluster, application_name: str) -> tuple[str | None, str | None]:
    """(wait_event_type, wait_event) of the one backend with this application_name."""
    with direct(pg) as ref:
        row = ref.execute("SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE application_name = %s",
                          [application_name]).fetchone()
    return (row[0], row[1]) if row else (None, None)


@pytest.mark.timeout(300)
def test_stalled_reader_pauses_server(proxy: ProxyProcess, pg: PgCluster) -> None:
    """A client that stops reading mid-COPY: the proxy stops reading the server (which then waits in
    ClientWrite) instead of buffering the rest of the 600 MB."""
    app = unique("stall")
    total_rows, width = 600_000, 1000
    received = 0
    stall = threading.Event()
    resume = threading.Event()

    class SlowSink:
        def write(self, data: bytes) -> int:
            nonlocal received
            received += len(data)
            if not stall.is_set():
                stall.set()
                resume.wait(30)
            return len(data)

    def client() -> None:
        with psycopg2.connect(proxy.dsn(application_name=app)) as conn, conn.cursor() as cur:
            cur.copy_expert(f"COPY (SELECT repeat('x', {width}) FROM generate_series(1, {total_rows})) TO STDOUT",
                            SlowSink())
        conn.close()

    thread = threading.Thread(target=client)
    baseline = rss_bytes(proxy.proc.pid)
    thread.start()
    try:
        assert stall.wait(30)
        time.sleep(2.5)  # unthrottled, the server produces all 600 MB in less than this
        wait = backend_wait(pg, app)
        grown = rss_bytes(proxy.proc.pid) - baseline
    finally:
        resume.set()
        thread.join(120)
    print(f"\nstalled reader: server waits on {wait}, proxy RSS grew {grown / MB:.1f} MB")
    assert received == total_rows * (width + 1)
    assert wait == ("Client", "ClientWrite")
    assert grown < STALL_GROWTH_LIMIT


@pytest.mark.timeout(300)
def test_stalled_server_pauses_client(proxy: ProxyProcess, pg: PgCluster) -> None:
    """The server stops reading during a COPY FROM (a trigger sleeps): the proxy stops reading the
    client, so the client's sending blocks instead of the proxy buffering 300 MB."""
    total_rows, width, stall_row = 300_000, 1000, 2000
    app = unique("stall")
    read = 0

    class Source:
        """A file-like source for copy_expert that counts what the client has taken from it."""

        def __init__(self) -> None:
            self.row = 0

        def read(self, size: int = -1) -> bytes:
            nonlocal read
            lines = []
            while self.row < total_rows and len(lines) * (width + 8) < max(size, 65536):
                self.row += 1
                lines.append(b"%d\t%s\n" % (self.row, b"y" * width))
            chunk = b"".join(lines)
            read += len(chunk)
            return chunk

    with scratch_table(pg, "i int, t text", unlogged=True) as name:
        with direct(pg) as ref:
            ref.execute(f"""
                CREATE FUNCTION {name}_nap() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN IF NEW.i = {stall_row} THEN PERFORM pg_sleep(4); END IF; RETURN NEW; END $$;
                CREATE TRIGGER nap BEFORE INSERT ON {name} FOR EACH ROW EXECUTE FUNCTION {name}_nap();""")
        errors: list[BaseException] = []

        def client() -> None:
            try:
                conn = psycopg2.connect(proxy.dsn(application_name=app))
                with conn, conn.cursor() as cur:
                    cur.copy_expert(f"COPY {name} FROM STDIN", Source(), size=65536)
                conn.close()
            except BaseException as exc:  # reported in the main thread
                errors.append(exc)

        thread = threading.Thread(target=client)
        baseline = rss_bytes(proxy.proc.pid)
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while backend_wait(pg, app) != ("Timeout", "PgSleep") and time.monotonic() < deadline:
                time.sleep(0.02)
            assert backend_wait(pg, app) == ("Timeout", "PgSleep")
            time.sleep(2)
            taken = read
            grown = rss_bytes(proxy.proc.pid) - baseline
        finally:
            thread.join(120)
        print(f"\nstalled server: client had produced {taken / MB:.1f} MB of 300 MB while the server slept; "
              f"proxy RSS grew {grown / MB:.1f} MB")
        assert errors == []
        assert taken < 64 * MB
        assert grown < STALL_GROWTH_LIMIT
        with direct(pg) as ref:
            assert ref.execute(f"SELECT count(*), sum(octet_length(t)) FROM {name}").fetchone() == (
                total_rows, total_rows * width)
            ref.execute(f"DROP TABLE {name}; DROP FUNCTION {name}_nap()")
