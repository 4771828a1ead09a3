"""What the relay puts between itself and its two transports: the protocol that routes one transport's
events to it, and the server's transport while the hook's last messages gather for one write."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Corked:
    """The server's transport while the hook's last messages gather (SessionControl.cork): what is
    written waits, and goes in one write, one system call, when the relay is done with them."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.parts: list[bytes | memoryview] = []

    def write(self, data: bytes | memoryview) -> None:
        self.parts.append(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.transport, name)


class Side(asyncio.Protocol):
    """Routes one transport's events to the relay."""

    def __init__(self, on_data: Callable[[bytes], None], on_eof: Callable[[], None],
                 on_lost: Callable[[Exception | None], None], on_pause: Callable[[bool], None]) -> None:
        self.data_received = on_data  # type: ignore[method-assign]
        self._on_eof = on_eof
        self._on_lost = on_lost
        self._on_pause = on_pause

    def eof_received(self) -> bool:
        self._on_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost(exc)

    def pause_writing(self) -> None:
        self._on_pause(True)

    def resume_writing(self) -> None:
        self._on_pause(False)
