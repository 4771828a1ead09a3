"""The path of a one-row INSERT into a table whose generated columns embed (EmbeddingTables), in either
protocol: it names no azure_local_ai function, yet its server would ask for the embedding as the row
is made. The proxy reads the text from the statement (or its Bind), computes the answer before the
statement goes upstream, and sets it in the statement's own transaction just before it (handover.py):
handed over, or kept in the transaction's mailbox (ServerCalls.keep_before), so that the function
asks nothing. Also the Bind of any other statement that is not the proxy's prepared calls."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from .. import protocol as pg
from ..hooks import SessionControl, SessionInfo
from ..messages import Bind, Parse
from .common import LocalWork, fail_query
from .errors import CallError
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
)
from .lookahead import RowInput, one_row_insert, row_inputs
from .replies import ReplyWatcher
from .servercalls import ServerCalls

_TEXT_TYPES = frozenset({0, 25, 1043})  # unknown, text, varchar: a binary value of these is its text


class PreparedInsert(NamedTuple):
    """A prepared one-row INSERT into a table whose generated column embeds."""

    inputs: list[RowInput]
    param_types: tuple[int, ...]
    handed_over: bool  # its database reads an answer handed over (version 1.2)


class RowInserts:
    """One per session; see the module docstring."""

    def __init__(self, info: SessionInfo, calls: ServerCalls | None, replies: ReplyWatcher, work: LocalWork,
                 inserts: dict[str, PreparedInsert]) -> None:
        self.info = info
        self.calls = calls
        self.replies = replies
        self.work = work
        #: Prepared one-row INSERTs into tables whose generated columns embed, by name (the hook's): what
        #: they embed, the statement's parameter types, and whether an answer may be handed over.
        self.inserts = inserts
        #: A one-row INSERT's Parse that opened its batch (the batch, the statement), until another of the
        #: client's messages is seen: its Bind may then have the answer handed over (_keep_before).
        self.batch_parse: tuple[int, str] | None = None

    async def query(self, body: bytes, text: str, control: SessionControl) -> None:
        """A Query that names no azure_local_ai function: if it is a one-row INSERT whose inputs can go
        before it, they do, in front of its text."""
        inputs, handed_over = self._row_inputs(text, control)
        texts = [(i.model_uri, i.text) for i in inputs if i.text is not None]
        kept = await self._keep_before(texts, handed_over, control) if self._goes_before(texts, control) else None
        if isinstance(kept, CallError):
            fail_query(self.replies, control, "", kept)
            return
        settings = settings_sql(*kept) if kept is not None else None
        if settings is not None:  # made in the statement's own transaction: put in front of it
            self.replies.handing_over = InjectedReplies(QUERY_REPLIES)
            self.replies.shifted = prefix_length(settings)
            body = query_with(settings, body)
        control.forward(pg.QUERY, body)

    def parse(self, parse: Parse, control: SessionControl) -> None:
        """A Parse that names no azure_local_ai function: a one-row INSERT's is remembered, for its Binds."""
        inputs, handed_over = self._row_inputs(parse.query, control)
        if inputs:
            self.inserts[parse.statement] = PreparedInsert(inputs, parse.param_types, handed_over)
            if not control.in_batch:  # its Bind may follow in the same batch (an unnamed statement)
                self.batch_parse = (control.requests_sent, parse.statement)
        control.forward(pg.PARSE, parse.encode())

    async def bind(self, bind: Bind, control: SessionControl) -> None:
        """A Bind of a statement that is not the proxy's (a one-row INSERT into a table whose generated
        column embeds, or any other): its inputs are computed first where they can go before it. The
        proxy's statement is prepared at once, so that the server parses it while they are computed."""
        insert = self.inserts.get(bind.statement)
        after_its_parse = self.batch_parse == (control.requests_sent, bind.statement)
        self.batch_parse = None
        inputs = _bound_inputs(bind, insert.inputs, insert.param_types) if insert else []
        if not self._goes_before(inputs, control, after_its_parse=after_its_parse):
            control.cork()  # with the Execute and Sync behind it, in one write
            control.forward(pg.BIND, bind.encode())
            return
        assert insert is not None
        control.send_upstream(prepare_before_bind())
        replies = self.replies.handing_over = InjectedReplies(PREPARE_REPLIES)
        kept = await self._keep_before(inputs, insert.handed_over, control)
        if isinstance(kept, CallError):  # a Bind of a statement that is not there, whose error is replaced
            marker = self.replies.expect_failure(control, kept)
            bind = Bind(bind.portal, marker, bind.param_formats, bind.values, bind.result_formats)
        control.cork()  # the settings, made in the statement's own batch, go in one write with it
        if isinstance(kept, tuple):
            control.send_upstream(run_before_bind(*kept))
        else:
            control.send_upstream(close_before_bind())
        if self.replies.handing_over is replies:  # else an error came already: the server skips the rest
            replies.then(RUN_REPLIES if isinstance(kept, tuple) else CLOSE_REPLIES)
        control.forward(pg.BIND, bind.encode())

    def _row_inputs(self, sql: str, control: SessionControl) -> tuple[list[RowInput], bool]:
        """What a one-row INSERT into a table known to embed gives its generated columns (none for any
        other statement, and none where the server's calls are not answered: a statement that names
        azure.extensions comes here too), and whether its database reads an answer handed over."""
        if self.calls is None:
            return [], False
        plain_backslashes = control.server_parameters.get("standard_conforming_strings") == "off"
        found = one_row_insert(sql) if not (plain_backslashes and "\\" in sql) else None
        known = self.calls.tables.get(self.info.database, self.info.user, found[1]) if found else None
        if found is None or known is None:
            return [], False
        return row_inputs(found[0], known.columns, known.embedded), known.handed_over

    def _goes_before(self, inputs: list[tuple[str, str]], control: SessionControl, *,
                     after_its_parse: bool = False) -> bool:
        """Whether a statement's inputs may be computed before it goes to the server (_keep_before):
        nothing else of the session is before it, and the proxy's messages can go first in its batch,
        or (`after_its_parse`) right after the statement's Parse that opened it, with nothing of the
        client's seen between: the server's reply to that Parse (ParseComplete, or an error that skips
        the rest) comes before the proxy's, and is not of a type the proxy's replies begin with
        (InjectedReplies)."""
        if not inputs or control.outstanding or control.transaction_status == "E" or self.calls is None:
            return False
        return not (control.in_batch and not after_its_parse) and self.replies.handing_over is None

    async def _keep_before(self, inputs: list[tuple[str, str]], handed_over: bool,
                           control: SessionControl) -> tuple[str, bytes | None] | CallError | None:
        """Compute a statement's inputs before it goes to the server (where _goes_before): one answer
        is handed over with it, others are kept in its transaction's mailbox (ServerCalls.keep_before).
        Returns the transaction's mailbox and the answer handed over (if one), to set in its transaction
        just before it (handover.py), or None (the statement asks, as it runs); the error if a cancel
        request stopped it: then the statement fails, as it would have on the server (57014)."""
        assert self.calls is not None
        self.replies.watch(control)  # the transaction's end drops the mailbox; the settings' replies are dropped
        answer = None
        try:
            if handed_over and len(inputs) == 1:
                answer = await self.work.cancellable(self.calls.handed_answer(*inputs[0]))
                if answer is None:  # not computed: the function asks, and gets the error
                    return None
            else:
                await self.work.cancellable(self.calls.keep_before(inputs))
        except CallError as error:
            return error
        return self.calls.mailboxes.statement_mailbox().setting, answer


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
