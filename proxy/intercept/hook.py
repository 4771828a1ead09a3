"""The session hook that answers azure_local_ai calls, in both query protocols: it decides which of the
client's messages the proxy must see, and which path each takes.

- A Query or Parse that names the schema: its calls are answered (simple.py, extended.py), and
  those the server evaluates read ahead (serverpath.py).
- A Query or Parse that names no azure_local_ai function but may be a one-row INSERT into a table
  whose generated column embeds: its answer goes before it (rowinserts.py); a COPY FROM STDIN into
  one: its rows are read as they go (copyreading.py).
- A Bind, Describe or Close of a statement the proxy prepared: as the path that prepared it says.
- A statement that names azure.extensions: the setting is defined first (azuresettings.py).

A call that fails makes the server fail at the same point (a statement, or a Bind, carrying a
marker), and the server's error is replaced by the call's own (replies.py): statements before it
run, those after it do not, and the transaction ends up aborted on both sides, exactly as with a
real function error."""

from __future__ import annotations

import asyncio

from .. import protocol as pg
from ..hooks import SessionControl, SessionInfo
from ..messages import Bind, Parse
from ..protocol import ProtocolViolation
from . import azuresettings
from .common import LONG_STATEMENT, LocalWork, cstring_at, define_azure_settings, long_query_text, query_text
from .copyrows import copy_from_stdin
from .extended import ExtendedQueries
from .functions import Backend
from .prepared import PreparedCalls
from .replies import ReplyWatcher
from .rowinserts import PreparedInsert, RowInserts
from .servercalls import ServerCalls
from .serverpath import KEEP_BEFORE_MAX, ServerPath
from .simple import SimpleQueries
from .sqlcalls import SCHEMA_MARKER, mentions_schema


def _names_ours(body: bytes) -> bool:
    """Whether a statement names the schema or azure.extensions (azuresettings.py): the body is lowered
    once for both, as every Query and Parse of a hooked session is looked at here."""
    lowered = body.lower()
    return SCHEMA_MARKER in lowered or azuresettings.MARKER in lowered


