"""The proxy's own connections to the server, one per database, through which it writes the answers
to the calls the server evaluates (see intercept/servercalls.py) into each session's mailbox: a large
object that only the session it was made for is told about, which lives while a statement of that
session asks (so that pg_dump finds none, but for the statements running as it dumps)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

import asyncpg

from .upstream import Upstream

log = logging.getLogger("azure_local_ai_proxy.service")

#: What a mailbox's comment begins with; it ends with the server backend the mailbox is for, so that
#: mailboxes left by a proxy that stopped abruptly (or restored from a dump) can be told and removed.
MAILBOX_COMMENT = "azure-local-ai-proxy mailbox of backend "
#: Mailboxes whose backend is gone: removed whenever a service connection is opened.
_LEFT_MAILBOXES = f"""
SELECT count(pg_catalog.lo_unlink(m.oid))
FROM pg_catalog.pg_largeobject_metadata m
JOIN pg_catalog.pg_description d ON d.objoid = m.oid AND d.classoid = 'pg_catalog.pg_largeobject'::regclass
WHERE m.lomowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user)
  AND d.description LIKE '{MAILBOX_COMMENT}%'
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE d.description = '{MAILBOX_COMMENT}' || a.pid)"""
_INLINE_ANSWER = 1 << 16  # a first answer up to this size goes in the statement that makes the mailbox
_GENERATED_EMBEDDINGS = """
SELECT a.attname::text, a.attgenerated::text,
       CASE WHEN a.attgenerated = 's' THEN pg_catalog.pg_get_expr(d.adbin, d.adrelid) END
FROM pg_catalog.pg_attribute a
LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = pg_catalog.to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
  AND (a.attgenerated <> 's' OR pg_catalog.pg_get_expr(d.adbin, d.adrelid) LIKE '%azure_local_ai.create_embeddings(%')
