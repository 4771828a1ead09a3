"""Reading ahead for the calls the server evaluates: the texts a statement is about to ask for one by
one (lookahead.py: read on the proxy's service connection; or a COPY's rows, read from the client's
data) are embedded in batches, a page at a time and never more than a page ahead of the server's
requests, and handed as they are computed to what keeps their answers in the mailbox (servercalls.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from ..service import LookaheadRefused, ServiceConnections, ServiceUnavailable
from ..tasks import retrieve, shielded
from .errors import CallError
from .functions import Backend
from .lookahead import Lookahead, generated_lookaheads, written_tables
from .vectors import Ready

log = logging.getLogger("azure_local_ai_proxy.servercalls")

#: Cache bytes a looked-ahead text is reckoned to take (its vector, the text, the bookkeeping): a
#: look-ahead keeps no more texts ahead than half the cache holds, so that they are there when asked.
_LOOKAHEAD_ROW_BYTES = 2048
#: Texts a look-ahead reads at a time, and how far ahead of the server's requests it may run.
_LOOKAHEAD_PAGE = 4096


class ReadAhead:
    """One per session: the look-aheads of its statements, paced by the server's requests."""

    def __init__(self, login: str, database: str, backend: Backend, service: ServiceConnections,
                 keep: Ready) -> None:
        self.login = login
        self.database = database
        self.backend = backend
        self.service = service
        #: Given the texts computed, and their vectors (ServerCalls: into the mailbox, if the function reads there).
        self._keep_ahead = keep
        self._asked = 0  # requests so far, and answers kept ahead, with an event at each: how far the
        self._ahead = 0  # server has come
        self._progress = asyncio.Event()
        #: (model, text) a COPY's rows give its table's generated columns, not yet computed (copy_ahead).
        self._copied: list[tuple[str, str]] = []
        self._copying: asyncio.Task[None] | None = None

    def asked(self) -> None:
        """The server asked (a request): the look-aheads may run on."""
        self._asked += 1
        self._progress.set()

    def kept(self, answers: int) -> None:
        """Answers were kept ahead in the mailbox: the look-aheads may run on."""
        self._ahead += answers
        self._progress.set()

    def statement_done(self) -> None:
        """The statement ended: rows of its COPY not computed yet are not."""
        self._copied = []

    def copy_ahead(self, inputs: list[tuple[str, str]]) -> asyncio.Task[None] | None:
        """(model, text) inputs that a COPY's rows give its table's generated columns, read from the
        client's data on its way to the server: computed in batches and kept ahead of the server's
        requests, never more than a page ahead of them. Returns the task that computes them, when
        this starts one (the caller cancels it at the statement's end)."""
        if not self._capacity():
            return None
        self._copied += inputs
        if self._copying is not None and not self._copying.done():
            return None
        self._copying = asyncio.get_running_loop().create_task(self._copy_ahead())
        return self._copying

    async def _copy_ahead(self) -> None:
        page = min(_LOOKAHEAD_PAGE, self._capacity())
        asked_from, sent = self._asked + self._ahead, 0
        pages = _TwoPages()
        try:
            while self._copied:  # rows read meanwhile (copy_ahead adds to them) are taken too
                while self._copied:
                    while self._asked + self._ahead - asked_from < sent - page:
                        self._progress.clear()
                        await self._progress.wait()
                    taken, self._copied = self._copied[:page], self._copied[page:]
                    by_model: dict[str, list[str]] = {}
                    for model_uri, text in taken:
                        by_model.setdefault(model_uri, []).append(text)
                    for model_uri, texts in by_model.items():
                        await pages.add(self.backend.embed_ahead(model_uri, texts, self._keep_ahead))
                    sent += len(taken)
                await pages.finish()
        except CallError as exc:
            log.debug("a look-ahead was given up", extra={"event": "lookahead_failed", "reason": exc.message})
            self._copied = []
        finally:
            pages.cancel()
        log.debug("looked ahead", extra={"event": "lookahead", "texts": sent, "computed": pages.computed})

    def look_ahead(self, lookaheads: list[Lookahead]) -> tuple[asyncio.Task[None], asyncio.Future[None]] | None:
        """Start embedding, in batches, the texts a statement is about to ask for one by one. Returns
        the work (the caller cancels it when the statement ends) and a future done once the first
        texts are read; None when the cache is off."""
        if not lookaheads or not self._capacity():
            return None
        loop = asyncio.get_running_loop()
        read = loop.create_future()
        return loop.create_task(self._look_ahead(lookaheads, read)), read

    def look_ahead_written(self, sql: str) -> asyncio.Task[None] | None:
        """For a statement that does not name azure_local_ai but whose server asks: the embeddings the
        generated columns of the tables it writes will need (INSERT ... SELECT, UPDATE of the source)."""
        return asyncio.get_running_loop().create_task(self._look_ahead_written(sql)) if self._capacity() else None

    def _capacity(self) -> int:
        """How many looked-ahead texts the cache keeps, with room to spare (half of it)."""
        return self.backend.cache.max_bytes // _LOOKAHEAD_ROW_BYTES // 2

    async def _look_ahead_written(self, sql: str) -> None:
        found: list[Lookahead] = []
        for stmt, table in await asyncio.to_thread(written_tables, sql):
            try:
                columns, generated = await self.service.generated_embeddings(self.database, self.login, table)
            except ServiceUnavailable as exc:
                log.debug("a look-ahead was given up", extra={"event": "lookahead_failed", "reason": str(exc)})
                return
            found += generated_lookaheads(stmt, columns, generated)
        await self._look_ahead(found)

    async def _look_ahead(self, lookaheads: list[Lookahead], read: asyncio.Future[None] | None = None) -> None:
        try:
            for lookahead in lookaheads:
                await self._read_ahead(lookahead, read)
        finally:
            if read is not None and not read.done():
                read.set_result(None)

    async def _read_ahead(self, lookahead: Lookahead, read: asyncio.Future[None] | None) -> None:
        """Read the texts a page at a time, never more than a page ahead of the server's requests, and
        embed each page in batches. A statement that locks its table (ALTER TABLE) reads all it can
        at once, before it runs."""
        page = self._capacity() if lookahead.before else min(_LOOKAHEAD_PAGE, self._capacity())
        asked_from, offset, total = self._asked + self._ahead, 0, 0
        pages = _TwoPages()
        try:
            while True:
                while self._asked + self._ahead - asked_from < offset - page:
                    self._progress.clear()
                    await self._progress.wait()
                try:
                    # Read on when the statement ends: the service connection is never left mid-query.
                    texts = await shielded(self.service.read_texts(self.database, self.login, lookahead, page, offset))
                except LookaheadRefused as exc:
                    log.info("a statement's rows were not read ahead", extra={"event": "lookahead_refused",
                                                                              "reason": str(exc)})
                    break
                except ServiceUnavailable as exc:  # only time is lost: each request is answered anyway
                    log.debug("a look-ahead was given up", extra={"event": "lookahead_failed", "reason": str(exc)})
                    break
                finally:
                    if read is not None and not read.done():
                        read.set_result(None)
                await pages.add(self.backend.embed_ahead(lookahead.model_uri, texts, self._keep_ahead))
                total, offset = total + len(texts), offset + page
                if len(texts) < page or lookahead.before:
                    break
            await pages.finish()
        except CallError as exc:
            log.debug("a look-ahead was given up", extra={"event": "lookahead_failed", "reason": exc.message})
        finally:
            pages.cancel()
        log.info("looked ahead", extra={"event": "lookahead", "texts": total, "computed": pages.computed})


class _TwoPages:
    """A look-ahead's pages: one is embedded while the next is read, so that the engine (or a pool of
    inference servers) never waits for a read, nor drains between pages; at most two at once."""

    def __init__(self) -> None:
        self.computed = 0
        self._pending: asyncio.Future[int] | None = None

    async def add(self, work: Awaitable[int]) -> None:
        """Start embedding a page; wait for the one before it (its CallError is raised here)."""
        previous, self._pending = self._pending, asyncio.ensure_future(work)
        self._pending.add_done_callback(retrieve)  # a page cancelled after it failed
        if previous is not None:
            self.computed += await previous

    async def finish(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self.computed += await pending

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
