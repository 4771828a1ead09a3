"""What the paths a statement can take share: reading a message's SQL, the session queries a call may
need first (the caller's rights, azure.extensions, standard_conforming_strings as the server will
read the statement), the local work a cancel request stops, and running a statement's calls."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
from collections.abc import Awaitable, Sequence
from typing import AnyStr, TypeVar

from .. import protocol as pg
from ..capture import QueryFailed
from ..hooks import SessionControl
from . import azuresettings
from .errors import CANCELLED, CallError
from .functions import BUILTIN_URI, Backend
from .replies import ReplyWatcher
from .sqlcalls import CallSite
from .strings import WINDOW, plain_literals_as_escape_strings

#: Run in the client's session, under its search_path: every operator is named as pg_catalog's, so
#: that no operator of the session's schemas can answer for it.
PRIVILEGE_CHECK = (
    "SELECT coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) "
    "current_user), false) OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) "
    "ANY (ARRAY['azure_pg_admin', 'azure_local_ai_setting_manager']::pg_catalog.name[]) "
    "AND pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER'))"
)
LONG_STATEMENT = 1 << 20
T = TypeVar("T")


def denied(function: str) -> CallError:
    return CallError(
        "42501", f"permission denied for function azure_local_ai.{function}",
        "Only superusers and members of azure_pg_admin or azure_local_ai_setting_manager may change "
        "settings and models.",
    )


def cstring_at(body: bytes, pos: int) -> str | None:
    """The NUL-terminated string at `pos`; None when there is none (the server will say so)."""
    end = body.find(b"\0", pos)
    return None if end < 0 else body[pos:end].decode("utf-8", errors="surrogateescape")


def query_text(body: bytes) -> str | None:
    """A Query's SQL, or None when it is not one NUL-terminated UTF-8 string: such a message goes to
    the server as it came, and the server answers it as it would without the proxy (08P01, 22021)."""
    end = len(body) - 1
    if end < 0 or body[end] != 0 or body.find(b"\0", 0, end) >= 0:
        return None
    try:
        return codecs.utf_8_decode(memoryview(body)[:end], "strict", True)[0]  # no copy of a long body first
    except UnicodeDecodeError:
        return None


def long_query_text(body: bytes) -> bytes | None:
    """`query_text` for a long Query, which stays bytes: checked to be one NUL-terminated UTF-8
    string a window at a time (run in a worker thread, which lets the event loop in between)."""
    end = len(body) - 1
    if end < 0 or body[end] != 0:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for start in range(0, end, WINDOW):
            piece = body[start : min(end, start + WINDOW)]
            if piece.find(b"\0") >= 0:
                return None
            decoder.decode(piece)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return None
    return body


def from_server(exc: QueryFailed) -> CallError:
    """The error of the proxy's own query (or of waiting for the server), as the call's error."""
    return CallError(exc.fields.get("C", "XX000"), exc.fields.get("M", ""), exc.fields.get("H"))


async def breathe(size: int) -> None:
    """Between the steps of work on a long statement (each a C call over all of it, which holds the
    GIL), let the event loop serve the other sessions."""
    if size >= LONG_STATEMENT:
        await asyncio.sleep(0)


class LocalWork:
    """The local work under way on the session's statement (its calls, computing answers before it):
    what a CancelRequest, or the session's end, stops."""

    def __init__(self) -> None:
        self._work: asyncio.Task[object] | None = None  # the task in cancellable, which cancel() stops
        self._cancel_asked = False

    @property
    def busy(self) -> bool:
        return self._work is not None and not self._work.done()

    async def cancellable(self, work: Awaitable[object]) -> object:
        """Run local work so that a CancelRequest (or the session's end) can stop it: in the task that
        awaits it (a task of its own would cost a turn of the event loop, on the way of every one-row
        INSERT's answer), which cancel() cancels, and which goes on with the error 57014."""
        task = asyncio.current_task()
        assert task is not None
        self._work = task
        try:
            return await work
        except asyncio.CancelledError:
            if self._cancel_asked:
                self._cancel_asked = False
                if task.uncancel() == 0:  # else the session's end cancelled it too
                    raise CANCELLED from None
            raise
        finally:
            self._work = None
            if self._cancel_asked:  # the work kept the cancel to itself: none is pending for this task
                self._cancel_asked = False
                task.uncancel()

    def cancel(self) -> None:
        if self._work is not None and not self._cancel_asked:
            self._cancel_asked = True
            self._work.cancel()


