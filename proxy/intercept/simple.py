"""The simple-protocol path of a Query that names azure_local_ai: its text is parsed; each call the proxy
evaluates runs locally and is replaced by its value as a literal, and each statement about the
extension by what it runs as, and the rewritten text goes to the server, which produces the rows,
types, command tags and transaction semantics. Calls the server evaluates have their texts read ahead
(serverpath.py).

A call that fails makes the server fail at the same point: the statements before its own go (rewritten),
then one that carries a marker, whose error is replaced by the call's own (replies.py)."""

from __future__ import annotations

import asyncio

from .. import protocol as pg
from ..hooks import SessionControl
from .common import (
    LONG_STATEMENT,
    LocalWork,
    as_the_server_reads,
    breathe,
    denied,
    fail_query,
    privileged,
    runs,
    tell_if_warming,
    together,
)
from .errors import CallError
from .evaluate import replacement
from .functions import Backend
from .render import splice, splice_parts
from .replies import ReplyWatcher
from .serverpath import ServerPath
from .signatures import PRIVILEGED
from .sqlcalls import Statement, find_calls

_TRANSACTION_ENDS = ("rollback", "commit", "abort", "end")
_NO_SERVER_CALLS = CallError(
    "0A000", "CREATE EXTENSION azure_local_ai needs the proxy's service login, and it has none",
    "The extension's functions are answered by the proxy through a login of its own: set service_user "
    "(and service_password) in the proxy's configuration, with server_calls on.")


class SimpleQueries:
    """One per session; see the module docstring."""

    def __init__(self, backend: Backend, replies: ReplyWatcher, server: ServerPath | None, work: LocalWork) -> None:
        self.backend = backend
        self.replies = replies
        self.server = server
        self.work = work

    async def query(self, body: bytes, text: str | bytes, control: SessionControl) -> None:
        """A Query (`body`, read as `text`; bytes for a long one, see common.long_query_text)."""
        long = len(body) >= LONG_STATEMENT
        try:
            sql = await as_the_server_reads(text, control)
            statements = await asyncio.to_thread(find_calls, sql) if long else find_calls(sql)
        except CallError as exc:
            fail_query(self.replies, control, "", exc)
            return
        await breathe(len(body))
        if any(s.server_calls for s in statements):
            self.replies.hint_missing_extension(control)
            stopped = await self.server.look_ahead(statements, control) if self.server is not None else None
            if stopped is not None:
                fail_query(self.replies, control, "", stopped)
                return
        if not any(s.calls or s.extension for s in statements) or (
            control.transaction_status == "E" and not _ends_transaction(sql, statements)
        ):
            control.forward(pg.QUERY, body)  # nothing of ours, or the server will refuse it anyway (25P02)
            return
        tell_if_warming(self.backend, control)
        try:
            replacements = await self.work.cancellable(self._rewrite(sql, statements, control))
        except _StatementFailed as failure:
            fail_query(self.replies, control, failure.before, failure.error)
            return
        except CallError as error:
            fail_query(self.replies, control, "", error)
            return
        await breathe(len(body))
        if isinstance(sql, bytes):  # with its NUL
            control.forward_parts(pg.QUERY, splice_parts(memoryview(sql), replacements))
        elif sql is text and text.isascii():  # offsets in the text are offsets in the bytes: splice those
            control.forward_parts(pg.QUERY, splice_parts(memoryview(body), replacements))
        else:
            control.forward(pg.QUERY, splice(sql, replacements).encode() + b"\0")

    async def _rewrite(
        self, sql: str | bytes, statements: list[Statement], control: SessionControl
    ) -> list[tuple[int, int, str]]:
        """Run the calls; what replaces each (start, end) span of `sql`."""
        replacements: list[tuple[int, int, str]] = []
        checked = False
        for index, statement in enumerate(statements):
            if statement.extension is not None:
                if statement.extension.tag == "CREATE EXTENSION" and self.server is None:
                    raise _StatementFailed(_spliced(sql[: statement.start], replacements), _NO_SERVER_CALLS)
                replacements.append((statement.start, statement.end, statement.extension.sql))
                self.replies.retag(control, index, statement.extension.tag)
                continue
            for group in runs(statement.calls):
                try:
                    if group[0].function in PRIVILEGED and not checked:
                        if not await privileged(control):
                            raise denied(group[0].function)
                        checked = True
                    texts = await together([replacement(call, self.backend) for call in group])
                except CallError as error:
                    # Earlier statements run (rewritten); this one fails; later ones never start.
                    raise _StatementFailed(_spliced(sql[: statement.start], replacements), error) from error
                replacements += [(call.start, call.end, text) for call, text in zip(group, texts, strict=True)]
        return replacements


class _StatementFailed(Exception):
    """A call failed; `before` is the text of the statements before its own, rewritten."""

    def __init__(self, before: str, error: CallError) -> None:
        super().__init__(error.message)
        self.before = before
        self.error = error


def _ends_transaction(sql: str | bytes, statements: list[Statement]) -> bool:
    return any(_head(sql[s.start : min(s.end, s.start + 4096)]).lstrip().lower().startswith(_TRANSACTION_ENDS)
               for s in statements)


def _head(part: str | bytes) -> str:
    return part if isinstance(part, str) else part.decode(errors="replace")


def _spliced(sql: str | bytes, replacements: list[tuple[int, int, str]]) -> str:
    """`sql` with the replacements made, as text (the statements before a failing one)."""
    if isinstance(sql, str):
        return splice(sql, replacements)
    return b"".join(splice_parts(memoryview(sql), replacements)).decode()
