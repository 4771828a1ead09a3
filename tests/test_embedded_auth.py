"""The embedded server's logins: a password (scram-sha-256) when embedded_password is set, a refusal to
start on a listener beyond loopback without one, and the proxy's own service login a plain role."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import psycopg
import pytest

from proxy import config as cfg
from proxy.cli import _exposed_embedded

from .pgcluster import free_port, proxy_data_dir
from .proxyproc import ProxyProcess, start_proxy

PASSWORD_ENV = cfg.ENV_PREFIX + "EMBEDDED_PASSWORD"
MODEL = "multilingual-e5-small:v1"
CONSOLE = "azure_local_ai_proxy"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_client_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients here send only the passwords the tests give them (no PGPASSWORD, no ~/.pgpass)."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", os.devnull)


@pytest.fixture
def data_dir(model_data_dir: Path) -> Iterator[Path]:
    """A fresh data directory for the embedded server, sharing the built model (not built again)."""
    with proxy_data_dir(model_data_dir) as directory:
        yield directory


def _start_exposed(data_dir: Path, password: str) -> ProxyProcess:
    """The embedded server behind a listener on every address, with `password` from the environment."""
    port = free_port()
    return start_proxy(data_dir, "--listen", f"0.0.0.0:{port}", "--admin-users", "postgres", upstream=None,
                       port=port, env={PASSWORD_ENV: password})


def _login_sqlstate(proxy: ProxyProcess, password: str) -> str | None:
    """The SQLSTATE a login as postgres with `password` gets (psycopg does not report it; asyncpg does)."""
    async def attempt() -> str | None:
        try:
            conn = await asyncpg.connect(proxy.dsn(password=password), timeout=10)
        except asyncpg.PostgresError as exc:
            return exc.sqlstate
        await conn.close()
        return None
    return asyncio.run(attempt())


def _assert_password_required(proxy: ProxyProcess, password: str) -> None:
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(proxy.dsn(), connect_timeout=10)
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "postgres"'):
        psycopg.connect(proxy.dsn(password="not-" + password), connect_timeout=10)
    assert _login_sqlstate(proxy, "not-" + password) == "28P01"
    with psycopg.connect(proxy.dsn(password=password), connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


def _wait_for_log(proxy: ProxyProcess, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in proxy.log:
        assert time.monotonic() < deadline, proxy.log
        time.sleep(0.05)


def test_an_exposed_listener_without_a_password_is_refused(tmp_path: Path) -> None:
    """Refused at once, before the embedded server starts, saying what to set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(cfg.ENV_PREFIX + "EMBEDDED_")}
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", "--listen", f"0.0.0.0:{free_port()}", "--data-dir",
         str(tmp_path), "--preload-model", "false"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )
    assert out.returncode == 2, out
    assert time.monotonic() - started < 20
    assert out.stderr.startswith("azure-local-ai-proxy: refusing to start: listen = 0.0.0.0:")
    for advice in (PASSWORD_ENV, "embedded_password", "embedded_trust = true", "--embedded-trust true"):
        assert advice in out.stderr
    assert out.stderr.count("\n") == 1  # one paragraph
    assert not (tmp_path / "postgres").exists()


def test_embedded_trust_lets_an_exposed_listener_start(data_dir: Path) -> None:
    port = free_port()
    proxy = start_proxy(data_dir, "--listen", f"0.0.0.0:{port}", "--embedded-trust", "true",
                        upstream=None, port=port)
    try:
        with psycopg.connect(proxy.dsn(), connect_timeout=10) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
        assert "event=embedded_trust" in proxy.log
    finally:
        assert proxy.stop() == 0


