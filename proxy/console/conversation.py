"""One admin console session after start-up: the simple and the extended query protocol, answered by
the proxy. The messages are built and read by messages.py (pure); this loop keeps the session's
prepared statements and portals and awaits each command."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .. import messages
from .. import protocol as pg
from ..wire import ConnectionClosed, HandshakeProtocol
from .commands import Command, ConsoleError, parse_commands
from .views import COLUMNS, Table


@dataclass(frozen=True)
class Result:
    """What a command answers: a table (for SHOW) or none, its CommandComplete tag, notices to show first."""

    tag: str
    table: Table | None = None
    notices: tuple[str, ...] = ()


Executor = Callable[[Command, asyncio.Event], Awaitable[Result]]


def columns_of(command: Command | None) -> tuple[str, ...] | None:
    """A statement's columns, known before it runs (Describe); None: it returns no rows."""
    return COLUMNS[command.item] if command is not None and command.verb == "SHOW" else None


@dataclass
class _Portal:
    command: Command | None  # None: an empty query
    formats: tuple[int, ...]
    rows: list[tuple[str | None, ...]] | None = None  # once executed: the rows not sent yet
    tag: str = ""


@dataclass
class Conversation:
    client: HandshakeProtocol
    execute: Executor
    log: logging.LoggerAdapter
    max_message_size: int
    statements: dict[str, Command | None] = field(default_factory=dict)
    portals: dict[str, _Portal] = field(default_factory=dict)
    #: An error in the extended protocol: messages are skipped up to the next Sync.
    skipping: bool = False
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def cancel(self) -> None:
        """A CancelRequest for this session: the command waiting (PAUSE) stops."""
        self.cancelled.set()

    async def run(self) -> None:
        while True:
            try:
                msg = await self.client.read_message(self.max_message_size)
            except ConnectionClosed:
                return
            except pg.ProtocolViolation as exc:
                self.client.write(pg.error_response("08P01", str(exc)))
                return
            if msg.type == pg.TERMINATE:
                return
            try:
                await self._handle(msg)
            except pg.ProtocolViolation as exc:
                self.client.write(pg.error_response("08P01", str(exc)))
                return
            except ConsoleError as exc:
                self.client.write(_error(exc))
                if msg.type != pg.QUERY:
                    self.skipping = True
                else:
                    self.client.write(messages.ready_for_query())

    async def _handle(self, msg: pg.Message) -> None:
        kind = msg.type
        if self.skipping and kind != pg.SYNC:
            return
        if kind == pg.QUERY:
            await self._query(messages.query_text(msg.body))
        elif kind == pg.PARSE:
            self._parse(messages.Parse.decode(msg.body))
        elif kind == pg.BIND:
            self._bind(messages.Bind.decode(msg.body))
        elif kind == pg.DESCRIBE:
            self._describe(*messages.describe_target(msg.body))
        elif kind == pg.EXECUTE:
            await self._execute(messages.Execute.decode(msg.body))
        elif kind == pg.CLOSE:
            target, name = messages.describe_target(msg.body)
            (self.statements if target == "S" else self.portals).pop(name, None)
            self.client.write(messages.CLOSE_COMPLETE)
        elif kind == pg.SYNC:
            self.skipping = False
            self.portals.pop("", None)
            self.client.write(messages.ready_for_query())
        elif kind == pg.FUNCTION_CALL:
            raise ConsoleError("0A000", "the admin console does not run function calls")
        elif kind in b"dcfH":
            return  # copy data outside a copy is ignored, as PostgreSQL does; Flush: answers are never held
        else:
            raise pg.ProtocolViolation(f"invalid frontend message type {kind}")

    async def _query(self, text: str) -> None:
        self.statements.pop("", None)
        self.portals.pop("", None)
        commands = parse_commands(text)
        if not commands:
            self.client.write(messages.EMPTY_QUERY_RESPONSE)
        for command in commands:
            result = await self._run(command)
            out = [pg.notice_response(n) for n in result.notices]
            if result.table is not None:
                out.append(messages.row_description(result.table.columns))
                out += [messages.data_row(row) for row in result.table.rows]
            out.append(messages.command_complete(result.tag))
            self.client.write(b"".join(out))
        self.client.write(messages.ready_for_query())

    async def _run(self, command: Command) -> Result:
        self.cancelled.clear()
        self.log.info("admin command", extra={"event": "admin_command", "command": str(command)})
        return await self.execute(command, self.cancelled)

    def _parse(self, parse: messages.Parse) -> None:
        commands = parse_commands(parse.query)
        if len(commands) > 1:
            raise ConsoleError("42601", "cannot insert multiple commands into a prepared statement")
        if parse.statement and parse.statement in self.statements:
            raise ConsoleError("42P05", f'prepared statement "{parse.statement}" already exists')
        self.statements[parse.statement] = commands[0] if commands else None
        self.client.write(messages.PARSE_COMPLETE)

    def _bind(self, bind: messages.Bind) -> None:
        if bind.statement not in self.statements:
            raise ConsoleError("26000", f'prepared statement "{bind.statement}" does not exist')
        if bind.values:
            raise ConsoleError("08P01", f"bind message supplies {len(bind.values)} parameters, but prepared "
                               f'statement "{bind.statement}" requires 0')
        if any(fmt not in (0, 1) for fmt in bind.result_formats):
            raise ConsoleError("22023", "unsupported format code")
        if bind.portal and bind.portal in self.portals:
            raise ConsoleError("42P03", f'cursor "{bind.portal}" already exists')
        self.portals[bind.portal] = _Portal(self.statements[bind.statement], bind.result_formats)
        self.client.write(messages.BIND_COMPLETE)

    def _describe(self, target: str, name: str) -> None:
        if target == "S":
            if name not in self.statements:
                raise ConsoleError("26000", f'prepared statement "{name}" does not exist')
            columns = columns_of(self.statements[name])
            self.client.write(pg.message(ord("t"), messages.encode_parameter_description(()))
                              + (messages.row_description(columns) if columns else messages.NO_DATA))
            return
        portal = self.portals.get(name)
        if portal is None:
            raise ConsoleError("34000", f'portal "{name}" does not exist')
        columns = columns_of(portal.command)
        self.client.write(messages.row_description(columns, portal.formats) if columns else messages.NO_DATA)

    async def _execute(self, execute: messages.Execute) -> None:
        portal = self.portals.get(execute.portal)
        if portal is None:
            raise ConsoleError("34000", f'portal "{execute.portal}" does not exist')
        if portal.command is None:
            self.client.write(messages.EMPTY_QUERY_RESPONSE)
            return
        if portal.rows is None:
            result = await self._run(portal.command)
            self.client.write(b"".join(pg.notice_response(n) for n in result.notices))
            portal.rows = list(result.table.rows) if result.table is not None else []
            portal.tag = result.tag
        count = len(portal.rows) if execute.max_rows <= 0 else min(execute.max_rows, len(portal.rows))
        sent, portal.rows = portal.rows[:count], portal.rows[count:]
        out = [messages.data_row(row) for row in sent]
        more = execute.max_rows > 0 and bool(portal.rows)
        out.append(messages.PORTAL_SUSPENDED if more else messages.command_complete(portal.tag))
        self.client.write(b"".join(out))


def _error(exc: ConsoleError) -> bytes:
    return pg.error_response(exc.sqlstate, str(exc), severity="ERROR", hint=exc.hint)