async def as_the_server_reads(sql: AnyStr, control: SessionControl) -> AnyStr:
    """`sql` written so that pglast reads it as the session's server will: where plain string
    constants hold backslashes, that depends on standard_conforming_strings as it will be when
    the server reads this message, so wait for the server's answers to what went before (their
    ParameterStatus reports any change) and, with the setting off, mark them E'' (strings.py).
    A long statement's bytes are read in a worker thread."""
    if isinstance(sql, bytes):
        escaped = await asyncio.to_thread(plain_literals_as_escape_strings, sql)
    else:
        escaped = plain_literals_as_escape_strings(sql)
    if escaped is None:
        return sql
    if control.in_batch:
        raise CallError(
            "55000", "a statement that calls azure_local_ai with a backslash in a plain string constant cannot be "
            "prepared in the middle of a pipeline",
            "Send it after a Sync, or write the constant as E'...' or with dollar quotes.")
    try:
        await control.settled()
    except QueryFailed as exc:
        raise from_server(exc) from exc
    return escaped if control.server_parameters.get("standard_conforming_strings") == "off" else sql


def tell_if_warming(backend: Backend, control: SessionControl) -> None:
    """While the built-in model is prepared at start-up, a call waits for it: say so, rather than
    stall in silence. Only between the server's replies, where a message of ours cannot split one."""
    warming = backend.warming
    if warming is not None and control.outstanding == 0:
        control.send_client(pg.notice_response(
            f"azure-local-ai-proxy: the built-in model {BUILTIN_URI} is being {warming} (once, at start-up); "
            "this call waits for it"))


async def define_azure_settings(control: SessionControl) -> None:
    """Define azure.extensions in the session where the server lacks it (azuresettings.py). Where
    the proxy cannot wait for the server (inside a pipeline) the statement goes as it is."""
    if control.in_batch:
        return
    with contextlib.suppress(QueryFailed):
        await control.query(azuresettings.DEFINE)


async def privileged(control: SessionControl) -> bool:
    """Ask the server, as the session's current user, whether it may change settings and models."""
    try:
        rows = await control.query(PRIVILEGE_CHECK)
    except QueryFailed as exc:
        raise from_server(exc) from exc
    return rows == [("t",)]


def fail_query(replies: ReplyWatcher, control: SessionControl, before: str, error: CallError) -> None:
    """Send `before` (statements that run first), then one that fails with a marker."""
    marker = replies.expect_failure(control, error)
    failing = before + f"SELECT '{marker}'::pg_catalog.int4"
    control.forward(pg.QUERY, failing.encode() + b"\0")


def runs(calls: Sequence[CallSite]) -> list[list[CallSite]]:
    """The calls of a statement in the order they run: consecutive create_embeddings calls together (so
    that they share model runs: a multi-row INSERT, several columns), any other call alone (it may
    change what the next one sees: a setting, a model)."""
    out: list[list[CallSite]] = []
    for call in calls:
        if call.function == "create_embeddings" and out and out[-1][0].function == "create_embeddings":
            out[-1].append(call)
        else:
            out.append([call])
    return out


async def together(works: list[Awaitable[T]]) -> list[T]:
    """The works' results, in order, worked out at once; the first to fail, in order, is raised, and
    the others are cancelled."""
    tasks = [asyncio.ensure_future(work) for work in works]
    try:
        return [await task for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