def test_a_password_is_asked_for_and_can_be_changed(data_dir: Path) -> None:
    """With embedded_password every login needs its password; restarted with another, on the same
    cluster (pg_hba.conf already scram-sha-256), the new one works and the old one no longer does.
    Neither is ever logged nor shown by SHOW CONFIG."""
    old, new = "first-Secret-1", "second-Secret-2"
    first = _start_exposed(data_dir, old)
    try:
        _assert_password_required(first, old)
        out = first.psql("-A", "-t", "-F", "\t", "-c", "SHOW CONFIG",
                         dsn=first.dsn(password=old, database=CONSOLE)).stdout
        config = {row.split("\t")[0]: row.split("\t")[1:] for row in out.splitlines()}
        assert config["embedded_password"] == ["(set)", "", "no"]
        assert config["embedded_trust"][0] == "false"
        assert old not in out
        _wait_for_log(first, "it asks for postgres's password")
        assert re.search(r"psql 'postgresql://postgres@127\.0\.0\.1:\d+/postgres'", first.log)
    finally:
        assert first.stop() == 0
    second = _start_exposed(data_dir, new)
    try:
        _assert_password_required(second, new)
        assert _login_sqlstate(second, old) == "28P01"
    finally:
        assert second.stop() == 0
    server_log = (data_dir / "postgres" / "log").read_text()
    for text in (first.log, second.log, server_log):
        assert old not in text and new not in text


def test_the_service_login_is_a_plain_role(data_dir: Path) -> None:
    """The proxy's service connections log in as azure_local_ai_service (no superuser, reads all data,
    its password kept in DATA_DIR/service-password, mode 0600), through scram-sha-256; the calls the
    server evaluates still get their answers."""
    password = "service-Secret-3"
    proxy = start_proxy(data_dir, upstream=None, env={PASSWORD_ENV: password})
    try:
        with psycopg.connect(proxy.dsn(password=password), autocommit=True, connect_timeout=10) as conn:
            role = conn.execute(
                "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolcanlogin, "
                "pg_has_role(rolname, 'pg_read_all_data', 'MEMBER') FROM pg_roles "
                "WHERE rolname = 'azure_local_ai_service'").fetchone()
            assert role == (False, False, False, False, False, True, True)
            conn.execute("CREATE EXTENSION azure_local_ai")
            conn.execute("CREATE TABLE d (id int, body text, v real[])")
            conn.execute("INSERT INTO d VALUES (1, 'hello')")
            updated = conn.execute(f"UPDATE d SET v = azure_local_ai.create_embeddings('{MODEL}', body)")
            assert updated.rowcount == 1
            (stored,) = conn.execute("SELECT v FROM d").fetchone()
            (constant,) = conn.execute(f"SELECT azure_local_ai.create_embeddings('{MODEL}', 'hello')").fetchone()
            assert stored is not None and len(stored) == 384 and stored == constant
            logins = conn.execute("SELECT usename, count(*) FROM pg_stat_activity WHERE backend_type = "
                                  "'client backend' AND pid <> pg_backend_pid() GROUP BY 1").fetchall()
            assert [name for name, _ in logins] == ["azure_local_ai_service"]
    finally:
        assert proxy.stop() == 0
    kept = data_dir / "service-password"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    secret = kept.read_text().strip()
    assert len(secret) >= 32 and secret not in proxy.log and password not in proxy.log


@pytest.mark.parametrize(("listen", "refused"), [
    ("127.0.0.1:6432", False), ("127.0.0.2:6432", False), ("localhost:6432", False), ("[::1]:6432", False),
    (":6432", False), ("0.0.0.0:6432", True), ("[::]:6432", True), ("192.0.2.7:6432", True), ("db.example:6432", True),
])
def test_which_listeners_need_a_password(listen: str, refused: bool) -> None:
    """Loopback addresses may trust; any other (a name too: it may resolve anywhere) needs a password
    or embedded_trust."""
    config = replace(cfg.load(None), listen=listen)
    assert (_exposed_embedded(config) is not None) == refused
    assert _exposed_embedded(replace(config, embedded_password="pw")) is None
    assert _exposed_embedded(replace(config, embedded_trust=True)) is None
