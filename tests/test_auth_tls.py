"""Authentication is relayed (the proxy never needs passwords); TLS is offered to clients."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from .conftest import MD5_PASSWORD, SCRAM_PASSWORD
from .proxyproc import ProxyProcess, start_proxy


@pytest.mark.parametrize(("user", "password"), [("scram_user", SCRAM_PASSWORD), ("md5_user", MD5_PASSWORD)])
def test_password_users(proxy: ProxyProcess, user: str, password: str) -> None:
    wrong = proxy.psql("-c", "select 1", dsn=proxy.dsn(user, "wrong-" + password), check=False)
    assert wrong.returncode != 0
    assert "password authentication failed" in wrong.stderr
    right = proxy.psql("-Atc", "select current_user", dsn=proxy.dsn(user, password))
    assert right.stdout.strip() == user
    assert proxy.alive()


def test_wrong_password_sqlstate(proxy: ProxyProcess) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn("scram_user", "nope"))
    assert "password authentication failed" in str(info.value)
    assert info.value.sqlstate in (None, "28P01")  # libpq reports start-up errors without a result


def test_tls_client_sslmode_require(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(sslmode="require")) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select 6*7").fetchone() == (42,)


def test_tls_client_verifies_proxy_certificate(proxy: ProxyProcess, tls_files: dict[str, Path]) -> None:
    dsn = proxy.dsn(sslmode="verify-full", sslrootcert=str(tls_files["ca"]))
    with psycopg.connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use


def test_scram_over_tls_with_channel_binding_prefer(proxy: ProxyProcess) -> None:
    dsn = proxy.dsn("scram_user", SCRAM_PASSWORD, sslmode="require", channel_binding="prefer")
    with psycopg.connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select current_user").fetchone() == ("scram_user",)


def test_channel_binding_require_is_refused_clearly(proxy: ProxyProcess) -> None:
    dsn = proxy.dsn("scram_user", SCRAM_PASSWORD, sslmode="require", channel_binding="require")
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(dsn)


def test_psql_over_tls(proxy: ProxyProcess) -> None:
    out = proxy.psql("-Atc", "select 1", dsn=proxy.dsn(sslmode="require"))
    assert out.stdout.strip() == "1"


def test_proxy_without_certificate_declines_tls(pg, tmp_path: Path) -> None:
    plain = start_proxy(tmp_path, upstream=pg.url())
    try:
        with psycopg.connect(plain.dsn(sslmode="prefer")) as conn:
            assert not conn.pgconn.ssl_in_use
        with pytest.raises(psycopg.OperationalError, match=r"(?i)ssl"):
            psycopg.connect(plain.dsn(sslmode="require"))
    finally:
        plain.stop()
