"""The proxy's own connections to the server, one per database, through which it writes the answers
to the calls the server evaluates (see intercept/servercalls.py) into each session's mailbox: a large
object that only the session it was made for is told about, which lives while a statement of that
session asks (so that pg_dump finds none, but for the statements running as it dumps)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from .intercept.lookahead import Lookahead
from .intercept.readguard import TableFacts, qualified, verdict
from .upstream import Upstream

log = logging.getLogger("azure_local_ai_proxy.service")

#: What a mailbox's comment begins with; it ends with the server backend the mailbox is for, so that
#: mailboxes left by a proxy that stopped abruptly (or restored from a dump) can be told and removed.
MAILBOX_COMMENT = "azure-local-ai-proxy mailbox of backend "
#: Mailboxes whose backend is gone: removed whenever a service connection is opened.
#: A mailbox the proxy made before its backend asked is named after the backend of the client's cancel key,
#: which behind a pooler is none of the server's: it counts as left only once it is older than this.
UNSURE_PID_AGE_S = 600
_LEFT_MAILBOXES = f"""
SELECT count(pg_catalog.lo_unlink(m.oid))
FROM pg_catalog.pg_largeobject_metadata m
JOIN pg_catalog.pg_description d ON d.objoid = m.oid AND d.classoid = 'pg_catalog.pg_largeobject'::regclass,
LATERAL pg_catalog.string_to_array(pg_catalog.substr(d.description, {len(MAILBOX_COMMENT) + 1}), ' ') AS f(parts)
WHERE m.lomowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user)
  AND d.description LIKE '{MAILBOX_COMMENT}%'
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid::text = f.parts[1])
  AND (f.parts[2] IS DISTINCT FROM 'made'
       OR f.parts[3]::double precision < extract(epoch FROM pg_catalog.now()) - {UNSURE_PID_AGE_S})"""
POOLED = ("the proxy's service connections go through a connection pooler in transaction mode (their server "
          "backend changes from one transaction to the next): set service_upstream to the server itself")
#: Remove a mailbox: only a large object of the service login's that says it is one (were the
#: outcome of its making unknown, the OID might be another's).
_REMOVE_MAILBOX = f"""
SELECT count(pg_catalog.lo_unlink(m.oid))
FROM pg_catalog.pg_largeobject_metadata m
JOIN pg_catalog.pg_description d ON d.objoid = m.oid AND d.classoid = 'pg_catalog.pg_largeobject'::regclass
WHERE m.oid = $1::oid AND m.lomowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user)
  AND d.description LIKE '{MAILBOX_COMMENT}%'"""
_INLINE_ANSWER = 1 << 16  # a first answer up to this size goes in the statement that makes the mailbox
#: The search_path of every service connection: no name the proxy's queries use (nor a look-ahead's
#: operators, functions and types) can resolve to an object another role made (readguard.py).
SEARCH_PATH = "pg_catalog, pg_temp"
#: Lock waits of the writer, which serves every session of a database: a session that locks its own
#: mailbox's pages (it may write it) stalls only its own answer, and not for long.
WRITER_LOCK_TIMEOUT_MS = 20
_GENERATED_EMBEDDINGS = """
SELECT a.attname::text, a.attgenerated::text,
       CASE WHEN a.attgenerated = 's' THEN pg_get_expr(d.adbin, d.adrelid) END
FROM pg_attribute a
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = $1::oid AND a.attnum > 0 AND NOT a.attisdropped
  AND (a.attgenerated <> 's' OR pg_get_expr(d.adbin, d.adrelid) LIKE '%azure_local_ai.create_embeddings(%')
ORDER BY a.attnum"""
#: A look-ahead's table names, as the session's login would resolve them (under its search_path).
_RESOLVE = ("SELECT pg_catalog.to_regclass(n.name)::pg_catalog.oid FROM pg_catalog.unnest($1::pg_catalog.text[]) "
            "WITH ORDINALITY AS n(name, i) ORDER BY n.i")
#: What readguard.verdict needs of a look-ahead's tables ($1), for the login $2 and the column names $3.
_TABLE_FACTS = """
WITH RECURSIVE tree(top, rel) AS (
    SELECT t.oid, t.oid FROM unnest($1::oid[]) AS t(oid)
    UNION SELECT tree.top, i.inhrelid FROM tree JOIN pg_inherits i ON i.inhparent = tree.rel)
