"""The catalog kept in the PostgreSQL server, for any number of proxies in front of it: registered
models and settings in the schema azure_local_ai_catalog, so that every proxy agrees.

Reads come from a snapshot in memory, read anew whenever the catalog changes: each change is one
transaction of the server's, which ends with a NOTIFY on CATALOG_CHANNEL, and every proxy LISTENs
(listen()). A proxy that cannot reach the server goes on with the last snapshot it read (`problem`
says why, for /healthz and SHOW STATS), and reads the whole catalog again once it can. Two proxies
changing the same thing at once end as one of the two orders would have left it: each change is a
statement the server serialises (a unique key, ON CONFLICT).

The built-in model's row holds no paths: each proxy builds it in its own data directory, and shows
where. A registered model's files must be the same for every proxy (a shared volume, the same image):
their SHA-256, taken at registration, is kept with them (ModelRecord.sha256), and a proxy whose copy
differs refuses the model (see inference's check)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace

import psycopg
from psycopg import sql

from . import settings as _settings
from .errors import (
    DUPLICATE_OBJECT,
    INSUFFICIENT_PRIVILEGE,
    INVALID_PARAMETER_VALUE,
    IO_ERROR,
    UNDEFINED_OBJECT,
    CatalogError,
)
from .store import (
    BUILTIN_DIMENSIONS,
    BUILTIN_MAX_SEQ_LENGTH,
    BUILTIN_MODEL_URI,
    Catalog,
    ModelRecord,
    check_size,
    check_uri,
    effective,
)

log = logging.getLogger(__name__)

SCHEMA = "azure_local_ai_catalog"
CATALOG_CHANNEL = "azure_local_ai_catalog"
#: How often a proxy whose listening connection is down reads the catalog again, in seconds.
RETRY_S = 1.0
#: The longest a catalog statement may take (a lock held by another's change, a server in trouble).
STATEMENT_TIMEOUT_MS = 10_000

_DDL = f"""
SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('{SCHEMA}'));  -- proxies starting together
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.models (
    id bigserial PRIMARY KEY,
    uri text NOT NULL UNIQUE,
    model_path text,
    tokenizer_path text,
    dimensions integer CHECK (dimensions IS NULL OR dimensions > 0),
    max_seq_length integer CHECK (max_seq_length IS NULL OR max_seq_length > 0),
    builtin boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    sha256 text
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.settings (key text PRIMARY KEY, value text NOT NULL);
INSERT INTO {SCHEMA}.models (uri, dimensions, max_seq_length, builtin)
    VALUES ('{BUILTIN_MODEL_URI}', {BUILTIN_DIMENSIONS}, {BUILTIN_MAX_SEQ_LENGTH}, true)
    ON CONFLICT (uri) DO NOTHING;
"""
_MODELS = (f"SELECT id, uri, model_path, tokenizer_path, dimensions, max_seq_length, builtin, "
           f"to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'), sha256 "
           f"FROM {SCHEMA}.models ORDER BY builtin DESC, id")
_NOTIFY = f"SELECT pg_catalog.pg_notify('{CATALOG_CHANNEL}', '')"
#: Whether the schema and everything in it are the service login's own. Another role that made the
#: schema first (it may create in the database) could put triggers or rules on its tables, which the
#: proxy's writes would run as the service login; or models of its choosing.
_OWN = f"""
SELECT n.nspowner = r.oid AND NOT EXISTS (
    SELECT FROM pg_catalog.pg_class c WHERE c.relnamespace = n.oid AND c.relowner <> r.oid)
FROM pg_catalog.pg_namespace n, pg_catalog.pg_roles r
WHERE n.nspname = '{SCHEMA}' AND r.rolname = current_user"""


class ServerCatalog:
    """The catalog of the server at `conninfo` (a libpq connection string of the service login), with
    the same calls as Catalog; `local`, the data directory's own catalog, is imported once into an
    empty one. Thread-safe: calls come from worker threads."""

    def __init__(self, conninfo: str, local: Catalog | None = None) -> None:
        self.conninfo = conninfo
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self._settings: dict[str, str] = {}
        self._models: dict[str, ModelRecord] = {}
        #: Where this proxy keeps the built-in model's files (update_model_files), shown as its own.
        self._builtin_files: tuple[str | None, str | None] = (None, None)
        #: Why the catalog cannot be read now (the last snapshot serves meanwhile); None when it can.
        self.problem: str | None = None
        #: Called (from any thread) after the snapshot changed: what changed is for the caller to see.
        self.on_change: Callable[[], None] | None = None
        # What the data directory's catalog holds, to import into an empty one (once it can be reached).
        self._to_import: tuple[dict[str, str], list[ModelRecord]] | None = None
        if local is not None:
            self._to_import = (local.get_stored_settings(), [m for m in local.list_models() if not m.builtin])
        self._set_up = False
        try:
            self._set_up_once()
        except CatalogError as exc:
            if not isinstance(exc.__cause__, psycopg.OperationalError):
                raise  # reached, and refused (no right to make the schema): the caller says what to do
            # Out of reach: what the data directory's catalog says serves until the server's can be read.
            self.problem = str(exc)
            if local is not None:
                self._settings = local.get_stored_settings()
                self._models = {m.uri: replace(m, model_path=None, tokenizer_path=None) if m.builtin else m
                                for m in local.list_models()}  # the built-in model first

    def _set_up_once(self) -> None:
        """Make the schema if need be and import the data directory's catalog into an empty one, then
        read it; once."""
        if self._set_up:
            return
        with self._writing() as conn:
            conn.execute(_DDL)
            own = conn.execute(_OWN).fetchone()
            if not own or not own[0]:
                raise CatalogError(
                    INSUFFICIENT_PRIVILEGE, f"the schema {SCHEMA} is not the service login's own: another role made "
                    "it, or something in it", hint=f"Drop it, or give it and all in it to the service login "
                    f"(ALTER SCHEMA {SCHEMA} OWNER TO ...), and restart the proxy.")
            if self._to_import is not None:
                self._import(conn, *self._to_import)
        self._set_up = True
        self._to_import = None
        self.refresh()

    # -- plumbing ---------------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = _connect(self.conninfo)
        return self._conn

    @contextmanager
    def _writing(self) -> Iterator[psycopg.Connection]:
        """One transaction of the server's that ends with the catalog's NOTIFY; its failure as a
        CatalogError (those the statements raise pass as they are)."""
        with self._lock:
            try:
                conn = self._connection()
                with conn.transaction():
                    yield conn
                    conn.execute(_NOTIFY)
            except CatalogError:
                raise
            except psycopg.Error as exc:
                if self._conn is not None and self._conn.broken:
                    self._conn = None
                raise CatalogError(IO_ERROR, f"the catalog in the server cannot be written: {exc}",
                                   hint="Check that the proxy's service login reaches the server.") from exc

    def refresh(self) -> None:
        """Read the whole catalog anew (after a change anywhere); keep the last snapshot if it cannot.
        Read and swapped under the lock: two refreshes never leave the older reading in place."""
        with self._lock:
            try:
                conn = self._connection()
                settings = dict(conn.execute(f"SELECT key, value FROM {SCHEMA}.settings").fetchall())
                models = {m.uri: m for m in (_record(row) for row in conn.execute(_MODELS).fetchall())}
            except psycopg.Error as exc:
                if self._conn is not None and self._conn.broken:
                    self._conn = None
                if self.problem is None:
                    log.warning("the catalog in the server cannot be read; going on with the last one read",
                                extra={"event": "catalog_unreachable", "reason": str(exc)})
                self.problem = f"the catalog in the server cannot be read: {exc}"
                return
            changed = settings != self._settings or models != self._models
            self._settings, self._models = settings, models
            if self.problem is not None:
                log.info("the catalog in the server is read again", extra={"event": "catalog_reachable"})
            self.problem = None
        if changed and self.on_change is not None:
            self.on_change()

    def _import(self, conn: psycopg.Connection, settings: dict[str, str], models: list[ModelRecord]) -> None:
        """A data directory's own catalog, into a server catalog that has nothing yet: once."""
        if not settings and not models:
            return
        has = conn.execute(f"SELECT (SELECT count(*) FROM {SCHEMA}.settings) + "
                           f"(SELECT count(*) FROM {SCHEMA}.models WHERE NOT builtin)").fetchone()
        if has is None or has[0]:
            return
        for key, value in settings.items():
            conn.execute(f"INSERT INTO {SCHEMA}.settings (key, value) VALUES (%s, %s)", (key, value))
        for m in models:
            conn.execute(f"INSERT INTO {SCHEMA}.models (uri, model_path, tokenizer_path, dimensions, max_seq_length) "
                         "VALUES (%s, %s, %s, %s, %s)", (m.uri, m.model_path, m.tokenizer_path, m.dimensions,
                                                        m.max_seq_length))
        log.info("imported the data directory's catalog into the server's, once",
                 extra={"event": "catalog_imported", "settings": len(settings), "models": len(models)})

    async def listen(self) -> None:
        """Follow the catalog's changes (LISTEN), reading it anew after them, until cancelled; with the
        listening connection down, read it every RETRY_S seconds until it is up again. Any role may
        NOTIFY the channel: notifications that come while the catalog is being read make one more
        reading, not one each."""
        changed = asyncio.Event()

        async def reread() -> None:
            while True:
                await changed.wait()
                changed.clear()
                await asyncio.to_thread(self.refresh)

        rereading = asyncio.get_running_loop().create_task(reread())
        try:
            await self._follow(changed)
        finally:
            rereading.cancel()

    async def _follow(self, changed: asyncio.Event) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        self.conninfo, autocommit=True, application_name="azure-local-ai-proxy catalog") as conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CATALOG_CHANNEL)))
                    await asyncio.to_thread(self._set_up_once)
                    changed.set()  # what changed before it listened
                    async for _ in conn.notifies():
                        changed.set()
            except (psycopg.Error, CatalogError) as exc:
                if self.problem is None:
                    self.problem = f"the catalog in the server cannot be followed: {exc}"
                    log.warning("the catalog's changes cannot be followed", extra={"event": "catalog_unreachable",
                                                                                   "reason": str(exc)})
            await asyncio.sleep(RETRY_S)
            if self._set_up:
                await asyncio.to_thread(self.refresh)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- settings ---------------------------------------------------------------------------------

    def get_setting(self, key: str) -> str:
        setting = _settings.lookup(key)
        return effective(setting, self._settings.get(setting.key))

    def get_settings(self, keys: Sequence[str] | None = None) -> dict[str, str]:
        wanted = [_settings.lookup(k) for k in keys] if keys else list(_settings.SETTINGS.values())
        stored = self._settings
        return {s.key: effective(s, stored.get(s.key)) for s in wanted}

    def set_settings(self, pairs: Mapping[str | None, str | None]) -> None:
        changes = dict(_settings.validate(key, value) for key, value in pairs.items())
        if not changes:
            return
        with self._writing() as conn:
            for key, value in changes.items():
                if value is None:
                    conn.execute(f"DELETE FROM {SCHEMA}.settings WHERE key = %s", (key,))
                else:
                    conn.execute(f"INSERT INTO {SCHEMA}.settings (key, value) VALUES (%s, %s) "
                                 "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))
        self.refresh()

    def set_setting(self, key: str, value: str) -> None:
        self.set_settings({key: value})

    # -- models -----------------------------------------------------------------------------------

    def register_model(self, uri: str, model_path: str, tokenizer_path: str | None = None,
                       dimensions: int | None = None, max_seq_length: int | None = None,
                       sha256: str | None = None) -> ModelRecord:
        check_uri(uri)
        if not model_path:
            raise CatalogError(INVALID_PARAMETER_VALUE, "model_path must be a non-empty path")
        check_size("dimensions", dimensions)
        check_size("max_seq_length", max_seq_length)
        with self._writing() as conn:
            row = conn.execute(
                f"INSERT INTO {SCHEMA}.models (uri, model_path, tokenizer_path, dimensions, max_seq_length, sha256) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (uri) DO NOTHING RETURNING id",
                (uri, model_path, tokenizer_path, dimensions, max_seq_length, sha256)).fetchone()
            if row is None:
                raise CatalogError(
                    DUPLICATE_OBJECT, f'model "{uri}" is already registered',
                    hint="Unregister it first with azure_local_ai.model_unregister, or choose another model_uri.")
            (record,) = [_record(found) for found in conn.execute(_MODELS).fetchall() if found[1] == uri]
        self.refresh()
        return record

    def unregister_model(self, uri: str) -> None:
        check_uri(uri)
        with self._writing() as conn:
            row = conn.execute(f"DELETE FROM {SCHEMA}.models WHERE uri = %s AND NOT builtin RETURNING id",
                               (uri,)).fetchone()
            if row is None:
                self._missing_or_builtin(conn, uri)
        self.refresh()

    def _missing_or_builtin(self, conn: psycopg.Connection, uri: str) -> None:
        found = conn.execute(f"SELECT builtin FROM {SCHEMA}.models WHERE uri = %s", (uri,)).fetchone()
        if found is not None:
            raise CatalogError(
                INSUFFICIENT_PRIVILEGE, f'cannot unregister the built-in model "{uri}"',
                hint="The built-in model is always available; use azure_local_ai.model_unload to free its memory.")
        raise self._undefined(uri)

    def update_model_files(self, uri: str, model_path: str | None, tokenizer_path: str | None,
                           dimensions: int | None, max_seq_length: int | None) -> ModelRecord:
        """Where this proxy keeps the built-in model's files (its own: not written to the server)."""
        check_size("dimensions", dimensions)
        check_size("max_seq_length", max_seq_length)
        record = self.get_model(uri)
        if not record.builtin:
            raise CatalogError(INVALID_PARAMETER_VALUE, f'the files of "{uri}" are given at its registration')
        self._builtin_files = (model_path, tokenizer_path)
        return self.get_model(uri)

    def get_model(self, uri: str) -> ModelRecord:
        check_uri(uri)
        record = self._models.get(uri)
        if record is None:
            raise self._undefined(uri)
        if record.builtin:
            model_path, tokenizer_path = self._builtin_files
            record = replace(record, model_path=model_path, tokenizer_path=tokenizer_path)
        return record

    def list_models(self) -> list[ModelRecord]:
        return [self.get_model(uri) for uri in self._models]

    def _undefined(self, uri: str) -> CatalogError:
        return CatalogError(
            UNDEFINED_OBJECT, f'model "{uri}" is not registered',
            hint=f"Registered models: {', '.join(self._models)}. Add one with azure_local_ai.model_register.")


def _connect(conninfo: str) -> psycopg.Connection:
    """A connection of the service login, with no name resolving to an object another role made (set
    after connecting: a pooler refuses a start-up parameter it does not know)."""
    conn = psycopg.connect(conninfo, autocommit=True, application_name="azure-local-ai-proxy catalog")
    conn.execute("SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', false), "
                 f"pg_catalog.set_config('statement_timeout', '{STATEMENT_TIMEOUT_MS}', false)")
    return conn


def _record(row: Sequence[object]) -> ModelRecord:
    id_, uri, model_path, tokenizer_path, dimensions, max_seq_length, builtin, created_at, sha256 = row
    return ModelRecord(int(id_), str(uri), model_path, tokenizer_path, dimensions, max_seq_length,  # type: ignore[arg-type]
                       bool(builtin), str(created_at), sha256)  # type: ignore[arg-type]
