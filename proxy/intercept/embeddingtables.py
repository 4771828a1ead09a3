"""The tables whose stored generated columns call create_embeddings, as the proxy learns them: a
one-row INSERT into such a table names no azure_local_ai function, yet its server asks. Once a table
is known, the proxy reads the next one-row INSERT's text from the statement itself and has its answer
there before the statement runs: handed over on the session's connection, or in its mailbox (hook.py,
servercalls.py).

What is known is only ever a guess that saves time: a table changed since costs an embedding computed
for nothing, or a request that asks as before. So each table is looked at again in the catalog, in
the background, once it has been known for a while."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ..service import ServiceConnections, ServiceUnavailable
from .lookahead import embedded_columns

log = logging.getLogger("azure_local_ai_proxy.embeddingtables")

#: Seconds a table's columns are used as looked up, before they are looked up again.
RECHECK_AFTER = 5.0
#: Tables found not to embed that are remembered (each spares a COPY into it a look-up for a while).
MAX_ABSENT = 4096


@dataclass(frozen=True)
class EmbeddingTable:
    columns: tuple[str, ...]  # the columns that are not generated, in order
    embedded: tuple[tuple[str, str], ...]  # (model, column) each generated column embeds (embedded_columns)
    handed_over: bool  # its create_embeddings reads an answer handed over with the statement (1.2)
    checked: float  # when (time.monotonic())


class EmbeddingTables:
    """One per proxy: by (database, login, the table's name as the statement writes it)."""

    def __init__(self, service: ServiceConnections) -> None:
        self.service = service
        self._tables: dict[tuple[str, str, str], EmbeddingTable] = {}
        self._absent: dict[tuple[str, str, str], float] = {}  # looked up, not found to embed: when
        #: Per database, the tables' names in lower case: what a statement must contain to be looked at.
        self._names: dict[str, frozenset[bytes]] = {}
        self._looking: dict[tuple[str, str, str], asyncio.Task[None]] = {}

    def names(self, database: str) -> frozenset[bytes]:
        return self._names.get(database, frozenset())

    def get(self, database: str, login: str, table: str) -> EmbeddingTable | None:
        """The table's columns, if it is known to embed; once they are a while old, looked up again."""
        key = (database, login, table)
        found = self._tables.get(key)
        if found is not None and time.monotonic() - found.checked > RECHECK_AFTER:
            self.learn(database, login, table)
        return found

    def looked_up_lately(self, database: str, login: str, table: str) -> bool:
        """Whether the table was looked up less than RECHECK_AFTER ago (it embeds, or does not)."""
        key = (database, login, table)
        checked = self._tables[key].checked if key in self._tables else self._absent.get(key)
        return checked is not None and time.monotonic() - checked <= RECHECK_AFTER

    def learn(self, database: str, login: str, table: str) -> asyncio.Task[None]:
        """Look the table up in the catalog, in the background (once at a time): the look-up."""
        key = (database, login, table)
        task = self._looking.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._look_up(key))
            self._looking[key] = task
            task.add_done_callback(lambda _: self._looking.pop(key, None))
        return task

    async def _look_up(self, key: tuple[str, str, str]) -> None:
        database, login, table = key
        try:
            columns, generated = await self.service.generated_embeddings(database, login, table)
            handed_over = await self.service.reads_handed_over(database, login) if generated else False
        except ServiceUnavailable as exc:  # taken as not embedding for a while: a COPY waits for no look-up
            log.debug("a table was not looked up", extra={"event": "table_lookup_failed", "reason": str(exc)})
            self._not_embedding(key)
            return
        if generated:
            self._tables[key] = EmbeddingTable(tuple(columns), tuple(embedded_columns(generated)), handed_over,
                                               time.monotonic())
            self._absent.pop(key, None)
        else:
            self._tables.pop(key, None)
            self._not_embedding(key)
        self._names[database] = frozenset(
            _bare_name(name).lower().encode() for (db, _, name) in self._tables if db == database)

    def _not_embedding(self, key: tuple[str, str, str]) -> None:
        self._absent[key] = time.monotonic()
        if len(self._absent) > MAX_ABSENT:  # the oldest half goes
            for old in sorted(self._absent, key=self._absent.__getitem__)[: MAX_ABSENT // 2]:
                del self._absent[old]


def _bare_name(table: str) -> str:
    """The table's own name, without schema or quotes, as a statement naming it must contain it."""
    return table.rsplit(".", 1)[-1].strip('"')
