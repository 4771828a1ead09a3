"""A small awaitable reader over an asyncio transport, for the request/response phase of a
connection (start-up, TLS negotiation, authentication). Once a session is established its
transports are handed to the relay protocol together with whatever bytes were already read."""

from __future__ import annotations

import asyncio
import ssl

from . import protocol as pg


class ConnectionClosed(Exception):
    """The peer closed the connection while we were waiting for bytes."""


class HandshakeProtocol(asyncio.Protocol):
    """Buffers incoming bytes and lets a coroutine await exact amounts of them."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._closed: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._wake()

    def eof_received(self) -> bool:
        self._closed = ConnectionClosed("connection closed by peer")
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = ConnectionClosed(str(exc) if exc else "connection closed by peer")
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read_exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            if self._closed is not None:
                raise self._closed
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    async def read_message(self, max_length: int = pg.DEFAULT_MAX_MESSAGE) -> pg.Message:
        header = await self.read_exactly(5)
        length = int.from_bytes(header[1:5], "big")
        if length < 4 or length > max_length:
            raise pg.ProtocolViolation(f"invalid message length {length}")
        return pg.Message(header[0], await self.read_exactly(length - 4))

    def write(self, data: bytes) -> None:
        """Send `data`, or raise ConnectionClosed if the peer has gone: the caller's exchange is over.
        A closed transport would not say so itself (uvloop raises RuntimeError, asyncio drops the bytes
        with warnings), and a hand-over to the relay must not start on a connection already lost."""
        assert self.transport is not None
        if self._closed is not None:
            raise self._closed
        if self.transport.is_closing():
            raise ConnectionClosed("connection closed")
        self.transport.write(data)

    def detach(self) -> bytes:
        """Stop buffering and return what was read but not consumed, for the next protocol."""
        leftover = bytes(self._buffer)
        self._buffer.clear()
        return leftover

    async def start_tls(self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None) -> None:
        """Upgrade this connection to TLS in place (after an 'S' answer to SSLRequest)."""
        if self._buffer:
            raise pg.ProtocolViolation("received unencrypted data after SSL request")
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            new_transport = await loop.start_tls(
                self.transport, self, context, server_side=server_side, server_hostname=server_hostname
            )
        except ConnectionError as exc:  # the peer left during the handshake, as a read would have told
            raise ConnectionClosed(str(exc) or "connection closed during the TLS handshake") from exc
        self.transport = new_transport  # type: ignore[assignment]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
