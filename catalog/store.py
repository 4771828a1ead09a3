"""The durable catalog: registered models and settings in `<data_dir>/catalog.sqlite3`.

SQLite in WAL mode with synchronous=FULL: every change is one transaction, fsynced before the call
returns, and a process killed mid-write leaves the previous state (the uncommitted tail of the WAL is
ignored on the next open). The schema version lives in PRAGMA user_version. One connection, guarded by a
lock, serves every thread (calls come from worker threads via asyncio.to_thread); writes take the write
lock up front (BEGIN IMMEDIATE) and wait up to `busy_timeout` for another process holding the same file.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from . import settings as _settings
from .errors import (
    DATA_CORRUPTED,
    DISK_FULL,
    DUPLICATE_OBJECT,
    INSUFFICIENT_PRIVILEGE,
    INVALID_PARAMETER_VALUE,
    IO_ERROR,
    LOCK_NOT_AVAILABLE,
    OBJECT_NOT_IN_PREREQUISITE_STATE,
    UNDEFINED_OBJECT,
    CatalogError,
)

log = logging.getLogger(__name__)

CATALOG_FILENAME = "catalog.sqlite3"
SCHEMA_VERSION = 1
BUILTIN_MODEL_URI = "multilingual-e5-small:v1"
BUILTIN_DIMENSIONS = 384
BUILTIN_MAX_SEQ_LENGTH = 512

_SCHEMA_V1 = (
    """CREATE TABLE models (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        uri TEXT NOT NULL UNIQUE,
        model_path TEXT,
        tokenizer_path TEXT,
        dimensions INTEGER CHECK (dimensions IS NULL OR dimensions > 0),
        max_seq_length INTEGER CHECK (max_seq_length IS NULL OR max_seq_length > 0),
        builtin INTEGER NOT NULL DEFAULT 0 CHECK (builtin IN (0, 1)),
        created_at TEXT NOT NULL
    )""",
    "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)

_MODEL_COLUMNS = "id, uri, model_path, tokenizer_path, dimensions, max_seq_length, builtin, created_at"


@dataclass(frozen=True)
class ModelRecord:
    """One registered model. Paths and sizes may be None until the engine has looked at the files."""

    id: int
    uri: str
    model_path: str | None
    tokenizer_path: str | None
    dimensions: int | None
    max_seq_length: int | None
    builtin: bool
    created_at: str  # ISO-8601, UTC
    sha256: str | None = None  # of its files, taken at registration (the catalog in the server keeps it)

    def to_metadata(self) -> dict[str, Any]:
        """The JSON object of model_metadata (the caller adds `loaded`); keys follow the functions' arguments."""
        return {
            "id": self.id,
            "model_uri": self.uri,
            "model_path": self.model_path,
            "tokenizer_path": self.tokenizer_path,
            "dimensions": self.dimensions,
            "max_seq_length": self.max_seq_length,
            "builtin": self.builtin,
            "created_at": self.created_at,
        }

    @classmethod
    def _from_row(cls, row: Sequence[Any]) -> ModelRecord:
        id_, uri, model_path, tokenizer_path, dimensions, max_seq_length, builtin, created_at = row
        return cls(id_, uri, model_path, tokenizer_path, dimensions, max_seq_length, bool(builtin), created_at)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _translate(exc: sqlite3.Error, path: Path) -> CatalogError:
    """A SQLite failure as the SQLSTATE PostgreSQL would give for the same trouble with its own files."""
    name = getattr(exc, "sqlite_errorname", "")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return CatalogError(
            LOCK_NOT_AVAILABLE,
            f"catalog {path} is locked by another process: {exc}",
            hint="Another proxy may be using the same data directory; retry, or give each proxy its own.",
        )
    if name.startswith("SQLITE_FULL"):
        return CatalogError(DISK_FULL, f"no space left to write catalog {path}: {exc}", hint="Free disk space.")
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return CatalogError(
            DATA_CORRUPTED,
            f"catalog {path} is damaged or not a catalog: {exc}",
            hint="Restore it from a backup, or move it aside and the proxy will create an empty catalog.",
        )
    return CatalogError(IO_ERROR, f"cannot use catalog {path}: {exc}", hint="Check the data directory's permissions.")


