"""The session hook that answers azure_local_ai calls, in both query protocols.

Simple protocol: a Query whose text mentions the schema is parsed; each call runs locally and is
replaced by its value as a literal, and the rewritten text goes to the server, which produces the
rows, types, command tags and transaction semantics. Extended protocol: see prepared.py.

A call that fails makes the server fail at the same point (a statement, or a Bind, carrying a
marker), and the server's error is replaced by the call's own: statements before it run, those after
it do not, and the transaction ends up aborted on both sides, exactly as with a real function error."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import AnyStr, NamedTuple, TypeVar

from .. import protocol as pg
from ..hooks import SessionControl, SessionInfo
from ..messages import Bind, Parse, describe_target, encode_parameter_description, parameter_description
from ..protocol import ProtocolViolation
from ..relay import QueryFailed
from ..stats import STATS
from . import azuresettings
from .copyrows import CopyFrom, CopyRows, copy_from_stdin
from .errors import CallError
from .evaluate import parameter, replacement
from .functions import BUILTIN_URI, Backend
from .handover import (
    CLOSE_REPLIES,
    PREPARE_REPLIES,
    QUERY_REPLIES,
    RUN_REPLIES,
    InjectedReplies,
    close_before_bind,
    prefix_length,
    prepare_before_bind,
    query_with,
    run_before_bind,
    settings_sql,
    shift_position,
)
from .lookahead import RowInput, one_row_insert, row_inputs
from .prepared import PreparedCalls, bind_values, failing_bind, rewrite_parse
from .render import splice, splice_parts
from .servercalls import ServerCalls
from .signatures import PRIVILEGED
from .sqlcalls import SCHEMA_MARKER, CallSite, Statement, find_calls, mentions_schema
from .strings import WINDOW, plain_literals_as_escape_strings

log = logging.getLogger("azure_local_ai_proxy.intercept")

#: Run in the client's session, under its search_path: every operator is named as pg_catalog's, so
#: that no operator of the session's schemas can answer for it.
PRIVILEGE_CHECK = (
    "SELECT coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) "
    "current_user), false) OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) "
    "ANY (ARRAY['azure_pg_admin', 'azure_local_ai_setting_manager']::pg_catalog.name[]) "
    "AND pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER'))"
)
_TRANSACTION_ENDS = ("rollback", "commit", "abort", "end")
LONG_STATEMENT = 1 << 20
#: One-row INSERTs up to this long are read for the texts their tables' generated columns embed.
KEEP_BEFORE_MAX = 1 << 16
_TEXT_TYPES = frozenset({0, 25, 1043})  # unknown, text, varchar: a binary value of these is its text
_COPY_TYPES = frozenset({pg.COPY_DATA, pg.COPY_DONE, pg.COPY_FAIL})
LOOK_UP_WAIT = 2.0
T = TypeVar("T")
_CANCELLED = CallError("57014", "canceling statement due to user request")
_NO_SERVER_CALLS = CallError(
    "0A000", "CREATE EXTENSION azure_local_ai needs the proxy's service login, and it has none",
    "The extension's functions are answered by the proxy through a login of its own: set service_user "
    "(and service_password) in the proxy's configuration, with server_calls on.")
_MISSING_EXTENSION_HINT = (
    "The server evaluates this call (an argument is a column or another value only the server knows, or the "
    "statement stores the expression): run CREATE EXTENSION azure_local_ai through azure-local-ai-proxy first.")


def _denied(function: str) -> CallError:
    return CallError(
        "42501", f"permission denied for function azure_local_ai.{function}",
        "Only superusers and members of azure_pg_admin or azure_local_ai_setting_manager may change "
        "settings and models.",
    )


def _cstring_at(body: bytes, pos: int) -> str | None:
    """The NUL-terminated string at `pos`; None when there is none (the server will say so)."""
    end = body.find(b"\0", pos)
    return None if end < 0 else body[pos:end].decode("utf-8", errors="surrogateescape")


def _query_text(body: bytes) -> str | None:
    """A Query's SQL, or None when it is not one NUL-terminated UTF-8 string: such a message goes to
    the server as it came, and the server answers it as it would without the proxy (08P01, 22021)."""
    end = len(body) - 1
    if end < 0 or body[end] != 0 or body.find(b"\0", 0, end) >= 0:
        return None
    try:
        return codecs.utf_8_decode(memoryview(body)[:end], "strict", True)[0]  # no copy of a long body first
    except UnicodeDecodeError:
        return None


def _names_ours(body: bytes) -> bool:
    """Whether a statement names the schema or azure.extensions (azuresettings.py): the body is lowered
    once for both, as every Query and Parse of a hooked session is looked at here."""
    lowered = body.lower()
    return SCHEMA_MARKER in lowered or azuresettings.MARKER in lowered


def _from_server(exc: QueryFailed) -> CallError:
    """The error of the proxy's own query (or of waiting for the server), as the call's error."""
    return CallError(exc.fields.get("C", "XX000"), exc.fields.get("M", ""), exc.fields.get("H"))


async def _breathe(size: int) -> None:
    """Between the steps of work on a long statement (each a C call over all of it, which holds the
    GIL), let the event loop serve the other sessions."""
    if size >= LONG_STATEMENT:
        await asyncio.sleep(0)


def _is_utf8(text: str) -> bool:
    """False for text decoded with surrogateescape from bytes that were not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class InterceptHook:
    """One per session; see the module docstring."""

    message_types = frozenset({pg.QUERY, pg.PARSE, pg.BIND, pg.DESCRIBE, pg.CLOSE})
    marker = SCHEMA_MARKER

    def __init__(self, info: SessionInfo, backend: Backend, server_calls: ServerCalls | None = None) -> None:
        self.info = info
        self.backend = backend
        #: Answers the calls the server evaluates; None where sessions get no mailbox (server_calls off).
        self.server_calls = server_calls
        self.statements: dict[str, PreparedCalls] = {}
        self._work: asyncio.Task[object] | None = None
        # What the server-reply watcher looks for: marker -> (batch, error), and the Describe
        # statement requests awaiting their ParameterDescription: (batch, extra parameters).
        self._markers: dict[bytes, tuple[int, bytes]] = {}
        self._describes: deque[tuple[int, int]] = deque()
        # (batch, statement) -> the CommandComplete the client sees (extension statements run as DO);
        # and the batches whose "no such schema/function azure_local_ai" error gets a hint.
        self._tags: dict[tuple[int, int], bytes] = {}
        self._completed = 0
        self._hinted: set[int] = set()
        self._closing: asyncio.Task[None] | None = None
        self._answered = 0
        self._watching = False
        self._control: SessionControl | None = None
        self._lookaheads: list[tuple[int, asyncio.Task[None]]] = []  # (batch, task) until the batch ends
        #: The latest Query or Parse that did not name azure_local_ai: if the server asks while it runs,
        #: the generated columns of the tables it writes are what ask (_look_ahead_written).
        self._unread: tuple[int, bytes] | None = None
        #: Prepared one-row INSERTs into tables whose generated columns embed: what they embed, the
        #: statement's parameter types, and whether an answer may be handed over (_keep_before).
        self.inserts: dict[str, _PreparedInsert] = {}
        self._handing_over: InjectedReplies | None = None  # the server's replies to the proxy's settings, to drop
        #: A one-row INSERT's Parse that opened its batch (the batch, the statement), until another of the
        #: client's messages is seen: its Bind may then have the answer handed over (_keep_before).
        self._batch_parse: tuple[int, str] | None = None
        #: The length of the proxy's statement put in front of the Query under way, if any: the positions
        #: in its errors are moved back by it (handover.shift_position).
        self._shifted = 0
        #: A COPY FROM STDIN into a table whose generated columns embed: its rows, read as they go
        #: upstream, and the model of each input read (_copy_rows).
        self._copying: tuple[CopyRows, list[str]] | None = None

    # ------------------------------------------------------------------ which messages

    def wants(self, msg_type: int, body: bytes, marked: bool | None = None) -> bool:
        if msg_type != pg.BIND:
            self._batch_parse = None  # something of the client's goes between a Parse and its Bind
        if msg_type == pg.QUERY:
            if _names_ours(body) if marked is None else marked:
                return True
            self._unread = (msg_type, body) if self.server_calls is not None else None
            return self._may_keep_before(body, copy=True)
        if msg_type == pg.PARSE:
            if _names_ours(body) if marked is None else marked:
                return True
            self._unread = (msg_type, body) if self.server_calls is not None else None
            name = _cstring_at(body, 0) if self.statements or self.inserts else None
            if name is not None:  # that name now means another statement
                self.statements.pop(name, None)
                self.inserts.pop(name, None)
            return self._may_keep_before(body, copy=False)
        if not self.statements and not self.inserts:
            return False
        if msg_type == pg.BIND:  # also asked with only the first bytes of a long Bind (Framer.peek)
            portal_end = body.find(b"\0")
            name = _cstring_at(body, portal_end + 1) if portal_end >= 0 else None
            # unreadable: handle() forwards it as it is
            return name is None or name in self.statements or name in self.inserts
        if msg_type == pg.DESCRIBE:
            return body[:1] == b"S"
        name = _cstring_at(body, 1) if msg_type == pg.CLOSE and body[:1] == b"S" else None
        if name is not None:
            self.statements.pop(name, None)
            self.inserts.pop(name, None)
        return False

    def _may_keep_before(self, body: bytes, *, copy: bool) -> bool:
        """Whether a Query or Parse that names no azure_local_ai function may be a one-row INSERT into a
        table whose generated column embeds, or (`copy`, a Query) a COPY FROM STDIN: the cheap test
        (_row_inputs, copy_from_stdin read it)."""
        if self.server_calls is None or len(body) > KEEP_BEFORE_MAX:
            return False
        names = self.server_calls.tables.names(self.info.database)
        lowered = body.lower()
        if copy and b"copy" in lowered and b"stdin" in lowered:  # into any table (_copy_rows)
            return True
        return b"insert" in lowered and any(name in lowered for name in names)

    def markers(self) -> list[bytes]:
        """What the relay thread stops at in a Query or Parse: the schema's name, azure.extensions
        (azuresettings.py), the names of the tables whose one-row INSERTs this hook answers before they
        run, and COPY FROM STDIN's."""
        if self.server_calls is None:
            return [self.marker, azuresettings.MARKER]
        return [self.marker, azuresettings.MARKER, b"stdin", *self.server_calls.tables.names(self.info.database)]

    def resting(self) -> list[bytes] | None:
        busy = self._watching or self._lookaheads or (self._work is not None and not self._work.done())
        if busy:
            return None
        return [name.encode("utf-8", errors="surrogateescape") for name in (*self.statements, *self.inserts)]

    def passed(self, msg_type: int, body: bytes) -> None:
        self._unread = (msg_type, body) if self.server_calls is not None else None

    def observe(self, msg_type: int, body: bytes | None) -> None:
        """The client's COPY data on its way upstream: the inputs of its rows are computed ahead. A
        message too long to read here ends the reading (the rows after it ask as they run)."""
        if self._copying is None or self.server_calls is None:
            return
        rows, models = self._copying
        if body is None:
            self._stop_copying()
            return
        if msg_type == pg.COPY_DATA:
            read = rows.feed(body)
        else:  # CopyDone, CopyFail: no more rows come
            read = rows.finish() if msg_type == pg.COPY_DONE else []
            self._stop_copying()
        inputs = [(model, text) for row in read for model, text in zip(models, row, strict=True) if text is not None]
        task = self.server_calls.copy_ahead(inputs) if inputs else None
        if task is not None:
            self._lookaheads.append((self._answered, task))

    async def handle(self, msg_type: int, body: bytes, control: SessionControl) -> None:
        self._control = control
        try:
            if msg_type == pg.QUERY:
                await self._query(body, control)
            elif msg_type == pg.PARSE:
                await self._parse(Parse.decode(body), control)
            elif msg_type == pg.BIND:
                await self._bind(Bind.decode(body), control)
            else:
                self._describe(body, control)
        except ProtocolViolation:
            # A malformed message (raised before anything of it went upstream): the server answers it
            # as PostgreSQL does, with an ERROR, and the session goes on.
            control.forward(msg_type, body)

    # ------------------------------------------------------------------ simple protocol

    async def _query(self, body: bytes, control: SessionControl) -> None:
        # A long statement is read as its bytes, in a worker thread, a window at a time (strings.py):
        # decoding it whole would hold the GIL, and the other sessions, for a long while.
        long = len(body) >= LONG_STATEMENT
        text = await asyncio.to_thread(_long_query_text, body) if long else _query_text(body)
        if text is None:
            control.forward(pg.QUERY, body)
            return
        if not long and azuresettings.mentions(body):
            await self._define_azure_settings(control)
        if not long and not mentions_schema(body):  # wanted as a one-row INSERT or a COPY (_may_keep_before)
            copy = copy_from_stdin(text) if self.server_calls is not None else None
            if copy is not None:
                await self._look_up(copy.table)
                self._copy_rows(copy, control)
                control.forward(pg.QUERY, body)
                return
            inputs, handed_over = self._row_inputs(text, control)
            texts = [(i.model_uri, i.text) for i in inputs if i.text is not None]
            kept = await self._keep_before(texts, handed_over, control) if self._goes_before(
                texts, control) else None
            if isinstance(kept, CallError):
                self._fail_query(control, "", kept)
                return
            settings = settings_sql(*kept) if kept is not None else None
            if settings is not None:  # made in the statement's own transaction: put in front of it
                self._handing_over = InjectedReplies(QUERY_REPLIES)
                self._shifted = prefix_length(settings)
                body = query_with(settings, body)
            control.forward(pg.QUERY, body)
            return
        try:
            sql = await self._as_the_server_reads(text, control)
            statements = await asyncio.to_thread(find_calls, sql) if long else find_calls(sql)
        except CallError as exc:
            self._fail_query(control, "", exc)
            return
        await _breathe(len(body))
        if any(s.server_calls for s in statements):
            self._hint_missing_extension(control)
            stopped = await self._look_ahead(statements, control)
            if stopped is not None:
                self._fail_query(control, "", stopped)
                return
        if not any(s.calls or s.extension for s in statements) or (
            control.transaction_status == "E" and not _ends_transaction(sql, statements)
        ):
            control.forward(pg.QUERY, body)  # nothing of ours, or the server will refuse it anyway (25P02)
            return
        self._tell_if_warming(control)
        try:
            replacements = await self._cancellable(self._rewrite(sql, statements, control))
        except _StatementFailed as failure:
            self._fail_query(control, failure.before, failure.error)
            return
        except CallError as error:
            self._fail_query(control, "", error)
            return
        await _breathe(len(body))
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
                if statement.extension.tag == "CREATE EXTENSION" and self.server_calls is None:
                    raise _StatementFailed(_spliced(sql[: statement.start], replacements), _NO_SERVER_CALLS)
                replacements.append((statement.start, statement.end, statement.extension.sql))
                self._retag(control, index, statement.extension.tag)
                continue
            for group in _runs(statement.calls):
                try:
                    if group[0].function in PRIVILEGED and not checked:
                        if not await self._privileged(control):
                            raise _denied(group[0].function)
                        checked = True
                    texts = await _together([replacement(call, self.backend) for call in group])
                except CallError as error:
                    # Earlier statements run (rewritten); this one fails; later ones never start.
                    raise _StatementFailed(_spliced(sql[: statement.start], replacements), error) from error
                replacements += [(call.start, call.end, text) for call, text in zip(group, texts, strict=True)]
        return replacements

    def _fail_query(self, control: SessionControl, before: str, error: CallError) -> None:
        """Send `before` (statements that run first), then one that fails with a marker."""
        marker = self._expect_failure(control, error)
        failing = before + f"SELECT '{marker}'::pg_catalog.int4"
        control.forward(pg.QUERY, failing.encode() + b"\0")

    # ------------------------------------------------------------------ extended protocol

    async def _parse(self, parse: Parse, control: SessionControl) -> None:
        self.statements.pop(parse.statement, None)
        self.inserts.pop(parse.statement, None)
        if not _is_utf8(parse.query):
            control.forward(pg.PARSE, parse.encode())  # the server refuses it (22021)
            return
        if azuresettings.mentions(parse.query.encode()):
            await self._define_azure_settings(control)
        if not mentions_schema(parse.query.encode()):  # wanted as a one-row INSERT (_may_keep_before)
            inputs, handed_over = self._row_inputs(parse.query, control)
            if inputs:
                self.inserts[parse.statement] = _PreparedInsert(inputs, parse.param_types, handed_over)
                if not control.in_batch:  # its Bind may follow in the same batch (an unnamed statement)
                    self._batch_parse = (control.requests_sent, parse.statement)
            control.forward(pg.PARSE, parse.encode())
            return
        try:
            parse = Parse(parse.statement, await self._as_the_server_reads(parse.query, control), parse.param_types)
            statements = find_calls(parse.query, dict(enumerate(parse.param_types, 1)))
        except CallError as exc:
            self._fail_parse(parse, control, exc)
            return
        if any(s.server_calls for s in statements):
            self._hint_missing_extension(control)
            stopped = await self._look_ahead(statements, control)
            if stopped is not None:
                self._fail_parse(parse, control, stopped)
                return
        if any(s.extension for s in statements):
            self._fail_parse(parse, control, CallError(
                "0A000",
                "CREATE, ALTER and DROP EXTENSION azure_local_ai go through azure-local-ai-proxy as simple queries",
                "Send the statement as a plain query (psql does), not as a prepared statement."))
            return
        if not any(s.calls for s in statements):
            control.forward(pg.PARSE, parse.encode())
            return
        privileged_ok: bool | None = None
        if any(c.function in PRIVILEGED for s in statements for c in s.calls) and not control.in_batch:
            try:
                privileged_ok = await self._privileged(control)
            except CallError as error:
                self._fail_parse(parse, control, error)
                return
        try:
            upstream, prepared = rewrite_parse(parse, statements, privileged_ok)
        except CallError as error:
            self._fail_parse(parse, control, error)
            return
        self.statements[parse.statement] = prepared
        control.forward(pg.PARSE, upstream.encode())

    async def _bind_insert(self, bind: Bind, control: SessionControl) -> None:
        """A Bind of a statement that is not the proxy's (a one-row INSERT into a table whose generated
        column embeds, or any other): its inputs are computed first where they can go before it. The
        proxy's statement is prepared at once, so that the server parses it while they are computed."""
        insert = self.inserts.get(bind.statement)
        after_its_parse = self._batch_parse == (control.requests_sent, bind.statement)
        self._batch_parse = None
        inputs = _bound_inputs(bind, insert.inputs, insert.param_types) if insert else []
        if not self._goes_before(inputs, control, after_its_parse=after_its_parse):
            control.cork()  # with the Execute and Sync behind it, in one write
            control.forward(pg.BIND, bind.encode())
            return
        assert insert is not None
        control.send_upstream(prepare_before_bind())
        replies = self._handing_over = InjectedReplies(PREPARE_REPLIES)
        kept = await self._keep_before(inputs, insert.handed_over, control)
        if isinstance(kept, CallError):  # a Bind of a statement that is not there, whose error is replaced
            marker = self._expect_failure(control, kept)
            bind = Bind(bind.portal, marker, bind.param_formats, bind.values, bind.result_formats)
        control.cork()  # the settings, made in the statement's own batch, go in one write with it
        if isinstance(kept, tuple):
            control.send_upstream(run_before_bind(*kept))
        else:
            control.send_upstream(close_before_bind())
        if self._handing_over is replies:  # else an error came already: the server skips the rest
            replies.then(RUN_REPLIES if isinstance(kept, tuple) else CLOSE_REPLIES)
        control.forward(pg.BIND, bind.encode())

    def _fail_parse(self, parse: Parse, control: SessionControl, error: CallError) -> None:
        marker = self._expect_failure(control, error)
        control.forward(pg.PARSE, Parse(parse.statement, f"SELECT '{marker}'::pg_catalog.int4", ()).encode())

    async def _bind(self, bind: Bind, control: SessionControl) -> None:
        prepared = self.statements.get(bind.statement)
        if prepared is None:
            await self._bind_insert(bind, control)
            return
        if len(bind.values) != prepared.client_params:
            self._fail_bind(bind, prepared, control, CallError(
                "08P01", f"bind message supplies {len(bind.values)} parameters, but prepared statement "
                f'"{bind.statement}" requires {prepared.client_params}'))
            return
        if control.transaction_status == "E":
            control.forward(pg.BIND, bind.with_extra_values([(0, None)] * prepared.extra).encode())
            return  # the server refuses it (25P02), as it would the real function
        privileged = [c.function for c in prepared.calls if c.function in PRIVILEGED]
        try:
            if privileged and not prepared.privileged_ok:
                if prepared.privileged_ok is None:
                    raise CallError(
                        "55000", f"azure_local_ai.{privileged[0]} cannot be prepared in the middle of a pipeline",
                        "Send it in a batch of its own (after a Sync), or with the simple query protocol.")
                raise _denied(privileged[0])
            self._tell_if_warming(control)
            values = await self._cancellable(self._values(bind, prepared))
        except CallError as error:
            self._fail_bind(bind, prepared, control, error)
            return
        control.cork()  # with the Execute and Sync behind it, in one write
        control.forward(pg.BIND, bind.with_extra_values([(0, None), *values]).encode())

    async def _values(self, bind: Bind, prepared: PreparedCalls) -> list[tuple[int, bytes | None]]:
        binds = bind_values(bind, prepared)
        values: list[tuple[int, bytes | None]] = []
        for group in _runs(prepared.calls):
            values += await _together([parameter(call, self.backend, binds) for call in group])
        return values

    def _fail_bind(self, bind: Bind, prepared: PreparedCalls, control: SessionControl, error: CallError) -> None:
        failing, marker = failing_bind(Bind(bind.portal, bind.statement, bind.param_formats,
                                            bind.values[: prepared.client_params], bind.result_formats), prepared)
        self._expect_failure(control, error, marker)
        control.forward(pg.BIND, failing.encode())

    def _describe(self, body: bytes, control: SessionControl) -> None:
        _, name = describe_target(body)
        prepared = self.statements.get(name)
        self._describes.append((control.requests_sent, prepared.extra if prepared else 0))
        self._watch(control)
        control.forward(pg.DESCRIBE, body)

    # ------------------------------------------------------------------ shared machinery

    async def _as_the_server_reads(self, sql: AnyStr, control: SessionControl) -> AnyStr:
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
            raise _from_server(exc) from exc
        return escaped if control.server_parameters.get("standard_conforming_strings") == "off" else sql

    def _tell_if_warming(self, control: SessionControl) -> None:
        """While the built-in model is prepared at start-up, a call waits for it: say so, rather than
        stall in silence. Only between the server's replies, where a message of ours cannot split one."""
        warming = self.backend.warming
        if warming is not None and control.outstanding == 0:
            control.send_client(pg.notice_response(
                f"azure-local-ai-proxy: the built-in model {BUILTIN_URI} is being {warming} (once, at start-up); "
                "this call waits for it"))

    async def _define_azure_settings(self, control: SessionControl) -> None:
        """Define azure.extensions in the session where the server lacks it (azuresettings.py). Where
        the proxy cannot wait for the server (inside a pipeline) the statement goes as it is."""
        if control.in_batch:
            return
        with contextlib.suppress(QueryFailed):
            await control.query(azuresettings.DEFINE)

    async def _privileged(self, control: SessionControl) -> bool:
        """Ask the server, as the session's current user, whether it may change settings and models."""
        try:
            rows = await control.query(PRIVILEGE_CHECK)
        except QueryFailed as exc:
            raise _from_server(exc) from exc
        return rows == [("t",)]

    async def _cancellable(self, work: Awaitable[object]) -> object:
        """Run local work so that a CancelRequest (or the session's end) can stop it."""
        self._work = asyncio.ensure_future(work)
        try:
            return await self._work
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            raise _CANCELLED from None
        finally:
            self._work = None

    def _expect_failure(self, control: SessionControl, error: CallError, marker: str | None = None) -> str:
        """Register the marker whose server error is to be replaced by `error`."""
        STATS.error(error.sqlstate, "sql")
        marker = marker or f"azure_local_ai_proxy_error_{secrets.token_hex(8)}"
        replacement_error = pg.error_response(error.sqlstate, error.message, severity="ERROR", hint=error.hint)
        self._markers[marker.encode()] = (control.requests_sent, replacement_error)
        self._watch(control)
        return marker

    def _watch(self, control: SessionControl) -> None:
        self._control = control
        if not self._watching:  # count ReadyForQuery from here on, as the server's replies pass by
            self._answered = control.requests_sent - control.outstanding
            self._watching = True
            control.watch_server(self._on_server_message)

    def _retag(self, control: SessionControl, statement: int, tag: str) -> None:
        self._tags[(control.requests_sent, statement)] = pg.message(pg.COMMAND_COMPLETE, tag.encode() + b"\0")
        self._watch(control)

    def _hint_missing_extension(self, control: SessionControl) -> None:
        self._hinted.add(control.requests_sent)
        self._watch(control)

    def _row_inputs(self, sql: str, control: SessionControl) -> tuple[list[RowInput], bool]:
        """What a one-row INSERT into a table known to embed gives its generated columns (none for any
        other statement), and whether its database reads an answer handed over."""
        assert self.server_calls is not None
        plain_backslashes = control.server_parameters.get("standard_conforming_strings") == "off"
        found = one_row_insert(sql) if not (plain_backslashes and "\\" in sql) else None
        known = self.server_calls.tables.get(self.info.database, self.info.user, found[1]) if found else None
        if found is None or known is None:
            return [], False
        return row_inputs(found[0], known.columns, known.embedded), known.handed_over

    async def _look_up(self, table: str) -> None:
        """Look a table up in the catalog, unless it was lately: whether its generated columns embed
        (a COPY into it waits for that, at most LOOK_UP_WAIT seconds)."""
        assert self.server_calls is not None
        tables = self.server_calls.tables
        if not tables.looked_up_lately(self.info.database, self.info.user, table):
            looking = tables.learn(self.info.database, self.info.user, table)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(looking), LOOK_UP_WAIT)

    def _copy_rows(self, copy: CopyFrom, control: SessionControl, *, midway: bool = False) -> None:
        """Read the rows of a COPY into a table known to embed as they go upstream (observe), where the
        client's data is UTF-8. `midway`: the COPY is under way (its first rows went unread)."""
        assert self.server_calls is not None
        known = self.server_calls.tables.get(self.info.database, self.info.user, copy.table)
        if known is None or control.server_parameters.get("client_encoding", "UTF8").upper() not in ("UTF8", "UTF-8"):
            return
        if midway and copy.format.csv:  # a line end may be inside a quoted field: no place to join at
            return
        names = copy.columns or known.columns
        wanted = [(model, names.index(column)) for model, column in known.embedded if column in names]
        if not wanted:
            return
        rows = CopyRows(copy.format, [index for _, index in wanted], resync=midway)
        self._copying = (rows, [model for model, _ in wanted])
        self._watch(control)  # its end (ReadyForQuery) ends the reading
        control.observe_client(_COPY_TYPES)

    def _stop_copying(self) -> None:
        if self._copying is not None and self._control is not None:
            self._control.observe_client(frozenset())
        self._copying = None

    def _goes_before(self, inputs: list[tuple[str, str]], control: SessionControl, *,
                     after_its_parse: bool = False) -> bool:
        """Whether a statement's inputs may be computed before it goes to the server (_keep_before):
        nothing else of the session is before it, and the proxy's messages can go first in its batch,
        or (`after_its_parse`) right after the statement's Parse that opened it, with nothing of the
        client's seen between: the server's reply to that Parse (ParseComplete, or an error that skips
        the rest) comes before the proxy's, and is not of a type the proxy's replies begin with
        (InjectedReplies)."""
        if not inputs or control.outstanding or control.transaction_status == "E" or self.server_calls is None:
            return False
        return not (control.in_batch and not after_its_parse) and self._handing_over is None

    async def _keep_before(self, inputs: list[tuple[str, str]], handed_over: bool,
                           control: SessionControl) -> tuple[str, bytes | None] | CallError | None:
        """Compute a statement's inputs before it goes to the server (where _goes_before): one answer
        is handed over with it, others are kept in its transaction's mailbox (servercalls.keep_before).
        Returns the transaction's mailbox and the answer handed over (if one), to set in its transaction
        just before it (handover.py), or None (the statement asks, as it runs); the error if a cancel
        request stopped it: then the statement fails, as it would have on the server (57014)."""
        assert self.server_calls is not None
        self._watch(control)  # the transaction's end drops the mailbox; the settings' replies are dropped
        answer = None
        try:
            if handed_over and len(inputs) == 1:
                answer = await self._cancellable(self.server_calls.handed_answer(*inputs[0]))
                if answer is None:  # not computed: the function asks, and gets the error
                    return None
            else:
                await self._cancellable(self.server_calls.keep_before(inputs))
        except CallError as error:
            return error
        return self.server_calls.statement_mailbox().setting, answer

    async def _look_ahead(self, statements: list[Statement], control: SessionControl) -> CallError | None:
        """Embed ahead what the server's calls in these statements will ask for, until their batch ends.
        A statement that locks the table it reads (ALTER TABLE) waits until its texts are read: the
        error if it was cancelled meanwhile."""
        found = [lookahead for s in statements for lookahead in s.lookaheads]
        started = self.server_calls.look_ahead(found) if self.server_calls is not None and (
            control.transaction_status != "E") else None
        if started is None:
            return None
        task, read = started
        self._lookaheads.append((control.requests_sent, task))
        self._watch(control)
        if any(lookahead.before for lookahead in found):
            try:
                await self._cancellable(asyncio.wait([read]))
            except CallError as error:
                return error
        return None

    def notice(self, body: bytes, control: SessionControl) -> bool:
        """A NoticeResponse from the server: True if it was a request of the extension's functions
        (then the statement's end, ReadyForQuery, is watched for: the mailbox goes with it)."""
        if self.server_calls is None or not self.server_calls.notice(body):
            return False
        self._watch(control)
        # From the second request on: a statement that asks once (a one-row INSERT) has its answer under
        # way already, and reading ahead would only take time from it.
        if self._unread is not None and not self._lookaheads and self.server_calls.asked_in_statement > 1:
            self._look_ahead_written(*self._unread, control)
        elif self._unread is not None and self.server_calls.asked_in_statement == 1:
            self._learn_table(*self._unread)
        return True

    def _learn_table(self, msg_type: int, body: bytes) -> None:
        """The server asks during a statement that names no azure_local_ai function: if it is a one-row
        INSERT or a COPY, the table it writes embeds in a generated column (EmbeddingTables). A COPY's
        rows still to come are read as they go, once the table is looked up (_copy_rows)."""
        assert self.server_calls is not None
        if len(body) > KEEP_BEFORE_MAX:
            return
        try:
            sql = _query_text(body) if msg_type == pg.QUERY else Parse.decode(body).query
        except ProtocolViolation:
            return
        found = one_row_insert(sql) if sql is not None else None
        if found is not None:
            self.server_calls.learn_table(found[1])
            return
        copy = copy_from_stdin(sql) if sql is not None and msg_type == pg.QUERY else None
        looking = self.server_calls.learn_table(copy.table) if copy is not None and self._copying is None else None
        if looking is not None:
            statement = self._answered
            looking.add_done_callback(lambda _: self._copy_midway(copy, statement))  # type: ignore[arg-type]

    def _copy_midway(self, copy: CopyFrom, statement: int) -> None:
        if self._answered == statement and self._copying is None and self._control is not None:
            self._copy_rows(copy, self._control, midway=True)

    def _look_ahead_written(self, msg_type: int, body: bytes, control: SessionControl) -> None:
        """The server asks during a statement that names no azure_local_ai function: read ahead for the
        generated columns of the tables it writes, once."""
        self._unread = None
        assert self.server_calls is not None
        try:
            sql = _query_text(body) if msg_type == pg.QUERY else Parse.decode(body).query
        except ProtocolViolation:
            return
        plain_backslashes = control.server_parameters.get("standard_conforming_strings") == "off"
        if sql is None or (plain_backslashes and "\\" in sql):  # read otherwise than pglast reads it
            return
        task = self.server_calls.look_ahead_written(sql)
        if task is not None:
            self._lookaheads.append((self._answered, task))

    def _on_server_message(self, msg_type: int, body: bytes) -> bytes | None:
        replies = self._handing_over
        if replies is not None:
            ours = replies.take(msg_type)
            if replies.done:
                self._handing_over = None
            if msg_type == pg.ERROR_RESPONSE:
                log.debug("an answer was not handed over", extra={"event": "hand_over_failed",
                                                                  "reason": pg.parse_fields(body).get("M")})
            if ours:
                return b""
        shifted = None  # the message with its position in the client's text, if the proxy's went before it
        if self._shifted and msg_type in (pg.ERROR_RESPONSE, pg.NOTICE_RESPONSE):
            body = shift_position(body, self._shifted)
            shifted = pg.message(msg_type, body)
        if msg_type == pg.COMMAND_COMPLETE:
            self._completed += 1
            return self._tags.pop((self._answered, self._completed - 1), None)
        if msg_type in (pg.ERROR_RESPONSE, pg.NOTICE_RESPONSE) and b"inline_code_block" in body and any(
            batch == self._answered for batch, _ in self._tags
        ):
            return _without_context(msg_type, body)  # the DO block an extension statement ran as
        if msg_type == pg.ERROR_RESPONSE:
            unanswered = self.server_calls.cancelled_error(body) if self.server_calls is not None else None
            if unanswered is not None:  # the proxy cancelled it: its service login cannot write the answer
                self._drop_describes_of_batch()
                return unanswered
            if self._answered in self._hinted:
                hinted = _with_missing_extension_hint(body)
                if hinted is not None:
                    return hinted
            for marker, (_, error) in list(self._markers.items()):
                if marker in body:
                    del self._markers[marker]
                    self._drop_describes_of_batch()
                    return error
            self._drop_describes_of_batch()
        elif msg_type == ord("t"):
            while self._describes and self._describes[0][0] < self._answered:
                self._describes.popleft()
            if self._describes:
                _, extra = self._describes.popleft()
                if extra:
                    types = parameter_description(body)
                    return pg.message(msg_type, encode_parameter_description(types[: len(types) - extra]))
        elif msg_type == pg.READY_FOR_QUERY:
            self._handing_over = None  # its replies all come before its batch's end
            self._ready(idle=body[:1] == b"I")
        return shifted

    def _ready(self, idle: bool) -> None:
        """A ReadyForQuery: what was kept for the batch it ends goes; `idle` (no transaction), the
        transaction's mailboxes too."""
        self._answered += 1
        self._shifted = 0
        self._stop_copying()
        self._completed = 0
        if self.server_calls is not None:
            self.server_calls.statement_done(idle)
        for batch, task in self._lookaheads:
            if batch < self._answered:
                task.cancel()
        self._lookaheads = [(b, t) for b, t in self._lookaheads if b >= self._answered]
        self._markers = {m: v for m, v in self._markers.items() if v[0] >= self._answered}
        self._tags = {k: v for k, v in self._tags.items() if k[0] >= self._answered}
        self._hinted = {b for b in self._hinted if b >= self._answered}
        while self._describes and self._describes[0][0] < self._answered:
            self._describes.popleft()
        busy = self._markers or self._describes or self._tags or self._hinted or self._lookaheads or (
            self.server_calls is not None and self.server_calls.in_transaction)
        if not busy and self._control is not None:
            self._watching = False
            self._control.stop_watching()

    def _drop_describes_of_batch(self) -> None:
        """After an error the server skips to the next Sync: Describes of this batch get no answer."""
        while self._describes and self._describes[0][0] <= self._answered:
            self._describes.popleft()

    def cancel(self) -> None:
        if self._work is not None:
            self._work.cancel()

    def close(self) -> None:
        self.cancel()
        for _, task in self._lookaheads:
            task.cancel()
        if self.server_calls is not None:  # its mailbox, if a statement was cut short with it open
            self._closing = asyncio.get_running_loop().create_task(self.server_calls.close())


