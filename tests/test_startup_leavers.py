"""Clients that leave during start-up: each session ends cleanly (a "session end" line, no traceback),
its upstream connection is closed, and the proxy goes on serving."""

from __future__ import annotations

import os
import re
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy import protocol as pg_protocol

from .pgcluster import PgCluster
from .proxyproc import ProxyProcess, start_proxy
from .rawclient import RawClient, startup_packet

ROUNDS = 20


@pytest.fixture()
def own_proxy(pg: PgCluster, tls_files: dict[str, Path], tmp_path: Path) -> Iterator[ProxyProcess]:
    """A proxy of this test's own, offering TLS, so that its log holds only this test's sessions."""
    running = start_proxy(tmp_path, "--tls-cert", str(tls_files["cert"]), "--tls-key", str(tls_files["key"]),
                          upstream=pg.url())
    yield running
    running.stop()


def abort(client: RawClient) -> None:
    """Close with a reset (SO_LINGER 0), the way a killed process's socket often goes."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def after_startup(client: RawClient, tls: ssl.SSLContext) -> None:
    client.send(startup_packet(application_name="leaver"))
    client.close()


def reset_after_startup(client: RawClient, tls: ssl.SSLContext) -> None:
    client.send(startup_packet(application_name="leaver"))
    abort(client)


def after_half_a_startup(client: RawClient, tls: ssl.SSLContext) -> None:
    client.send(startup_packet()[:12])
    client.close()


def after_ssl_request(client: RawClient, tls: ssl.SSLContext) -> None:
    client.send(struct.pack("!ii", 8, pg_protocol.SSL_REQUEST))
    client.close()


def after_ssl_answer(client: RawClient, tls: ssl.SSLContext) -> None:
    client.send(struct.pack("!ii", 8, pg_protocol.SSL_REQUEST))
    assert client.recv_exactly(1) == b"S"
    client.close()


def after_startup_over_tls(client: RawClient, tls: ssl.SSLContext) -> None:
    client.send(struct.pack("!ii", 8, pg_protocol.SSL_REQUEST))
    assert client.recv_exactly(1) == b"S"
    with tls.wrap_socket(client.sock, server_hostname="127.0.0.1") as secure:
        secure.sendall(startup_packet(application_name="leaver"))


def password_user_after_startup(client: RawClient, tls: ssl.SSLContext) -> None:
    client.send(startup_packet(user="scram_user"))
    client.close()


def halfway_through_the_password(client: RawClient, tls: ssl.SSLContext) -> None:
    client.send(startup_packet(user="scram_user"))
    msg_type, body = client.read_message()
    assert (msg_type, pg_protocol.auth_code(body)) == (b"R", pg_protocol.AUTH_SASL)
    first = b"n,,n=,r=" + os.urandom(18).hex().encode()
    answer = pg_protocol.message(pg_protocol.PASSWORD, b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
    client.send(answer[: len(answer) // 2])
    client.close()


LEAVERS: list[Callable[[RawClient, ssl.SSLContext], None]] = [
    after_startup, reset_after_startup, after_half_a_startup, after_ssl_request, after_ssl_answer,
    after_startup_over_tls, password_user_after_startup, halfway_through_the_password,
]


def upstream_connections(proxy: ProxyProcess, pg: PgCluster) -> int:
    """How many TCP connections to `pg` the proxy process holds open (its socket descriptors, found
    in the kernel's table of TCP sockets by inode)."""
    fd_dir = Path(f"/proc/{proxy.proc.pid}/fd")
    inodes = set()
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == pg.port and fields[9] in inodes:
            count += 1
    return count


def unended_sessions(log: str) -> set[str]:
    """Sessions the log shows starting and not (yet) ending."""
    started = set(re.findall(r'msg="session start" session=(\w+)', log))
    ended = set(re.findall(r'msg="session (?:end|refused)" session=(\w+)', log))
    return started - ended


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_clients_leaving_during_startup_end_their_sessions_cleanly(
    own_proxy: ProxyProcess, pg: PgCluster, tls_files: dict[str, Path]
) -> None:
    tls = ssl.create_default_context(cafile=str(tls_files["ca"]))
    own_proxy.psql("-Atc", "select 1")
    # The proxy has no service login here: its only connections to the server are its sessions'.
    assert wait_for(lambda: upstream_connections(own_proxy, pg) == 0)  # psql's session is over
    staying = RawClient(own_proxy.port)
    staying.login()
    assert wait_for(lambda: upstream_connections(own_proxy, pg) == 1)  # the count sees a session's connection
    staying.close()
    for _ in range(ROUNDS):
        for leave in LEAVERS:
            leave(RawClient(own_proxy.port), tls)
    assert wait_for(lambda: not unended_sessions(own_proxy.log)), unended_sessions(own_proxy.log)
    assert wait_for(lambda: upstream_connections(own_proxy, pg) == 0)
    assert own_proxy.psql("-Atc", "select 1").stdout.strip() == "1"
    log = own_proxy.log
    assert "Traceback" not in log and "session task failed" not in log and "level=warning" not in log, log
    assert log.count('msg="session start"') == ROUNDS * 5 + 3  # five leavers send a whole StartupMessage
    assert own_proxy.alive()
