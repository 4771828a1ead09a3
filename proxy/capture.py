"""The proxy's own queries on a session's connection (SessionControl.query): their answer is taken out
of the server's stream, so that the client never sees it."""

from __future__ import annotations

import asyncio

from . import protocol as pg
from .messages import parse_data_row


class QueryFailed(Exception):
    """The proxy's own query on a session's connection got an ErrorResponse."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M", "query failed"))
        self.fields = fields


class Capture:
    """Collects the answer to a query the proxy itself sent, so the client never sees it."""

    def __init__(self, done: asyncio.Future[list[tuple[str | None, ...]]]) -> None:
        self.done = done
        self.rows: list[tuple[str | None, ...]] = []
        self.error: dict[str, str] | None = None

    def feed(self, msg_type: int, body: bytes) -> bool:
        """Take one server message; True when the answer is complete (ReadyForQuery)."""
        if msg_type == ord("D"):
            self.rows.append(parse_data_row(body))
        elif msg_type == pg.ERROR_RESPONSE:
            self.error = pg.parse_fields(body)
        elif msg_type == pg.READY_FOR_QUERY:
            if not self.done.done():
                if self.error is not None:
                    self.done.set_exception(QueryFailed(self.error))
                else:
                    self.done.set_result(self.rows)
            return True
        return False