ORDER BY a.attnum"""


class ServiceUnavailable(Exception):
    """The service login cannot reach the server (or is not configured): the call gets this error."""


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

    async def _connection(self, database: str, pool: dict[str, asyncpg.Connection] | None = None) -> asyncpg.Connection:
        pool = self._connections if pool is None else pool
        conn = pool.get(database)
        if conn is not None and not conn.is_closed():
            return conn
        try:
            conn = await asyncpg.connect(
                host=self.upstream.host, port=self.upstream.port, user=self.user, password=self.password or None,
                database=database, ssl=_ssl(self.upstream), timeout=self.upstream.connect_timeout,
                server_settings={"application_name": "azure-local-ai-proxy service", "synchronous_commit": "off"},
                # The writer runs a few statements over and over: prepared once, each is one round trip.
                # Readers run each look-ahead's own query once.
                statement_cache_size=100 if pool is self._connections else 0,
            )
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            raise ServiceUnavailable(
                f"the proxy's service login {self.user!r} cannot connect to database {database!r}: {exc}"
            ) from exc
        pool[database] = conn
        if pool is self._connections:
            await self._remove_left_mailboxes(conn, database)
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
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise ServiceUnavailable(f"the proxy's service connection to {database!r} failed: {exc}") from exc

    async def open_mailbox(
        self, database: str, oid: int, backend_pid: int, role: str, at: int, first: bytes, unlock: int | None = None
    ) -> None:
        """Create the mailbox large object `oid` for server backend `backend_pid`, holding `first` (the
        statement's first answer, if any yet) at `at`, readable and writable by `role` only (and by the
        service login, its owner), and let go of the advisory lock `unlock`: one round trip."""
        inline = len(first) <= _INLINE_ANSWER
        write = (f"SELECT pg_catalog.lo_put({int(oid)}, {int(at)}, decode('{first.hex()}', 'hex')); "
                 if inline and first else "")
        release = f"; SELECT pg_catalog.pg_advisory_unlock({int(unlock)})" if unlock is not None and inline else ""
        sql = (f"SELECT pg_catalog.lo_create({int(oid)}); {write}"
               f"COMMENT ON LARGE OBJECT {int(oid)} IS '{MAILBOX_COMMENT}{int(backend_pid)}'; "
               f"GRANT SELECT, UPDATE ON LARGE OBJECT {int(oid)} TO {_ident(role)}{release}")
        async with self._locks.setdefault(database, asyncio.Lock()):
            conn = await self._connection(database)
            try:
                await conn.execute(sql)  # several statements, one implicit transaction
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
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
            await self._run(database, "SELECT pg_catalog.lo_put($1::oid, $2::bigint, $3::bytea), "
                            "pg_catalog.pg_advisory_unlock($4::bigint)", oid, at, data, unlock)

    async def write_many(self, database: str, oid: int, places: list[int], answers: list[bytes]) -> None:
        """Write answers at their places, in one round trip."""
        await self._run(database, "SELECT count(pg_catalog.lo_put($1::oid, u.p, u.d)) "
                        "FROM unnest($2::bigint[], $3::bytea[]) AS u(p, d)", oid, places, answers)

    async def try_lock(self, database: str, key: int) -> bool:
        """Take the advisory lock `key` if it is free (never wait: the connection serves every session)."""
        return bool(await self._run(database, "SELECT pg_catalog.pg_try_advisory_lock($1::bigint)", key))

    async def unlock(self, database: str, key: int) -> None:
        with contextlib.suppress(ServiceUnavailable):  # a lost connection has let go of its locks
            await self._run(database, "SELECT pg_catalog.pg_advisory_unlock($1::bigint)", key)

    async def may_manage(self, database: str, login: str, role: str) -> bool:
        """Whether a session logged in as `login` may act as `role`, and `role` may change settings and
        models: what the extension's SQL functions check themselves, checked again where the request
        cannot be forged."""
        return bool(await self._run(
            database,
            "SELECT pg_catalog.pg_has_role($1, $2, 'MEMBER') AND ((SELECT rolsuper FROM pg_catalog.pg_roles "
            "WHERE rolname = $2) OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname IN "
            "('azure_pg_admin', 'azure_local_ai_setting_manager') AND pg_catalog.pg_has_role($2, r.oid, 'MEMBER')))",
            login, role,
        ))

    async def read_texts(self, database: str, login: str, query: str, limit: int, offset: int = 0) -> list[str]:
        """The texts a look-ahead query yields (lookahead.py), at most `limit` from `offset` on."""
        sql = f"SELECT t FROM ({query}) AS lookahead(t) WHERE t IS NOT NULL LIMIT {int(limit)} OFFSET {int(offset)}"
        return [row[0] for row in await self._read(database, login, sql)]

    async def generated_embeddings(self, database: str, login: str, table: str) -> tuple[list[str], list[str]]:
        """A table's columns that are not generated, in order, and the expressions of its stored
        generated columns that call create_embeddings (none if the login cannot see the table)."""
        rows = await self._read(database, login, _GENERATED_EMBEDDINGS, table)
        columns = [name for name, generated, _ in rows if generated == ""]
        return columns, [expression for _, generated, expression in rows if generated == "s" and expression]

    async def reads_handed_over(self, database: str, login: str) -> bool:
        """Whether the database's create_embeddings reads an answer handed over with the statement
        (the extension's objects are of version 1.2 or later)."""
        rows = await self._read(database, login, "SELECT prosrc LIKE '%azure_local_ai.proxy_kept%' FROM "
                                "pg_catalog.pg_proc WHERE oid = pg_catalog.to_regprocedure("
                                "'azure_local_ai.create_embeddings(text, text, integer)')")
        return bool(rows and rows[0][0])

    async def _read(self, database: str, login: str, sql: str, *args: object) -> list[asyncpg.Record]:
        """Rows of a query run read-only as the session's login, so that it reads only what the
        session's statement could, and can change nothing."""
        async with self._reader_locks.setdefault(database, asyncio.Lock()):
            conn = await self._connection(database, self._readers)
            try:
                async with conn.transaction(readonly=True):
                    # Never waiting for a lock: a table the session's own statement locks is read before it.
                    await conn.execute(f"SET LOCAL ROLE {_ident(login)}; SET LOCAL statement_timeout = 30000; "
                                       "SET LOCAL lock_timeout = 100; SET LOCAL standard_conforming_strings = on")
                    return await conn.fetch(sql, *args)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise ServiceUnavailable(f"a look-ahead read failed: {exc}") from exc

    async def close_mailbox(self, database: str, oid: int) -> None:
        try:
            await self._run(database, "SELECT pg_catalog.lo_unlink($1::oid)", oid)
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
