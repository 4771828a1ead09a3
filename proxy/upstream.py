"""Where the real server is and how to reach it: TCP or a Unix socket, with libpq's sslmode rules."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from . import protocol as pg
from .wire import ConnectionClosed, HandshakeProtocol

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


class UpstreamError(Exception):
    """The upstream server cannot be reached; `sqlstate` is what the client is told."""

    def __init__(self, text: str, sqlstate: str = "08001") -> None:
        super().__init__(text)
        self.sqlstate = sqlstate


@dataclass(frozen=True)
class Upstream:
    """The address and TLS policy of the real server (users and databases come from clients)."""

    host: str = "127.0.0.1"
    port: int = 5432
    sslmode: str = "prefer"
    sslrootcert: str = ""
    connect_timeout: float = 10.0

    @property
    def is_unix(self) -> bool:
        return self.host.startswith("/")

    @property
    def socket_path(self) -> str:
        return str(Path(self.host) / f".s.PGSQL.{self.port}")

    def describe(self) -> str:
        return self.socket_path if self.is_unix else f"{self.host}:{self.port}"

    @classmethod
    def from_url(cls, url: str, connect_timeout: float = 10.0) -> Upstream:
        """Parse postgresql://[user@]host[:port][/db][?sslmode=...&host=/socket/dir]."""
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError(f"upstream must be a postgresql:// URL, got {url!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        host = query.get("host") or unquote(parts.hostname or "") or "127.0.0.1"
        port = int(query.get("port") or parts.port or 5432)
        sslmode = query.get("sslmode", "prefer")
        if sslmode not in SSLMODES:
            raise ValueError(f"invalid sslmode {sslmode!r}: expected one of {', '.join(SSLMODES)}")
        timeout = float(query.get("connect_timeout") or connect_timeout)
        return cls(host, port, sslmode, query.get("sslrootcert", ""), timeout)

    def tls_context(self) -> ssl.SSLContext:
        """The client-side TLS context for this sslmode, as libpq would verify."""
        context = ssl.create_default_context(cafile=self.sslrootcert or None)
        if self.sslmode in ("verify-ca", "verify-full"):
            context.check_hostname = self.sslmode == "verify-full"
        else:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def connect(self) -> HandshakeProtocol:
        """Open a connection and negotiate TLS; the result is ready for a StartupMessage."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                conn = await self._open()
                if self.is_unix or self.sslmode in ("disable", "allow"):
                    return conn
                await self._negotiate_tls(conn)
                return conn
        except TimeoutError as exc:
            raise UpstreamError(
                f"timeout expired connecting to the upstream server at {self.describe()}"
            ) from exc
        except (OSError, ConnectionClosed) as exc:
            raise UpstreamError(
                f"could not connect to the upstream server at {self.describe()}: {exc}"
            ) from exc

    async def _open(self) -> HandshakeProtocol:
        loop = asyncio.get_running_loop()
        if self.is_unix:
            _, conn = await loop.create_unix_connection(HandshakeProtocol, self.socket_path)
        else:
            _, conn = await loop.create_connection(HandshakeProtocol, self.host, self.port)
        return conn

    async def _negotiate_tls(self, conn: HandshakeProtocol) -> None:
        conn.write(pg.ssl_request())
        answer = await conn.read_exactly(1)
        if answer == b"S":
            try:
                await conn.start_tls(self.tls_context(), server_side=False, server_hostname=self.host)
            except ssl.SSLError as exc:
                conn.close()
                raise UpstreamError(f"TLS with the upstream server failed: {exc}") from exc
        elif answer == b"N":
            if self.sslmode not in ("prefer",):
                conn.close()
                raise UpstreamError("the upstream server does not support SSL, but SSL was required")
        else:
            conn.close()
            raise UpstreamError(f"the upstream server answered the SSL request with {answer!r}", "08P01")

    async def send_cancel(self, pid: int, secret: bytes) -> None:
        """Deliver a CancelRequest for upstream backend `pid` on a connection of its own."""
        conn = await self._open()
        try:
            conn.write(pg.cancel_request(pid, secret))
            # The server closes the connection once it has read the request.
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await conn.read_exactly(1)
            except (ConnectionClosed, TimeoutError):
                pass
        finally:
            conn.close()