class _PreparedInsert(NamedTuple):
    """A prepared one-row INSERT into a table whose generated column embeds."""

    inputs: list[RowInput]
    param_types: tuple[int, ...]
    handed_over: bool  # its database reads an answer handed over (version 1.2)


class _StatementFailed(Exception):
    """A call failed; `before` is the text of the statements before its own, rewritten."""

    def __init__(self, before: str, error: CallError) -> None:
        super().__init__(error.message)
        self.before = before
        self.error = error


def _without_context(msg_type: int, body: bytes) -> bytes:
    """An error or notice without its CONTEXT field ("PL/pgSQL function inline_code_block ...")."""
    fields = [f for f in body.split(b"\0") if f and not f.startswith(b"W")]
    return pg.message(msg_type, b"\0".join(fields) + b"\0\0")


def _with_missing_extension_hint(body: bytes) -> bytes | None:
    """The server's error for an azure_local_ai call when the extension's objects are not there, with a
    hint that says what to do (its other fields, the position among them, as they came); None for any
    other error."""
    fields = pg.parse_fields(body)
    if fields.get("C") not in ("3F000", "42883") or "azure_local_ai" not in fields.get("M", "") or "H" in fields:
        return None
    return pg.message(pg.ERROR_RESPONSE, body[:-1] + b"H" + _MISSING_EXTENSION_HINT.encode() + b"\0\0")


