"""Bad client input gets 08P01 and closes that session only; the proxy and other sessions go on."""

from __future__ import annotations

import struct

import pytest

from proxy import protocol as pg

from .proxyproc import ProxyProcess
from .rawclient import RawClient, startup_packet


def other_session_works(proxy: ProxyProcess) -> None:
    assert proxy.alive()
    assert proxy.psql("-Atc", "select 40+2").stdout.strip() == "42"


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # an HTTP client at the wrong port
        struct.pack("!i", 4) + b"\0" * 4,  # start-up length below the minimum
        struct.pack("!i", 100_000),  # start-up length above PostgreSQL's maximum
        struct.pack("!ii", 16, 2 << 16) + b"user\0u\0\0\0",  # protocol 2
        struct.pack("!ii", 17, 3 << 16) + b"database\0d\0\0",  # no user
    ],
    ids=["http", "short", "huge", "protocol2", "nouser"],
)
def test_garbage_before_startup(proxy: ProxyProcess, garbage: bytes) -> None:
    client = RawClient(proxy.port)
    client.send(garbage)
    assert client.error_code() == "08P01"
    assert client.closed()
    other_session_works(proxy)


@pytest.mark.parametrize(
    "bad",
    [
        b"Z\x00\x00\x00\x04",  # a backend-only message type
        b"\x01\x00\x00\x00\x04",  # not a message type at all
        b"Q\x00\x00\x00\x02",  # a length shorter than the length word
        b"Q\x7f\xff\xff\xf0",  # a message over the configured maximum
    ],
    ids=["backend-type", "unknown-type", "short-length", "over-max"],
)
def test_bad_message_after_startup(proxy: ProxyProcess, bad: bytes) -> None:
    client = RawClient(proxy.port)
    client.login()
    client.send(bad)
    assert client.error_code() == "08P01"
    assert client.closed()
    other_session_works(proxy)


def test_bad_message_after_good_ones_in_one_packet(proxy: ProxyProcess) -> None:
    client = RawClient(proxy.port)
    client.login()
    client.send(pg.message(pg.QUERY, b"select 1\0") + b"\xff\x00\x00\x00\x04")
    codes = [m for m in client.read_until(b"E") if m[0] == b"E"]
    assert pg.parse_fields(codes[0][1])["C"] == "08P01"
    other_session_works(proxy)


def test_unencrypted_bytes_after_ssl_request_are_refused(proxy: ProxyProcess) -> None:
    client = RawClient(proxy.port)
    client.send(struct.pack("!ii", 8, pg.SSL_REQUEST) + startup_packet())
    # The proxy answers 'S' and then expects a TLS handshake; plain bytes are not one.
    assert client.recv_exactly(1) == b"S"
    assert client.closed()
    other_session_works(proxy)


def test_gssenc_request_is_declined(proxy: ProxyProcess) -> None:
    client = RawClient(proxy.port)
    client.send(struct.pack("!ii", 8, pg.GSSENC_REQUEST))
    assert client.recv_exactly(1) == b"N"
    client.login()
    client.send(pg.message(pg.QUERY, b"select 1\0"))
    assert client.read_until(b"Z")[-1][0] == b"Z"


def test_replication_connection_is_refused(proxy: ProxyProcess) -> None:
    client = RawClient(proxy.port)
    client.send(startup_packet(replication="database"))
    msg = client.read_until(b"E")[-1]
    fields = pg.parse_fields(msg[1])
    assert fields["C"] == "0A000"
    assert "replication" in fields["M"]
    assert client.closed()


def test_client_vanishing_mid_message_costs_nothing(proxy: ProxyProcess) -> None:
    client = RawClient(proxy.port)
    client.login()
    client.send(b"Q\x00\x01\x00\x00select")  # announces 64 KiB, sends 6 bytes, then leaves
    client.close()
    other_session_works(proxy)


def test_unknown_cancel_key_does_nothing(proxy: ProxyProcess) -> None:
    victim = RawClient(proxy.port)
    victim.login()
    canceller = RawClient(proxy.port)
    canceller.send(pg.cancel_request(12345, b"\x00\x01\x02\x03"))
    assert canceller.closed()
    victim.send(pg.message(pg.QUERY, b"select pg_sleep(0.3)\0"))
    replies = victim.read_until(b"Z")
    assert not any(t == b"E" for t, _ in replies)
