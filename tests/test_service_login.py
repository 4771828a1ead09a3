"""What the proxy says when its own connections cannot be made: a service login the server refuses
(a wrong service_password) and an upstream server that is not there. Each is said at start-up (a
warning in the log), in /healthz, and, for the service login, to the client whose statement needed an
answer: the error names the cause and what to set, rather than 'canceling statement due to user request'."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from .conftest import SCRAM_PASSWORD
from .helpers import new_database
from .pgcluster import PgCluster, free_port, start_cluster
from .proxyproc import ProxyProcess, start_proxy
from .test_http import closed_port

MODEL = "multilingual-e5-small:v1"


def data_dir_with_models(tmp_path: Path, model_data_dir: Path) -> Path:
    """A fresh data directory that shares the built model (no build at start-up)."""
    data_dir = tmp_path / "proxy"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(model_data_dir / "models", target_is_directory=True)
    return data_dir


def healthz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def wait_for_log(proxy: ProxyProcess, text: str, timeout: float = 30) -> str:
    """The log line holding `text`, once the proxy has written it."""
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in proxy.log.splitlines() if text in line]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"{text!r} is not in the log:\n{proxy.log}"
        time.sleep(0.05)


@pytest.fixture()
def database(pg: PgCluster) -> Iterator[str]:
    with new_database(pg, "svc", "vector") as name:
        yield name


@pytest.fixture()
def wrong_password(pg: PgCluster, model_data_dir: Path, tmp_path: Path) -> Iterator[tuple[ProxyProcess, int]]:
    """The proxy, with an HTTP listener (its port), whose service login the server refuses: scram_user,
    whom the server asks for a password (SCRAM), with a wrong one."""
    http_port = free_port()
    proxy = start_proxy(data_dir_with_models(tmp_path, model_data_dir), "--service-user", "scram_user",
                        "--service-password", "not-" + SCRAM_PASSWORD, "--http-listen", f"127.0.0.1:{http_port}",
                        upstream=pg.url())
    yield proxy, http_port
    proxy.stop()


def test_a_statement_whose_answer_the_service_login_cannot_write_fails_with_the_cause(
    wrong_password: tuple[ProxyProcess, int], database: str
) -> None:
    """CREATE EXTENSION works (it needs no service login); an INSERT whose generated column the server
    evaluates cannot get its answer: it fails with why, and what to set, not with the proxy's cancel."""
    proxy, _ = wrong_password
    with psycopg.connect(proxy.dsn(database=database), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION azure_local_ai")
        conn.execute("CREATE TABLE docs (id int, body text, v real[] GENERATED ALWAYS AS "
                     f"(azure_local_ai.create_embeddings('{MODEL}', body)) STORED)")
        started = time.monotonic()
        with pytest.raises(psycopg.Error) as failed:
            conn.execute("INSERT INTO docs (id, body) VALUES (1, 'never embedded')")
        assert time.monotonic() - started < 30
        error = failed.value.diag
        assert error.sqlstate == "08001", (error.sqlstate, error.message_primary)
        assert error.message_primary.startswith(
            'azure-local-ai-proxy cannot answer azure_local_ai.create_embeddings: its service login '
            f'"scram_user" cannot connect to database "{database}": password authentication failed'
        ), error.message_primary
        assert "set service_password" in (error.message_hint or ""), error.message_hint
        # The session goes on: a statement that asks nothing of the service login works, one that asks fails alike.
        assert conn.execute("SELECT count(*) FROM docs").fetchone() == (0,)
        with pytest.raises(psycopg.errors.SqlclientUnableToEstablishSqlconnection):
            conn.execute("INSERT INTO docs (id, body) VALUES (2, 'never embedded either')")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert "event=server_call_failed" in proxy.log
    assert "a session's mailbox was not removed" not in proxy.log  # none was ever made


def test_a_wrong_service_password_is_said_at_start_up_and_in_healthz(
    wrong_password: tuple[ProxyProcess, int]
) -> None:
    proxy, http_port = wrong_password
    warning = wait_for_log(proxy, "event=service_login_failed")
    assert "user=scram_user" in warning and "password authentication failed" in warning, warning
    status, answer = healthz(http_port)
    assert status == 503, answer
    assert any('service login "scram_user" cannot connect' in problem
               and "password authentication failed" in problem for problem in answer["problems"]), answer


def test_a_wrong_service_password_made_right_on_the_server_is_healthy_again(
    model_data_dir: Path, tmp_path: Path
) -> None:
    """/healthz looks again at a service login it found failing (not at every scrape): once the server
    takes the password, the proxy is healthy without a restart. A cluster of its own, whose scram_user's
    password the test changes."""
    cluster = start_cluster()
    try:
        cluster.psql("CREATE ROLE scram_user LOGIN PASSWORD 'right'")
        http_port = free_port()
        proxy = start_proxy(data_dir_with_models(tmp_path, model_data_dir), "--service-user", "scram_user",
                            "--service-password", "wrong", "--http-listen", f"127.0.0.1:{http_port}",
                            upstream=cluster.url())
        try:
            wait_for_log(proxy, "event=service_login_failed")
            assert healthz(http_port)[0] == 503
            cluster.psql("ALTER ROLE scram_user PASSWORD 'wrong'")
            deadline = time.monotonic() + 30
            while (answer := healthz(http_port))[0] != 200:
                assert time.monotonic() < deadline, answer
                time.sleep(0.5)
        finally:
            proxy.stop()
    finally:
        cluster.destroy()


def test_a_service_login_that_connects_is_healthy_and_says_nothing(
    pg: PgCluster, model_data_dir: Path, tmp_path: Path
) -> None:
    http_port = free_port()
    proxy = start_proxy(data_dir_with_models(tmp_path, model_data_dir), "--service-user", "scram_user",
                        "--service-password", SCRAM_PASSWORD, "--http-listen", f"127.0.0.1:{http_port}",
                        upstream=pg.url())
    try:
        wait_for_log(proxy, "event=service_login_ok")
        assert healthz(http_port) == (200, {"status": "ok"})
        assert "event=service_login_failed" not in proxy.log
        assert "event=upstream_unreachable" not in proxy.log
    finally:
        proxy.stop()


def test_an_unreachable_upstream_is_said_at_start_up_and_in_healthz(model_data_dir: Path, tmp_path: Path) -> None:
    """The proxy starts anyway (the server may come later), but says so at once."""
    port, http_port = closed_port(), free_port()
    proxy = start_proxy(data_dir_with_models(tmp_path, model_data_dir), "--service-user", "postgres",
                        "--http-listen", f"127.0.0.1:{http_port}",
                        upstream=f"postgresql://127.0.0.1:{port}/postgres?sslmode=disable")
    try:
        warning = wait_for_log(proxy, "event=upstream_unreachable")
        assert f"127.0.0.1:{port}" in warning and "refused" in warning.lower(), warning
        status, answer = healthz(http_port)
        assert status == 503
        assert any(f"the upstream server at 127.0.0.1:{port} is unreachable" in problem
                   for problem in answer["problems"]), answer
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy.dsn(), connect_timeout=10)
        assert proxy.alive()
        assert "event=service_login_failed" not in proxy.log  # the upstream's absence says it all
    finally:
        proxy.stop()