def check_uri(uri: str | None) -> str:
    if uri is None or not uri.strip():
        raise CatalogError(INVALID_PARAMETER_VALUE, "model_uri must be a non-empty name, e.g. 'my-model:v1'")
    return uri


def check_size(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise CatalogError(INVALID_PARAMETER_VALUE, f"{name} must be a positive integer, got {value!r}")


def effective(setting: _settings.Setting, stored: str | None) -> str:
    """The stored value if it is still valid (the file may be edited by hand), else the default."""
    if stored is not None:
        try:
            return setting.parse(stored)
        except CatalogError:
            log.warning("catalog: ignoring invalid stored value %r of %s", stored, setting.key)
    return setting.default()


class Catalog:
    """The model registry and settings store of one data directory. Thread-safe; close() when done."""

    def __init__(self, data_dir: Path, *, busy_timeout: float = 10.0) -> None:
        data_dir = Path(data_dir)
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = data_dir / CATALOG_FILENAME
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from exc
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except sqlite3.Error as exc:
            self._conn.close()
            raise _translate(exc, self.path) from exc
        except BaseException:
            self._conn.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: committed if the block succeeds, rolled back otherwise."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise _translate(exc, self.path) from exc

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise _translate(exc, self.path) from exc

    def _migrate(self) -> None:
        """Create or check the schema, and make sure the built-in model is present."""
        with self._write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise CatalogError(
                    OBJECT_NOT_IN_PREREQUISITE_STATE,
                    f"catalog {self.path} has schema version {version}; this proxy understands up to {SCHEMA_VERSION}",
                    hint="Upgrade azure-local-ai-proxy, or use another data directory.",
                )
            if version == 0:
                for statement in _SCHEMA_V1:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            row = conn.execute("SELECT id, builtin FROM models WHERE uri = ?", (BUILTIN_MODEL_URI,)).fetchone()
            if row is None:
                id_free = conn.execute("SELECT 1 FROM models WHERE id = 1").fetchone() is None
                conn.execute(
                    "INSERT INTO models (id, uri, dimensions, max_seq_length, builtin, created_at)"
                    " VALUES (?, ?, ?, ?, 1, ?)",
                    (1 if id_free else None, BUILTIN_MODEL_URI, BUILTIN_DIMENSIONS, BUILTIN_MAX_SEQ_LENGTH, _now()),
                )
            elif not row[1]:
                conn.execute("UPDATE models SET builtin = 1 WHERE id = ?", (row[0],))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- settings ---------------------------------------------------------------------------------

    def get_setting(self, key: str) -> str:
        """The value of one setting as text (its default unless set)."""
        setting = _settings.lookup(key)
        rows = self._read("SELECT value FROM settings WHERE key = ?", (setting.key,))
        return effective(setting, rows[0][0] if rows else None)

    def get_settings(self, keys: Sequence[str] | None = None) -> dict[str, str]:
        """key -> value for `keys`, or for every setting when `keys` is None or empty (in a stable order)."""
        wanted = [_settings.lookup(k) for k in keys] if keys else list(_settings.SETTINGS.values())
        stored = dict(self._read("SELECT key, value FROM settings"))
        return {s.key: effective(s, stored.get(s.key)) for s in wanted}

    def get_stored_settings(self) -> dict[str, str]:
        """The settings set (not their defaults), as stored."""
        return dict(self._read("SELECT key, value FROM settings"))

    def set_settings(self, pairs: Mapping[str | None, str | None]) -> None:
        """Validate every pair, then write them all in one transaction; 'default' removes a stored value."""
        changes = dict(_settings.validate(key, value) for key, value in pairs.items())
        if not changes:
            return
        with self._write() as conn:
            for key, value in changes.items():
                if value is None:
                    conn.execute("DELETE FROM settings WHERE key = ?", (key,))
                else:
                    conn.execute(
                        "INSERT INTO settings (key, value) VALUES (?, ?)"
                        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (key, value),
                    )

    def set_setting(self, key: str, value: str) -> None:
        self.set_settings({key: value})

    # -- models -----------------------------------------------------------------------------------

    def register_model(
        self,
        uri: str,
        model_path: str,
        tokenizer_path: str | None = None,
        dimensions: int | None = None,
        max_seq_length: int | None = None,
        sha256: str | None = None,
    ) -> ModelRecord:
        """Add a model and return its record (with its new id); 42710 if the uri is taken. (`sha256`
        matters where many proxies share a catalog: this one is a data directory's own.)"""
        check_uri(uri)
        if not model_path:
            raise CatalogError(INVALID_PARAMETER_VALUE, "model_path must be a non-empty path")
        check_size("dimensions", dimensions)
        check_size("max_seq_length", max_seq_length)
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM models WHERE uri = ?", (uri,)).fetchone():
                raise CatalogError(
                    DUPLICATE_OBJECT,
                    f'model "{uri}" is already registered',
                    hint="Unregister it first with azure_local_ai.model_unregister, or choose another model_uri.",
                )
            conn.execute(
                "INSERT INTO models (uri, model_path, tokenizer_path, dimensions, max_seq_length, builtin, created_at)"
                " VALUES (?, ?, ?, ?, ?, 0, ?)",
                (uri, model_path, tokenizer_path, dimensions, max_seq_length, _now()),
            )
            return self._get(conn, uri)

    def unregister_model(self, uri: str) -> None:
        """Remove a registered model; 42704 if unknown, 42501 for the built-in model."""
        with self._write() as conn:
            record = self._get(conn, uri)
            if record.builtin:
                raise CatalogError(
                    INSUFFICIENT_PRIVILEGE,
                    f'cannot unregister the built-in model "{uri}"',
                    hint="The built-in model is always available; use azure_local_ai.model_unload to free its memory.",
                )
            conn.execute("DELETE FROM models WHERE id = ?", (record.id,))

    def update_model_files(
        self,
        uri: str,
        model_path: str | None,
        tokenizer_path: str | None,
        dimensions: int | None,
        max_seq_length: int | None,
    ) -> ModelRecord:
        """Record where a model's files are and their sizes (the engine fills these in for the built-in)."""
        check_size("dimensions", dimensions)
        check_size("max_seq_length", max_seq_length)
        with self._write() as conn:
            record = self._get(conn, uri)
            conn.execute(
                "UPDATE models SET model_path = ?, tokenizer_path = ?, dimensions = ?, max_seq_length = ? WHERE id = ?",
                (model_path, tokenizer_path, dimensions, max_seq_length, record.id),
            )
            return self._get(conn, uri)

    def get_model(self, uri: str) -> ModelRecord:
        """The record of `uri`; 42704 naming the registered models if there is none."""
        with self._lock:
            try:
                return self._get(self._conn, uri)
            except sqlite3.Error as exc:
                raise _translate(exc, self.path) from exc

    def list_models(self) -> list[ModelRecord]:
        """Every registered model, the built-in one first, then in order of registration."""
        rows = self._read(f"SELECT {_MODEL_COLUMNS} FROM models ORDER BY builtin DESC, id")
        return [ModelRecord._from_row(row) for row in rows]

    def _get(self, conn: sqlite3.Connection, uri: str) -> ModelRecord:
        check_uri(uri)
        row = conn.execute(f"SELECT {_MODEL_COLUMNS} FROM models WHERE uri = ?", (uri,)).fetchone()
        if row is None:
            known = [r[0] for r in conn.execute("SELECT uri FROM models ORDER BY builtin DESC, id")]
            raise CatalogError(
                UNDEFINED_OBJECT,
                f'model "{uri}" is not registered',
                hint=f"Registered models: {', '.join(known)}. Add one with azure_local_ai.model_register.",
            )
        return ModelRecord._from_row(row)
