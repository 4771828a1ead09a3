"""Small helpers shared by the driver and large-value tests."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg

from .pgcluster import PgCluster


def unique(prefix: str = "t") -> str:
    """A table (or channel) name no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def direct(pg: PgCluster) -> psycopg.Connection:
    """An autocommit psycopg connection straight to the server, for setup and checks."""
    return psycopg.connect(pg.dsn(), autocommit=True)


@contextlib.contextmanager
def new_database(pg: PgCluster, prefix: str, *extensions: str) -> Iterator[str]:
    """Create a uniquely named database (with `extensions` created in it); drop it afterwards."""
    name = unique(prefix)
    pg.psql(f"CREATE DATABASE {name}")
    with psycopg.connect(pg.dsn(database=name), autocommit=True) as conn:
        for extension in extensions:
            conn.execute(f"CREATE EXTENSION {extension}")
    try:
        yield name
    finally:
        with direct(pg) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@contextlib.contextmanager
def scratch_table(pg: PgCluster, columns: str, prefix: str = "t", unlogged: bool = False) -> Iterator[str]:
    """Create a uniquely named table directly on the server; drop it afterwards."""
    name = unique(prefix)
    with direct(pg) as conn:
        conn.execute(f"CREATE {'UNLOGGED ' if unlogged else ''}TABLE {name} ({columns})")
    try:
        yield name
    finally:
        with direct(pg) as conn:
            conn.execute("SET lock_timeout = '20s'")  # a session left in a transaction fails the test, not hangs
            conn.execute(f"DROP TABLE IF EXISTS {name}")


def direct_copy_out(pg: PgCluster, sql: str) -> bytes:
    """The bytes of `COPY ... TO STDOUT` run on a direct connection (the reference output)."""
    out = bytearray()
    with direct(pg) as conn, conn.cursor() as cur, cur.copy(sql) as copy:
        for chunk in copy:
            out += chunk
    return bytes(out)


def send_cancel_request(port: int, pid: int, secret: bytes, host: str = "127.0.0.1") -> None:
    """Send a protocol CancelRequest by hand (built here, independently of the proxy's code)."""
    packet = struct.pack("!iii", 12 + len(secret), 80877102, pid) + secret
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(packet)
        with contextlib.suppress(OSError):
            sock.recv(1)  # the peer closes once it has read the request


def session_activity(pg: PgCluster, application_name: str) -> list[tuple[str, str]]:
    """(state, query) of the server backends whose application_name is `application_name`."""
    with direct(pg) as conn:
        rows = conn.execute(
            "SELECT state, query FROM pg_stat_activity WHERE application_name = %s", [application_name]
        ).fetchall()
    return [(str(state), str(query)) for state, query in rows]


def rss_bytes(pid: int) -> int:
    """Resident set size of process `pid`, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssSampler:
    """Samples a process's RSS in a background thread; `peak` is the largest value seen."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.baseline = rss_bytes(pid)
        self.peak = self.baseline
        self.samples = 0
        self.started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                self.peak = max(self.peak, rss_bytes(self.pid))
                self.samples += 1
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
