"""The session hook that answers azure_local_ai calls.

A Query whose text mentions the schema is parsed; each call is run locally and replaced by its value
as a literal, and the rewritten text goes to the server, which produces the rows, types, command tags
and transaction semantics. A call that fails turns its statement into one the server rejects with a
marker, and the server's error is replaced by the call's own: so statements before it run, those after
it do not, and the transaction ends up aborted on both sides, exactly as with a real function error."""

from __future__ import annotations

import asyncio
import logging
import secrets

from .. import protocol as pg
from ..hooks import SessionControl, SessionInfo
from ..relay import QueryFailed
from .evaluate import replacement
from .functions import Backend, CallError
from .render import splice
from .signatures import PRIVILEGED
from .sqlcalls import SqlError, Statement, find_calls, mentions_schema

log = logging.getLogger("azure_local_ai_proxy.intercept")

PRIVILEGE_CHECK = (
    "SELECT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) OR EXISTS ("
    "SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname IN ('azure_pg_admin', 'azure_local_ai_setting_manager') "
    "AND pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER'))"
)
_TRANSACTION_ENDS = ("rollback", "commit", "abort", "end")


class InterceptHook:
    """One per session; see the module docstring."""

    message_types = frozenset({pg.QUERY})

    def __init__(self, info: SessionInfo, backend: Backend) -> None:
        self.info = info
        self.backend = backend
        self._work: asyncio.Task[str] | None = None

    def wants(self, msg_type: int, body: bytes) -> bool:
        return mentions_schema(body)

    async def handle(self, msg_type: int, body: bytes, control: SessionControl) -> None:
        sql = body[:-1].decode("utf-8", errors="surrogateescape")
        try:
            statements = find_calls(sql)
        except SqlError as exc:
            self._fail_after(control, "", CallError(exc.sqlstate, exc.message, exc.hint))
            return
        calls = [c for s in statements for c in s.calls]
        if not calls or (control.transaction_status == "E" and not _ends_transaction(sql, statements)):
            control.forward(msg_type, body)  # nothing of ours, or the server will refuse it anyway (25P02)
            return
        self._work = asyncio.create_task(self._rewrite(sql, statements, control))
        try:
            rewritten = await self._work
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            self._fail_after(control, "", CallError("57014", "canceling statement due to user request"))
            return
        except _StatementFailed as failure:
            self._fail_after(control, failure.before, failure.error)
            return
        finally:
            self._work = None
        control.forward(pg.QUERY, rewritten.encode("utf-8", errors="surrogateescape") + b"\0")

    async def _rewrite(self, sql: str, statements: list[Statement], control: SessionControl) -> str:
        replacements: list[tuple[int, int, str]] = []
        privileged = False
        for statement in statements:
            for call in statement.calls:
                try:
                    if call.function in PRIVILEGED and not privileged:
                        await self._check_privilege(control, call.function)
                        privileged = True
                    text = await replacement(call, self.backend)
                except CallError as error:
                    # Earlier statements run (rewritten); this one fails; later ones never start.
                    raise _StatementFailed(splice(sql[: statement.start], replacements), error) from error
                replacements.append((call.start, call.end, text))
        return splice(sql, replacements)

    async def _check_privilege(self, control: SessionControl, function: str) -> None:
        """Ask the server, as the session's current user, whether it may change settings and models."""
        try:
            rows = await control.query(PRIVILEGE_CHECK)
        except QueryFailed as exc:
            fields = exc.fields
            raise CallError(fields.get("C", "XX000"), fields.get("M", ""), fields.get("H")) from exc
        if rows != [("t",)]:
            raise CallError(
                "42501", f"permission denied for function azure_local_ai.{function}",
                "Only superusers and members of azure_pg_admin or azure_local_ai_setting_manager may change "
                "settings and models.",
            )

    def _fail_after(self, control: SessionControl, before: str, error: CallError) -> None:
        """Send `before` (statements that run first), then one that fails with a marker; the server's
        error for it is replaced by `error`."""
        marker = f"azure_local_ai_proxy_error_{secrets.token_hex(8)}"
        failing = before + f"SELECT '{marker}'::pg_catalog.int4"
        replacement_error = pg.error_response(error.sqlstate, error.message, severity="ERROR", hint=error.hint)

        def watcher(msg_type: int, body: bytes) -> bytes | None:
            if msg_type == pg.ERROR_RESPONSE and marker.encode() in body:
                return replacement_error
            if msg_type == pg.READY_FOR_QUERY:
                control.stop_watching()
            return None

        control.watch_server(watcher)
        control.forward(pg.QUERY, failing.encode("utf-8", errors="surrogateescape") + b"\0")

    def cancel(self) -> None:
        if self._work is not None:
            self._work.cancel()

    def close(self) -> None:
        self.cancel()


class _StatementFailed(Exception):
    """A call failed; `before` is the text of the statements before its own, rewritten."""

    def __init__(self, before: str, error: CallError) -> None:
        super().__init__(error.message)
        self.before = before
        self.error = error


def _ends_transaction(sql: str, statements: list[Statement]) -> bool:
    return any(sql[s.start : s.end].lstrip().lower().startswith(_TRANSACTION_ENDS) for s in statements)
