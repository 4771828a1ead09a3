"""The extended-protocol path of a statement that names azure_local_ai: at Parse, its calls become
parameters of the proxy's own (prepared.py); at each Bind they run with that execution's values,
which travel as the extra parameters; a Describe's ParameterDescription loses them again. A call that
fails makes the Parse, or the Bind, fail on the server with a marker, whose error is replaced by the
call's own (replies.py)."""

from __future__ import annotations

from .. import protocol as pg
from ..hooks import SessionControl
from ..messages import Bind, Parse, describe_target
from .common import (
    LocalWork,
    as_the_server_reads,
    denied,
    privileged,
    runs,
    tell_if_warming,
    together,
)
from .errors import CallError
from .evaluate import parameter
from .functions import Backend
from .prepared import PreparedCalls, bind_values, failing_bind, rewrite_parse
from .replies import ReplyWatcher
from .serverpath import ServerPath
from .signatures import PRIVILEGED
from .sqlcalls import find_calls


class ExtendedQueries:
    """One per session; see the module docstring."""

    def __init__(self, backend: Backend, replies: ReplyWatcher, server: ServerPath | None, work: LocalWork,
                 statements: dict[str, PreparedCalls]) -> None:
        self.backend = backend
        self.replies = replies
        self.server = server
        self.work = work
        #: The prepared statements with calls, by name (the hook's).
        self.statements = statements

    async def parse(self, parse: Parse, control: SessionControl) -> None:
        """A Parse whose text names the schema."""
        try:
            parse = Parse(parse.statement, await as_the_server_reads(parse.query, control), parse.param_types)
            statements = find_calls(parse.query, dict(enumerate(parse.param_types, 1)))
        except CallError as exc:
            self._fail_parse(parse, control, exc)
            return
        if any(s.server_calls for s in statements):
            self.replies.hint_missing_extension(control)
            stopped = await self.server.look_ahead(statements, control) if self.server is not None else None
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
                privileged_ok = await privileged(control)
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

    def _fail_parse(self, parse: Parse, control: SessionControl, error: CallError) -> None:
        marker = self.replies.expect_failure(control, error)
        control.forward(pg.PARSE, Parse(parse.statement, f"SELECT '{marker}'::pg_catalog.int4", ()).encode())

    async def bind(self, bind: Bind, prepared: PreparedCalls, control: SessionControl) -> None:
        """A Bind of a statement with calls (`prepared`)."""
        if len(bind.values) != prepared.client_params:
            self._fail_bind(bind, prepared, control, CallError(
                "08P01", f"bind message supplies {len(bind.values)} parameters, but prepared statement "
                f'"{bind.statement}" requires {prepared.client_params}'))
            return
        if control.transaction_status == "E":
            control.forward(pg.BIND, bind.with_extra_values([(0, None)] * prepared.extra).encode())
            return  # the server refuses it (25P02), as it would the real function
        privileged_calls = [c.function for c in prepared.calls if c.function in PRIVILEGED]
        try:
            if privileged_calls and not prepared.privileged_ok:
                if prepared.privileged_ok is None:
                    raise CallError(
                        "55000",
                        f"azure_local_ai.{privileged_calls[0]} cannot be prepared in the middle of a pipeline",
                        "Send it in a batch of its own (after a Sync), or with the simple query protocol.")
                raise denied(privileged_calls[0])
            tell_if_warming(self.backend, control)
            values = await self.work.cancellable(self._values(bind, prepared))
        except CallError as error:
            self._fail_bind(bind, prepared, control, error)
            return
        control.cork()  # with the Execute and Sync behind it, in one write
        control.forward(pg.BIND, bind.with_extra_values([(0, None), *values]).encode())

    async def _values(self, bind: Bind, prepared: PreparedCalls) -> list[tuple[int, bytes | None]]:
        binds = bind_values(bind, prepared)
        values: list[tuple[int, bytes | None]] = []
        for group in runs(prepared.calls):
            values += await together([parameter(call, self.backend, binds) for call in group])
        return values

    def _fail_bind(self, bind: Bind, prepared: PreparedCalls, control: SessionControl, error: CallError) -> None:
        failing, marker = failing_bind(Bind(bind.portal, bind.statement, bind.param_formats,
                                            bind.values[: prepared.client_params], bind.result_formats), prepared)
        self.replies.expect_failure(control, error, marker)
        control.forward(pg.BIND, failing.encode())

    def describe(self, body: bytes, control: SessionControl) -> None:
        """A Describe of a statement: of one with calls, the ParameterDescription loses their parameters."""
        _, name = describe_target(body)
        prepared = self.statements.get(name)
        self.replies.expect_description(control, prepared.extra if prepared else 0)
        control.forward(pg.DESCRIBE, body)
