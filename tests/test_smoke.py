"""The first things a client sees: a query through the proxy, and protocol version negotiation."""

import subprocess

from .pgcluster import tool
from .proxyproc import ProxyProcess

PSQL_18 = tool("psql")  # libpq 18 can ask for protocol 3.2


def test_psql_through_proxy(proxy: ProxyProcess) -> None:
    out = proxy.psql("-At", "-c", "select 1+1", "-c", "select extname from pg_extension where extname='vector'")
    assert out.stdout.split() == ["2", "vector"]


def test_protocol_3_2_is_negotiated_with_the_server(proxy: ProxyProcess) -> None:
    """A client asking for 3.2 gets what the server negotiates (PostgreSQL 18: 3.2, with its longer
    cancel key), and the session works."""
    out = subprocess.run(
        [PSQL_18, "-X", proxy.dsn(max_protocol_version="3.2"), "-c", "\\conninfo",
         "-c", "SET statement_timeout = '5s'", "-c", "select 42"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    protocol = [line for line in out.stdout.splitlines() if "Protocol Version" in line]
    assert protocol and protocol[0].split("|")[1].strip() == "3.2"
    assert out.stdout.rstrip().splitlines()[-2].strip() == "42"