SELECT c.oid, n.nspname::text, c.relname::text,
       c.relkind IN ('r', 'p') AND NOT c.relrowsecurity AND NOT EXISTS (
           SELECT 1 FROM tree JOIN pg_class d ON d.oid = tree.rel
           WHERE tree.top = c.oid AND d.relkind NOT IN ('r', 'p')),
       has_any_column_privilege($2::name, c.oid, 'SELECT'),
       ARRAY(SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
       ARRAY(SELECT a.attname::text FROM pg_attribute a JOIN pg_type ty ON ty.oid = a.atttypid
             LEFT JOIN pg_type base ON base.oid = ty.typbasetype
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attname = ANY($3::name[])
               AND (coalesce(base.typnamespace, ty.typnamespace) <> 'pg_catalog'::regnamespace
                    OR NOT has_column_privilege($2::name, c.oid, a.attnum, 'SELECT')))
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = ANY($1::oid[])"""


class ServiceUnavailable(Exception):
    """The service login cannot reach the server (or is not configured): the call gets this error."""


class ServiceLoginFailed(ServiceUnavailable):
    """The service login cannot connect (the server refuses it, or is out of reach): no answer can be
    written at all, so the statement waiting for one is told this `cause` (servercalls.py)."""

    def __init__(self, user: str, database: str, cause: str) -> None:
        super().__init__(f'the proxy\'s service login "{user}" cannot connect to database "{database}": {cause}')
        self.user = user
        self.database = database
        self.cause = cause


class LookaheadRefused(ServiceUnavailable):
    """A look-ahead's tables are not plainly readable (readguard.py): its rows ask one by one."""


async def _table_facts(conn: asyncpg.Connection, oids: list[int | None], login: str, columns: Sequence[str]
                       ) -> list[TableFacts | None]:
    """The catalog's facts of each table (None for a name that resolved to none)."""
    if not oids:
        return []
    rows = {row[0]: TableFacts(row[1], row[2], row[3], row[4], frozenset(row[5]), frozenset(row[6]))
            for row in await conn.fetch(_TABLE_FACTS, [o for o in oids if o is not None], login, list(columns))}
    return [rows.get(oid) if oid is not None else None for oid in oids]


class ServiceConnections:
    """One connection per database, opened on first use and again after it is lost. Writes commit
    at once, without waiting for the disk (synchronous_commit off): an answer is worth nothing after
    the statement that asked for it, and losing one in a crash costs only that statement."""

    def __init__(self, upstream: Upstream, user: str, password: str) -> None:
        self.upstream = upstream
        self.user = user
        self.password = password
        self._connections: dict[str, asyncpg.Connection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Look-aheads read through connections of their own, so that answers never wait behind a read.
        self._readers: dict[str, asyncpg.Connection] = {}
        self._reader_locks: dict[str, asyncio.Lock] = {}
        #: The mailboxes that may exist, by (database, oid): close_mailbox removes only these, so that
        #: one whose making never reached the server is not reported as left behind.
        self._mailboxes: set[tuple[str, int]] = set()
        #: The mailboxes a session of this proxy has (made or not yet), by (database, oid): no other may
        #: take one (claim_mailbox).
        self._claimed: set[tuple[str, int]] = set()
        #: The server backend of each database's writer, as its first lock showed it.
        self._writer_pids: dict[str, int] = {}
        #: The service connections were found behind a pooler in transaction mode (POOLED): for /healthz.
        self.pooled = False
        #: Why the service login could not connect at its last attempt; None once it could, or before
        #: any attempt (login_tried tells which). What /healthz and the start-up check report.
        self.login_problem: str | None = None
        self.login_tried = False

    async def _connection(self, database: str, pool: dict[str, asyncpg.Connection] | None = None) -> asyncpg.Connection:
        pool = self._connections if pool is None else pool
        conn = pool.get(database)
        if conn is not None and not conn.is_closed():
            return conn
        writer = {"lock_timeout": str(WRITER_LOCK_TIMEOUT_MS)} if pool is self._connections else {}
        conn = await self._connect(database, writer)
        pool[database] = conn
        if pool is self._connections:
            self._writer_pids.pop(database, None)  # a new connection, a new backend
        if pool is self._connections:
            await self._remove_left_mailboxes(conn, database)
        return conn

    async def check(self, database: str, timeout: float | None = None) -> str | None:
        """Whether the service login can connect to `database` (at start-up, and for /healthz): why
        not, or None. A connection of its own, closed at once: it leaves no mark on the server."""
        try:
            conn = await self._connect(database, {}, timeout)
        except ServiceUnavailable as exc:
            return str(exc)
        with contextlib.suppress(OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await conn.close(timeout=2)
        return None

    async def _connect(self, database: str, writer: dict[str, str], timeout: float | None = None
                       ) -> asyncpg.Connection:
        """A new connection of the service login (`writer`: the writer's own settings); ServiceLoginFailed,
        with the server's reason, if it cannot be made. Either way the outcome is kept (login_problem)."""
        limit = self.upstream.connect_timeout if timeout is None else min(timeout, self.upstream.connect_timeout)
        try:
            conn = await asyncpg.connect(
                host=self.upstream.host, port=self.upstream.port, user=self.user, password=self.password or None,
                database=database, ssl=_ssl(self.upstream), timeout=limit,
                # Only what a pooler passes on (PgBouncer refuses other start-up parameters): the rest is SET.
                server_settings={"application_name": "azure-local-ai-proxy service"},
                # The writer runs a few statements over and over: prepared once, each is one round trip.
                # Readers run each look-ahead's own query once.
                statement_cache_size=100 if writer else 0,
            )
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            failed = ServiceLoginFailed(self.user, database, str(exc) or "timeout expired")
            self.login_problem, self.login_tried = str(failed), True
            raise failed from exc
        self.login_problem, self.login_tried = None, True
        settings = {"synchronous_commit": "off", "search_path": SEARCH_PATH, **writer}
        try:
            await conn.execute("SELECT " + ", ".join(f"pg_catalog.set_config('{name}', '{value}', false)"
                                                     for name, value in settings.items()))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            conn.terminate()
            raise ServiceUnavailable(f"the proxy's service connection to {database!r} failed: {exc}") from exc
        return conn

    async def _remove_left_mailboxes(self, conn: asyncpg.Connection, database: str) -> None:
        try:
            removed = await conn.fetchval(_LEFT_MAILBOXES)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("mailboxes left behind were not looked for", extra={"event": "mailbox_cleanup_failed",
                                                                            "reason": str(exc)})
            return
        if removed:
            log.info("removed mailboxes left behind", extra={"event": "mailbox_cleanup", "database": database,
                                                             "removed": removed})

    async def _run(self, database: str, sql: str, *args: object) -> object:
        async with self._locks.setdefault(database, asyncio.Lock()):
            conn = await self._connection(database)
            try:
                return await conn.fetchval(sql, *args)
            except asyncpg.InvalidSQLStatementNameError as exc:
                # The writer's own prepared statement gone while its connection stayed: another backend.
                self._found_pooled(database)
                raise ServiceLoginFailed(self.user, database, POOLED) from exc
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise ServiceUnavailable(f"the proxy's service connection to {database!r} failed: {exc}") from exc

    async def open_mailbox(
        self, database: str, oid: int, backend_pid: int, role: str, at: int, first: bytes, unlock: int | None = None,
        pid_unsure: bool = False,
    ) -> None:
        """Create the mailbox large object `oid` for server backend `backend_pid`, holding `first` (the
        statement's first answer, if any yet) at `at`, readable and writable by `role` only (and by the
        service login, its owner), and let go of the advisory lock `unlock`: one round trip."""
        inline = len(first) <= _INLINE_ANSWER
        made = f" made {int(time.time())}" if pid_unsure else ""  # see UNSURE_PID_AGE_S
        write = (f"SELECT pg_catalog.lo_put({int(oid)}, {int(at)}, decode('{first.hex()}', 'hex')); "
                 if inline and first else "")
        release = f"; SELECT pg_catalog.pg_advisory_unlock({int(unlock)})" if unlock is not None and inline else ""
        sql = (f"SELECT pg_catalog.lo_create({int(oid)}); {write}"
               f"COMMENT ON LARGE OBJECT {int(oid)} IS '{MAILBOX_COMMENT}{int(backend_pid)}{made}'; "
               f"GRANT SELECT, UPDATE ON LARGE OBJECT {int(oid)} TO {_ident(role)}{release}")
        async with self._locks.setdefault(database, asyncio.Lock()):
            conn = await self._connection(database)
            self._mailboxes.add((database, oid))  # it may exist from here on, unless the server says no
            try:
                await conn.execute(sql)  # several statements, one implicit transaction
            except asyncpg.PostgresError as exc:  # rolled back: nothing was made (the OID may be another's)
                self._mailboxes.discard((database, oid))
                raise ServiceUnavailable(f"the proxy's service login could not make a mailbox: {exc}") from exc
            except (OSError, asyncpg.InterfaceError) as exc:
                raise ServiceUnavailable(f"the proxy's service login could not make a mailbox: {exc}") from exc
        if not inline:
            await self.write(database, oid, at, first, unlock)

    async def grant(self, database: str, oid: int, role: str) -> None:
        """Let another role (the session's SET ROLE, a SECURITY DEFINER function's owner) read the mailbox."""
        await self._run(database, f"GRANT SELECT, UPDATE ON LARGE OBJECT {int(oid)} TO {_ident(role)}")

    async def write(self, database: str, oid: int, at: int, data: bytes, unlock: int | None = None) -> None:
        """Write an answer; and let go of the advisory lock `unlock` at once, which wakes the function."""
        if unlock is None:
            await self._run(database, "SELECT pg_catalog.lo_put($1::oid, $2::bigint, $3::bytea)", oid, at, data)
        else:
            pid = await self._run(database, "SELECT ROW(pg_catalog.lo_put($1::oid, $2::bigint, $3::bytea), "
                                  "pg_catalog.pg_advisory_unlock($4::bigint), pg_catalog.pg_backend_pid())",
                                  oid, at, data, unlock)
            self._same_backend(database, pid[2])  # type: ignore[index]

    async def write_many(self, database: str, oid: int, places: list[int], answers: list[bytes]) -> None:
        """Write answers at their places, in one round trip."""
        await self._run(database, "SELECT count(pg_catalog.lo_put($1::oid, u.p, u.d)) "
                        "FROM unnest($2::bigint[], $3::bytea[]) AS u(p, d)", oid, places, answers)

    async def try_lock(self, database: str, key: int) -> bool:
        """Take the advisory lock `key` if it is free (never wait: the connection serves every session).
        ServiceLoginFailed where the writer's server backend is not the one it was (a pooler in
        transaction mode hands each transaction another): its locks would be let go of nowhere."""
        if self.pooled:
            raise ServiceLoginFailed(self.user, database, POOLED)
        row = await self._run(database, "SELECT ROW(pg_catalog.pg_try_advisory_lock($1::bigint), "
                              "pg_catalog.pg_backend_pid())", key)
        taken, pid = row  # type: ignore[misc]
        try:
            self._same_backend(database, pid)
        except ServiceUnavailable:
            if taken:  # on the backend it landed on, which may serve another client next
                await self._run(database, "SELECT pg_catalog.pg_advisory_unlock($1::bigint)", key)
            raise
        return bool(taken)

    def _same_backend(self, database: str, pid: int) -> None:
        """Check that the writer's statements run on the server backend its first lock did; where not (a
        pooler in transaction mode), the calls the server evaluates fail from now on, saying what to set
        (so do /healthz and the log): locks taken on one backend and let go of on another would pile up."""
        if self._writer_pids.setdefault(database, pid) == pid:
            return
        self._found_pooled(database)
        raise ServiceLoginFailed(self.user, database, POOLED)

    def _found_pooled(self, database: str) -> None:
        if not self.pooled:
            self.pooled = True
            log.error(POOLED, extra={"event": "service_pooled", "database": database})

    async def unlock(self, database: str, key: int) -> None:
        with contextlib.suppress(ServiceUnavailable):  # a lost connection has let go of its locks
            await self._run(database, "SELECT pg_catalog.pg_advisory_unlock($1::bigint)", key)

    async def read_texts(self, database: str, login: str, lookahead: Lookahead, limit: int, offset: int = 0
                         ) -> list[str]:
        """The texts a look-ahead query yields (lookahead.py), at most `limit` from `offset` on: only
        once its tables, locked against change, are found plain and readable by the session's login
        (readguard.py). Raises LookaheadRefused where they are not."""
        plan = lookahead.plan

        async def read(conn: asyncpg.Connection, oids: list[int | None]) -> list[asyncpg.Record]:
            facts = await _table_facts(conn, oids, login, plan.columns)
            refused = verdict(plan, facts)
            names = {name: (f.schema, f.name) for name, f in zip(plan.tables, facts, strict=True) if f}
            if refused is None and names:
                # Locked, the tables cannot become views or gain row security before the read: look again.
                await conn.execute("LOCK TABLE " + ", ".join(f"{_ident(s)}.{_ident(n)}" for s, n in names.values())
                                   + " IN ACCESS SHARE MODE")
                if await _table_facts(conn, oids, login, plan.columns) != facts:
                    refused = "its tables changed as they were checked"
            if refused is not None:
                raise LookaheadRefused(refused)
            return await conn.fetch(f"SELECT t FROM ({qualified(lookahead.query, names)}) AS lookahead(t) "
                                    f"WHERE t IS NOT NULL LIMIT {int(limit)} OFFSET {int(offset)}")

        return [row[0] for row in await self._read(database, login, plan.tables, read)]

    async def generated_embeddings(self, database: str, login: str, table: str) -> tuple[list[str], list[str]]:
        """A table's columns that are not generated, in order, and the expressions of its stored
        generated columns that call create_embeddings (none for a name that is not a table)."""
        async def read(conn: asyncpg.Connection, oids: list[int | None]) -> list[asyncpg.Record]:
            return await conn.fetch(_GENERATED_EMBEDDINGS, oids[0]) if oids[0] is not None else []

        rows = await self._read(database, login, (table,), read)
        columns = [name for name, generated, _ in rows if generated == ""]
        return columns, [expression for _, generated, expression in rows if generated == "s" and expression]

    async def reads_handed_over(self, database: str, login: str) -> bool:
        """Whether the database's create_embeddings reads an answer handed over with the statement
        (the extension's objects are of version 1.2 or later)."""
        async def read(conn: asyncpg.Connection, _: list[int | None]) -> list[asyncpg.Record]:
            return await conn.fetch("SELECT prosrc OPERATOR(pg_catalog.~~) '%azure_local_ai.proxy_kept%' FROM "
                                    "pg_catalog.pg_proc WHERE oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure("
                                    "'azure_local_ai.create_embeddings(text, text, integer)')")

        rows = await self._read(database, login, (), read)
        return bool(rows and rows[0][0])

    async def _read(self, database: str, login: str, tables: Sequence[str],
                    read: Callable[[asyncpg.Connection, list[int | None]], Awaitable[list[asyncpg.Record]]]
                    ) -> list[asyncpg.Record]:
        """`read`'s rows, in a read-only transaction that waits for no lock. The names `tables` are
        resolved as the session's login would by default (its own schema, then public), to OIDs
        passed to `read`; all else runs under the connection's search_path, pg_catalog's alone."""
        async with self._reader_locks.setdefault(database, asyncio.Lock()):
            conn = await self._connection(database, self._readers)
            try:
                async with conn.transaction(readonly=True):
                    # Never waiting for a lock: a table the session's own statement locks is read before it.
                    await conn.execute("SET LOCAL statement_timeout = 30000; SET LOCAL lock_timeout = 100; "
                                       "SET LOCAL standard_conforming_strings = on")
                    oids: list[int | None] = []
                    if tables:
                        await conn.execute(f"SET LOCAL search_path = {_ident(login)}, public")
                        oids = [row[0] for row in await conn.fetch(_RESOLVE, list(tables))]
                        await conn.execute(f"SET LOCAL search_path = {SEARCH_PATH}")
                    return await read(conn, oids)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise ServiceUnavailable(f"a look-ahead read failed: {exc}") from exc

    def claim_mailbox(self, database: str, oid: int) -> bool:
        """Take mailbox `oid` for a session: False where another session of this proxy has it."""
        if (database, oid) in self._claimed:
            return False
        self._claimed.add((database, oid))
        return True

    def release_mailbox(self, database: str, oid: int) -> None:
        """A claimed mailbox that was never made is free again."""
        self._claimed.discard((database, oid))

    async def close_mailbox(self, database: str, oid: int) -> None:
        """Remove a session's mailbox, if its making reached the server (a failed one may have been made)."""
        self._claimed.discard((database, oid))
        if (database, oid) not in self._mailboxes:
            return
        self._mailboxes.discard((database, oid))  # once tried, whatever comes of it: what is left goes later
        try:
            await self._run(database, _REMOVE_MAILBOX, oid)
        except ServiceUnavailable as exc:
            log.warning("a session's mailbox was not removed", extra={"event": "mailbox_left", "oid": oid,
                                                                       "reason": str(exc)})

    async def close(self) -> None:
        for conn in [*self._connections.values(), *self._readers.values()]:
            await conn.close(timeout=2)
        self._connections.clear()
        self._readers.clear()


def _ssl(upstream: Upstream) -> object:
    if upstream.is_unix or upstream.sslmode == "disable":
        return False
    if upstream.sslmode in ("verify-ca", "verify-full"):
        context = ssl.create_default_context(cafile=upstream.sslrootcert or None)
        context.check_hostname = upstream.sslmode == "verify-full"
        return context
    return upstream.sslmode  # allow, prefer, require: asyncpg's own meaning, as libpq's


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
