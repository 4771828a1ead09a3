"""The session's side of the calls the server evaluates (extension.py, servercalls.py), orchestrated
along its statements: a statement whose calls the server evaluates has their texts read ahead until
its batch ends; a request arriving while a statement that names no azure_local_ai function runs
(a generated column asks) makes the proxy read ahead for the tables it writes, or learn that a
one-row INSERT's or a COPY's table embeds (its next ones are answered before they run: rowinserts.py,
copyreading.py); and each batch's end ends what was started for it."""

from __future__ import annotations

import asyncio

from .. import protocol as pg
from ..hooks import SessionControl, SessionInfo
from ..messages import Parse
from ..protocol import ProtocolViolation
from .common import LocalWork, query_text
from .copyreading import CopyReading
from .copyrows import copy_from_stdin
from .errors import CallError
from .lookahead import one_row_insert
from .replies import ReplyWatcher
from .servercalls import ServerCalls
from .sqlcalls import Statement

#: One-row INSERTs up to this long are read for the texts their tables' generated columns embed.
KEEP_BEFORE_MAX = 1 << 16


class ServerPath:
    """One per session with a mailbox (server_calls on); see the module docstring."""

    def __init__(self, info: SessionInfo, calls: ServerCalls, replies: ReplyWatcher, work: LocalWork) -> None:
        self.info = info
        #: Answers the calls the server evaluates.
        self.calls = calls
        self.replies = replies
        self.work = work
        self.copies = CopyReading(info, calls, replies, self.track)
        self.lookaheads: list[tuple[int, asyncio.Task[None]]] = []  # (batch, task) until the batch ends
        #: The latest Query or Parse that did not name azure_local_ai: if the server asks while it runs,
        #: the generated columns of the tables it writes are what ask (_look_ahead_written).
        self.unread: tuple[int, bytes] | None = None
        self._closing: asyncio.Task[None] | None = None

    def track(self, batch: int, task: asyncio.Task[None]) -> None:
        """Work read ahead for batch `batch`: cancelled when the batch ends, or the session does."""
        self.lookaheads.append((batch, task))

    async def look_ahead(self, statements: list[Statement], control: SessionControl) -> CallError | None:
        """Embed ahead what the server's calls in these statements will ask for, until their batch ends.
        A statement that locks the table it reads (ALTER TABLE) waits until its texts are read: the
        error if it was cancelled meanwhile."""
        found = [lookahead for s in statements for lookahead in s.lookaheads]
        started = self.calls.ahead.look_ahead(found) if control.transaction_status != "E" else None
        if started is None:
            return None
        task, read = started
        self.track(control.requests_sent, task)
        self.replies.watch(control)
        if any(lookahead.before for lookahead in found):
            try:
                await self.work.cancellable(asyncio.wait([read]))
            except CallError as error:
                return error
        return None

    def notice(self, body: bytes, control: SessionControl) -> bool:
        """A NoticeResponse from the server: True if it was a request of the extension's functions
        (then the statement's end, ReadyForQuery, is watched for: the mailbox goes with it)."""
        if not self.calls.notice(body):
            return False
        self.replies.watch(control)
        # From the second request on: a statement that asks once (a one-row INSERT) has its answer under
        # way already, and reading ahead would only take time from it.
        if self.unread is not None and not self.lookaheads and self.calls.asked_in_statement > 1:
            self._look_ahead_written(*self.unread, control)
        elif self.unread is not None and self.calls.asked_in_statement == 1:
            self._learn_table(*self.unread)
        return True

    def _learn_table(self, msg_type: int, body: bytes) -> None:
        """The server asks during a statement that names no azure_local_ai function: if it is a one-row
        INSERT or a COPY, the table it writes embeds in a generated column (EmbeddingTables). A COPY's
        rows still to come are read as they go, once the table is looked up (copyreading.py)."""
        if len(body) > KEEP_BEFORE_MAX:
            return
        try:
            sql = query_text(body) if msg_type == pg.QUERY else Parse.decode(body).query
        except ProtocolViolation:
            return
        found = one_row_insert(sql) if sql is not None else None
        if found is not None:
            self.calls.learn_table(found[1])
            return
        copy = copy_from_stdin(sql) if sql is not None and msg_type == pg.QUERY else None
        looking = self.calls.learn_table(copy.table) if copy is not None and not self.copies.reading else None
        if looking is not None:
            statement = self.replies.answered
            looking.add_done_callback(lambda _: self.copies.midway(copy, statement))  # type: ignore[arg-type]

    def _look_ahead_written(self, msg_type: int, body: bytes, control: SessionControl) -> None:
        """The server asks during a statement that names no azure_local_ai function: read ahead for the
        generated columns of the tables it writes, once."""
        self.unread = None
        try:
            sql = query_text(body) if msg_type == pg.QUERY else Parse.decode(body).query
        except ProtocolViolation:
            return
        plain_backslashes = control.server_parameters.get("standard_conforming_strings") == "off"
        if sql is None or (plain_backslashes and "\\" in sql):  # read otherwise than pglast reads it
            return
        task = self.calls.ahead.look_ahead_written(sql)
        if task is not None:
            self.track(self.replies.answered, task)

    def cancel(self) -> None:
        """A client's CancelRequest while a statement with calls the server evaluates runs (it has asked,
        or is read ahead for): what is read ahead for it stops, and its calls are answered with the
        cancel's error (ServerCalls.cancel). Between statements there is nothing to cancel, as for the
        server: the next statement must not be. (The relay's own view of idleness would race: a client
        may send its query and, on another connection, its cancel, which the proxy may read first.)"""
        if not self.lookaheads and not self.calls.asked_in_statement:
            return
        for _, task in self.lookaheads:
            task.cancel()
        self.calls.cancel()

    def cancelled_error(self, body: bytes) -> bytes | None:
        return self.calls.cancelled_error(body)

    def batch_ended(self, answered: int, idle: bool) -> bool:
        """A ReadyForQuery (ReplyWatcher): a COPY's reading ends, and what was read ahead for the
        batches it ends; `idle` (no transaction), the transaction's mailboxes go too. Whether anything
        is left to watch the server's replies for."""
        self.copies.stop()
        self.calls.statement_done(idle)
        for batch, task in self.lookaheads:
            if batch < answered:
                task.cancel()
        self.lookaheads = [(b, t) for b, t in self.lookaheads if b >= answered]
        return bool(self.lookaheads) or self.calls.mailboxes.in_transaction

    def close(self) -> None:
        for _, task in self.lookaheads:
            task.cancel()
        # its mailbox, if a statement was cut short with it open
        self._closing = asyncio.get_running_loop().create_task(self.calls.close())
