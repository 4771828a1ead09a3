"""The per-session hook seam that the azure_local_ai interception plugs into: a hook sees the client
messages it asks for, may rewrite or answer them, and may watch the server's replies."""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from collections.abc import AsyncIterator

import psycopg
import pytest

from proxy import config as cfg
from proxy import protocol as pg
from proxy.hooks import SessionControl, SessionInfo
from proxy.server import ProxyServer
from proxy.upstream import Upstream

from .pgcluster import PgCluster
from .rawclient import RawClient


def text_result(column: str, value: str) -> bytes:
    """RowDescription + DataRow + CommandComplete for one text value, as a server would send them."""
    field = column.encode() + b"\0" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)
    row = struct.pack("!hi", 1, len(value.encode())) + value.encode()
    return (pg.message(ord("T"), struct.pack("!h", 1) + field) + pg.message(ord("D"), row)
            + pg.message(ord("C"), b"SELECT 1\0"))


class DemoHook:
    """Answers, rewrites or watches statements that carry a marker; leaves all others alone."""

    message_types = frozenset({pg.QUERY, pg.PARSE})
    marker = b"hook_"

    def __init__(self, info: SessionInfo) -> None:
        self.info = info
        self.cancelled = asyncio.Event()
        self.closed = False

    def wants(self, msg_type: int, body: bytes, marked: bool | None = None) -> bool:
        return b"hook_" in body if marked is None else marked

    def markers(self) -> list[bytes]:
        return [self.marker]

    async def handle(self, msg_type: int, body: bytes, control: SessionControl) -> None:
        if b"hook_answer" in body:
            await asyncio.sleep(0.05)  # local work, while later messages wait their turn
            control.send_client(text_result("answer", f"from the proxy for {self.info.user}")
                                + pg.message(pg.READY_FOR_QUERY, b"I"))
        elif b"hook_whoami" in body:
            (row,) = await control.query("select current_user, current_setting('application_name')")
            control.send_client(text_result("whoami", f"{row[0]}/{row[1]}/{control.transaction_status}")
                                + pg.message(pg.READY_FOR_QUERY, control.transaction_status.encode()))
        elif b"hook_wait_for_cancel" in body:
            await self.cancelled.wait()
            control.send_client(pg.error_response("57014", "canceling statement due to user request",
                                                  severity="ERROR") + pg.message(pg.READY_FOR_QUERY, b"I"))
        elif b"hook_rewrite" in body:
            control.send_upstream(pg.message(msg_type, body.replace(b"hook_rewrite", b"rewritten")))
        elif b"hook_watch" in body:
            control.watch_server(self._upper_case_rows(control))
            control.send_upstream(pg.message(msg_type, body))

    def _upper_case_rows(self, control: SessionControl):
        def watcher(msg_type: int, body: bytes) -> bytes | None:
            if msg_type == ord("D"):
                return pg.message(msg_type, body.upper())
            if msg_type == pg.READY_FOR_QUERY:
                control.stop_watching()
            return None
        return watcher

    def resting(self) -> list[bytes]:
        return []

    def passed(self, msg_type: int, body: bytes) -> None:
        pass

    def cancel(self) -> None:
        self.cancelled.set()

    def close(self) -> None:
        self.closed = True


@pytest.fixture()
async def hooked(pg: PgCluster) -> AsyncIterator[tuple[ProxyServer, list[DemoHook]]]:
    hooks: list[DemoHook] = []

    def factory(info: SessionInfo) -> DemoHook:
        hooks.append(DemoHook(info))
        return hooks[-1]

    config = dataclasses.replace(cfg.load(None), listen="127.0.0.1:0")
    server = ProxyServer(config, Upstream.from_url(pg.url()), factory)
    await server.start()
    yield server, hooks
    await server.shutdown(0)


def query(sql: str) -> bytes:
    return pg.message(pg.QUERY, sql.encode() + b"\0")


def rows(replies: list[tuple[bytes, bytes]]) -> list[str]:
    out = []
    for msg_type, body in replies:
        if msg_type == b"D":
            (length,) = struct.unpack_from("!i", body, 2)
            out.append(body[6 : 6 + length].decode())
    return out


async def test_hook_answers_and_keeps_pipelined_order(hooked) -> None:
    server, hooks = hooked

    def run() -> list[str]:
        client = RawClient(server.port)
        client.login(user="postgres")
        client.send(query("select 'hook_answer'") + query("select 'plain'") + query("select 'hook_answer'"))
        return rows(client.read_until(b"Z") + client.read_until(b"Z") + client.read_until(b"Z"))

    assert await asyncio.to_thread(run) == ["from the proxy for postgres", "plain", "from the proxy for postgres"]
    assert hooks[0].info.user == "postgres"


async def test_hook_rewrites_simple_and_extended_queries(hooked) -> None:
    server, _ = hooked

    def run() -> tuple[str, str]:
        dsn = f"postgresql://postgres@127.0.0.1:{server.port}/postgres?sslmode=disable"
        with psycopg.connect(dsn, autocommit=True) as conn:
            extended = conn.execute("select %s::text || 'hook_rewrite'", ["x-"]).fetchone()[0]
            simple = conn.pgconn.exec_(b"select 'hook_rewrite'").get_value(0, 0).decode()
        return extended, simple

    assert await asyncio.to_thread(run) == ("x-rewritten", "rewritten")


async def test_hook_watches_server_replies(hooked) -> None:
    server, _ = hooked

    def run() -> list[str]:
        client = RawClient(server.port)
        client.login()
        client.send(query("select 'hook_watch', 'abc'") + query("select 'after'"))
        return rows(client.read_until(b"Z") + client.read_until(b"Z"))

    assert await asyncio.to_thread(run) == ["HOOK_WATCH", "after"]


async def test_hook_runs_its_own_query_on_the_session(hooked) -> None:
    server, _ = hooked

    def run() -> list[str]:
        client = RawClient(server.port)
        client.login(application_name="seam")
        # The hook's query waits for the answers the server still owes, and its own answer is not relayed.
        client.send(query("select pg_sleep(0.2), 'first'") + query("begin") + query("select 'hook_whoami'")
                    + query("select 'last'"))
        return rows(client.read_until(b"Z") + client.read_until(b"Z") + client.read_until(b"Z")
                    + client.read_until(b"Z"))

    assert await asyncio.to_thread(run) == ["", "postgres/seam/T", "last"]


async def test_cancel_request_reaches_the_hook(hooked) -> None:
    server, hooks = hooked

    def run() -> str:
        client = RawClient(server.port)
        replies = client.login()
        key = next(body for t, body in replies if t == b"K")
        client.send(query("select 'hook_wait_for_cancel'"))
        canceller = RawClient(server.port)
        canceller.send(struct.pack("!ii", 8 + len(key), pg.CANCEL_REQUEST) + key)
        assert canceller.closed()
        return pg.parse_fields(client.read_until(b"E")[-1][1])["C"]

    assert await asyncio.to_thread(run) == "57014"
    assert hooks[0].cancelled.is_set()


async def test_hook_is_closed_with_its_session(hooked) -> None:
    server, hooks = hooked

    def run() -> None:
        client = RawClient(server.port)
        client.login()
        client.send(pg.message(pg.TERMINATE))
        assert client.closed()

    await asyncio.to_thread(run)
    for _ in range(50):
        if hooks[0].closed:
            break
        await asyncio.sleep(0.02)
    assert hooks[0].closed
