"""The path of a COPY ... FROM STDIN into a table whose generated columns embed: the client's rows are
read as they go upstream (copyrows.py), and the texts they give the generated columns computed ahead
of the server's requests (ReadAhead.copy_ahead), which then find their answers kept."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from .. import protocol as pg
from ..hooks import SessionControl, SessionInfo
from .copyrows import CopyFrom, CopyRows
from .replies import ReplyWatcher
from .servercalls import ServerCalls

LOOK_UP_WAIT = 2.0
_COPY_TYPES = frozenset({pg.COPY_DATA, pg.COPY_DONE, pg.COPY_FAIL})


class CopyReading:
    """One per session with a mailbox: the COPY whose rows are read, if one is."""

    def __init__(self, info: SessionInfo, calls: ServerCalls, replies: ReplyWatcher,
                 track: Callable[[int, asyncio.Task[None]], None]) -> None:
        self.info = info
        self.calls = calls
        self.replies = replies
        #: Where the work a COPY's rows start goes (the server path's look-aheads, until the batch ends).
        self._track = track
        #: A COPY FROM STDIN into a table whose generated columns embed: its rows, read as they go
        #: upstream, and the model of each input read (_copy_rows).
        self._copying: tuple[CopyRows, list[str]] | None = None

    @property
    def reading(self) -> bool:
        return self._copying is not None

    async def query(self, copy: CopyFrom, body: bytes, control: SessionControl) -> None:
        """A Query of a COPY FROM STDIN (`body`): once its table is looked up, it goes upstream, and its
        rows are read as they follow it if the table is known to embed."""
        await self._look_up(copy.table)
        self._copy_rows(copy, control)
        control.forward(pg.QUERY, body)

    async def _look_up(self, table: str) -> None:
        """Look a table up in the catalog, unless it was lately: whether its generated columns embed
        (a COPY into it waits for that, at most LOOK_UP_WAIT seconds)."""
        tables = self.calls.tables
        if not tables.looked_up_lately(self.info.database, self.info.user, table):
            looking = tables.learn(self.info.database, self.info.user, table)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(looking), LOOK_UP_WAIT)

    def midway(self, copy: CopyFrom, statement: int) -> None:
        """The table of a COPY under way was found to embed: read the rows still to come, if it still is."""
        if self.replies.answered == statement and self._copying is None and self.replies.control is not None:
            self._copy_rows(copy, self.replies.control, midway=True)

    def _copy_rows(self, copy: CopyFrom, control: SessionControl, *, midway: bool = False) -> None:
        """Read the rows of a COPY into a table known to embed as they go upstream (observe), where the
        client's data is UTF-8. `midway`: the COPY is under way (its first rows went unread)."""
        known = self.calls.tables.get(self.info.database, self.info.user, copy.table)
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
        self.replies.watch(control)  # its end (ReadyForQuery) ends the reading
        control.observe_client(_COPY_TYPES)

    def observe(self, msg_type: int, body: bytes | None) -> None:
        """The client's COPY data on its way upstream: the inputs of its rows are computed ahead. A
        message too long to read here ends the reading (the rows after it ask as they run)."""
        if self._copying is None:
            return
        rows, models = self._copying
        if body is None:
            self.stop()
            return
        if msg_type == pg.COPY_DATA:
            read = rows.feed(body)
        else:  # CopyDone, CopyFail: no more rows come
            read = rows.finish() if msg_type == pg.COPY_DONE else []
            self.stop()
        inputs = [(model, text) for row in read for model, text in zip(models, row, strict=True) if text is not None]
        task = self.calls.ahead.copy_ahead(inputs) if inputs else None
        if task is not None:
            self._track(self.replies.answered, task)

    def stop(self) -> None:
        if self._copying is not None and self.replies.control is not None:
            self.replies.control.observe_client(frozenset())
        self._copying = None
