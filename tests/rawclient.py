"""A raw socket client, for sending what no driver would send."""

from __future__ import annotations

import socket
import struct

from proxy import protocol as pg


def startup_packet(user: str = "postgres", database: str = "postgres", version: int = pg.PROTOCOL_3_0,
                   **params: str) -> bytes:
    pairs = {"user": user, "database": database, **params}
    body = struct.pack("!i", version) + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in pairs.items())
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


class RawClient:
    """Speaks bytes to the proxy and reads back whole messages."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def read_message(self) -> tuple[bytes, bytes]:
        header = self.recv_exactly(5)
        length = struct.unpack("!I", header[1:])[0]
        return header[:1], self.recv_exactly(length - 4)

    def read_until(self, msg_type: bytes) -> list[tuple[bytes, bytes]]:
        seen = []
        while True:
            msg = self.read_message()
            seen.append(msg)
            if msg[0] == msg_type:
                return seen

    def login(self, **params: str) -> list[tuple[bytes, bytes]]:
        self.send(startup_packet(**params))
        return self.read_until(b"Z")

    def error_code(self) -> str:
        """Read up to the first ErrorResponse and return its SQLSTATE."""
        return pg.parse_fields(self.read_until(b"E")[-1][1])["C"]

    def closed(self) -> bool:
        """True when the peer has closed the connection (after any pending bytes)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()