def _runs(calls: Sequence[CallSite]) -> list[list[CallSite]]:
    """The calls of a statement in the order they run: consecutive create_embeddings calls together (so
    that they share model runs: a multi-row INSERT, several columns), any other call alone (it may
    change what the next one sees: a setting, a model)."""
    runs: list[list[CallSite]] = []
    for call in calls:
        if call.function == "create_embeddings" and runs and runs[-1][0].function == "create_embeddings":
            runs[-1].append(call)
        else:
            runs.append([call])
    return runs


async def _together(works: list[Awaitable[T]]) -> list[T]:
    """The works' results, in order, worked out at once; the first to fail, in order, is raised, and
    the others are cancelled."""
    tasks = [asyncio.ensure_future(work) for work in works]
    try:
        return [await task for task in tasks]
    finally:
        for task in tasks:
            task.cancel()


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


def _bound_inputs(bind: Bind, inputs: list[RowInput], param_types: Sequence[int]) -> list[tuple[str, str]]:
    """The (model, text) inputs of a prepared one-row INSERT, with its parameters' values as bound:
    in text format, or binary where the parameter's type is text; other values ask as the row is made."""
    out = []
    for found in inputs:
        if found.text is not None:
            out.append((found.model_uri, found.text))
            continue
        index = (found.param or 0) - 1
        value = bind.values[index] if 0 <= index < len(bind.values) else None
        formats = bind.param_formats
        binary = (formats[0] if len(formats) == 1 else formats[index] if index < len(formats) else 0) == 1
        declared = param_types[index] if index < len(param_types) else 0
        if value is None or (binary and declared not in _TEXT_TYPES):
            continue
        try:
            out.append((found.model_uri, bytes(value).decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return out


def _long_query_text(body: bytes) -> bytes | None:
    """`_query_text` for a long Query, which stays bytes: checked to be one NUL-terminated UTF-8
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
