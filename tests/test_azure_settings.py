"""SHOW azure.extensions and current_setting('azure.extensions'), the first step of Azure's
instructions for the extension (azuresettings.py), through the proxy in both protocols."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest

from .helpers import new_database
from .pgcluster import PgCluster
from .proxyproc import ProxyProcess, start_proxy

LISTED = "AZURE_LOCAL_AI,VECTOR"  # the test server has pgvector to create


@pytest.fixture()
def database(pg: PgCluster) -> Iterator[str]:
    with new_database(pg, "azset") as name:
        yield name


def test_show_azure_extensions_in_psql_and_in_the_extended_protocol(proxy: ProxyProcess, pg: PgCluster,
                                                                      database: str) -> None:
    out = proxy.psql("-At", "-c", "SHOW azure.extensions", dsn=proxy.dsn(database=database))
    assert out.stdout.strip() == LISTED
    with psycopg.connect(proxy.dsn(database=database), autocommit=True) as conn:
        for _ in range(3):  # a quiet session is relayed by the relay thread, which stops at the name
            conn.execute("SELECT 1")
            time.sleep(0.1)
        assert conn.execute("SELECT current_setting('azure.extensions')").fetchone() == (LISTED,)
        assert conn.execute("SELECT %s = ANY(string_to_array(current_setting('Azure.Extensions'), ','))",
                            ("AZURE_LOCAL_AI",)).fetchone() == (True,)
    with psycopg.connect(pg.dsn(database=database), autocommit=True) as direct, \
            pytest.raises(psycopg.errors.UndefinedObject):
        direct.execute("SHOW azure.extensions")  # the server itself has no such setting


def test_a_server_that_has_the_setting_keeps_its_value(proxy: ProxyProcess, pg: PgCluster, database: str) -> None:
    pg.psql(f"ALTER DATABASE {database} SET azure.extensions = 'VECTOR,PG_TRGM'")
    with psycopg.connect(proxy.dsn(database=database), autocommit=True) as conn:
        assert conn.execute("SHOW azure.extensions").fetchone() == ("VECTOR,PG_TRGM",)


def test_in_a_failed_transaction_the_server_says_so_and_the_session_goes_on(proxy: ProxyProcess,
                                                                             database: str) -> None:
    with psycopg.connect(proxy.dsn(database=database)) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SHOW azure.extensions")
        conn.rollback()
        assert conn.execute("SHOW azure.extensions").fetchone() == (LISTED,)


def test_without_server_calls_a_statement_naming_the_setting_is_answered(pg: PgCluster, model_data_dir,
                                                                        database: str) -> None:
    """With server_calls off the proxy has no service login: a statement that names azure.extensions
    but not the schema went down the one-row INSERT path, which needs one, and the session ended with
    FATAL XX000. It is answered as with server calls on."""
    running = start_proxy(model_data_dir, "--server-calls", "false", upstream=pg.url())
    try:
        with psycopg.connect(running.dsn(database=database), autocommit=True) as conn:
            assert conn.execute("SHOW azure.extensions").fetchone() == (LISTED,)
            assert conn.execute("SELECT current_setting('azure.extensions')").fetchone() == (LISTED,)
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        running.stop()