def _is_utf8(text: str) -> bool:
    """False for text decoded with surrogateescape from bytes that were not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class InterceptHook:
    """One per session; see the module docstring. What it holds is which path each prepared statement
    takes; the paths, and what watches the server's replies, hold the rest."""

    message_types = frozenset({pg.QUERY, pg.PARSE, pg.BIND, pg.DESCRIBE, pg.CLOSE})
    marker = SCHEMA_MARKER

    def __init__(self, info: SessionInfo, backend: Backend, server_calls: ServerCalls | None = None) -> None:
        self.info = info
        #: The prepared statements with calls (extended.py), and the prepared one-row INSERTs into tables
        #: whose generated columns embed (rowinserts.py), by name: their Binds, Describes and Closes are
        #: the hook's.
        self.statements: dict[str, PreparedCalls] = {}
        self.inserts: dict[str, PreparedInsert] = {}
        self.work = LocalWork()
        self.replies = ReplyWatcher()
        #: The calls the server evaluates; None where sessions get no mailbox (server_calls off).
        self.server = ServerPath(info, server_calls, self.replies, self.work) if server_calls is not None else None
        self.replies.server = self.server
        self.simple = SimpleQueries(backend, self.replies, self.server, self.work)
        self.extended = ExtendedQueries(backend, self.replies, self.server, self.work, self.statements)
        self.rows = RowInserts(info, server_calls, self.replies, self.work, self.inserts)

    # ------------------------------------------------------------------ which messages

    def wants(self, msg_type: int, body: bytes, marked: bool | None = None) -> bool:
        if msg_type != pg.BIND:
            self.rows.batch_parse = None  # something of the client's goes between a Parse and its Bind
        if msg_type == pg.QUERY:
            if _names_ours(body) if marked is None else marked:
                return True
            if self.server is not None:
                self.server.unread = (msg_type, body)
            return self._may_keep_before(body, copy=True)
        if msg_type == pg.PARSE:
            if _names_ours(body) if marked is None else marked:
                return True
            if self.server is not None:
                self.server.unread = (msg_type, body)
            name = cstring_at(body, 0) if self.statements or self.inserts else None
            if name is not None:  # that name now means another statement
                self.statements.pop(name, None)
                self.inserts.pop(name, None)
            return self._may_keep_before(body, copy=False)
        if not self.statements and not self.inserts:
            return False
        if msg_type == pg.BIND:  # also asked with only the first bytes of a long Bind (Framer.peek)
            portal_end = body.find(b"\0")
            name = cstring_at(body, portal_end + 1) if portal_end >= 0 else None
            # unreadable: handle() forwards it as it is
            return name is None or name in self.statements or name in self.inserts
        if msg_type == pg.DESCRIBE:
            return body[:1] == b"S"
        name = cstring_at(body, 1) if msg_type == pg.CLOSE and body[:1] == b"S" else None
        if name is not None:
            self.statements.pop(name, None)
            self.inserts.pop(name, None)
        return False

    def _may_keep_before(self, body: bytes, *, copy: bool) -> bool:
        """Whether a Query or Parse that names no azure_local_ai function may be a one-row INSERT into a
        table whose generated column embeds, or (`copy`, a Query) a COPY FROM STDIN: the cheap test
        (rowinserts.py, copyreading.py read it)."""
        if self.server is None or len(body) > KEEP_BEFORE_MAX:
            return False
        names = self.server.calls.tables.names(self.info.database)
        lowered = body.lower()
        if copy and b"copy" in lowered and b"stdin" in lowered:  # into any table (copyreading.py)
            return True
        return b"insert" in lowered and any(name in lowered for name in names)

    def markers(self) -> list[bytes]:
        """What the relay thread stops at in a Query or Parse: the schema's name, azure.extensions
        (azuresettings.py), the names of the tables whose one-row INSERTs this hook answers before they
        run, and COPY FROM STDIN's."""
        if self.server is None:
            return [self.marker, azuresettings.MARKER]
        return [self.marker, azuresettings.MARKER, b"stdin", *self.server.calls.tables.names(self.info.database)]

    def resting(self) -> list[bytes] | None:
        busy = self.replies.watching or (self.server is not None and self.server.lookaheads) or self.work.busy
        if busy:
            return None
        return [name.encode("utf-8", errors="surrogateescape") for name in (*self.statements, *self.inserts)]

    def passed(self, msg_type: int, body: bytes) -> None:
        if self.server is not None:
            self.server.unread = (msg_type, body)

    def observe(self, msg_type: int, body: bytes | None) -> None:
        if self.server is not None:
            self.server.copies.observe(msg_type, body)

    def notice(self, body: bytes, control: SessionControl) -> bool:
        return self.server is not None and self.server.notice(body, control)

    # ------------------------------------------------------------------ which path

    async def handle(self, msg_type: int, body: bytes, control: SessionControl) -> None:
        try:
            if msg_type == pg.QUERY:
                await self._query(body, control)
            elif msg_type == pg.PARSE:
                await self._parse(Parse.decode(body), control)
            elif msg_type == pg.BIND:
                bind = Bind.decode(body)
                prepared = self.statements.get(bind.statement)
                if prepared is None:
                    await self.rows.bind(bind, control)
                else:
                    await self.extended.bind(bind, prepared, control)
            else:
                self.extended.describe(body, control)
        except ProtocolViolation:
            # A malformed message (raised before anything of it went upstream): the server answers it
            # as PostgreSQL does, with an ERROR, and the session goes on.
            control.forward(msg_type, body)

    async def _query(self, body: bytes, control: SessionControl) -> None:
        # A long statement is read as its bytes, in a worker thread, a window at a time (strings.py):
        # decoding it whole would hold the GIL, and the other sessions, for a long while.
        long = len(body) >= LONG_STATEMENT
        text = await asyncio.to_thread(long_query_text, body) if long else query_text(body)
        if text is None:
            control.forward(pg.QUERY, body)
            return
        if not long and azuresettings.mentions(body):
            await define_azure_settings(control)
        if long or mentions_schema(body):
            await self.simple.query(body, text, control)
            return
        # wanted as a one-row INSERT or a COPY (_may_keep_before)
        if self.server is not None and (copy := copy_from_stdin(text)) is not None:
            await self.server.copies.query(copy, body, control)
        else:
            await self.rows.query(body, text, control)

    async def _parse(self, parse: Parse, control: SessionControl) -> None:
        self.statements.pop(parse.statement, None)
        self.inserts.pop(parse.statement, None)
        if not _is_utf8(parse.query):
            control.forward(pg.PARSE, parse.encode())  # the server refuses it (22021)
            return
        if azuresettings.mentions(parse.query.encode()):
            await define_azure_settings(control)
        if mentions_schema(parse.query.encode()):
            await self.extended.parse(parse, control)
        else:  # wanted as a one-row INSERT (_may_keep_before)
            self.rows.parse(parse, control)

    # ------------------------------------------------------------------ the session's end

    def cancel(self) -> None:
        self.work.cancel()
        if self.server is not None:
            self.server.cancel()

    def close(self) -> None:
        self.work.cancel()
        if self.server is not None:
            self.server.close()
