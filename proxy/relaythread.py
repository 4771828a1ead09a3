"""A session's sockets on their way to the relay thread (fastpath.py) and back, for its relay: handed
over as duplicated descriptors (the transports are dropped), taken back as new transports whose
first events wait until the relay has caught up with what the thread held, and the last words
written to them directly when the session ends while the thread has it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from . import fastpath
from .transports import Side

#: After the relay thread hands a session back, it stays with the event loop this long (seconds):
#: a session that calls azure_local_ai often would otherwise pay a hand-back and a hand-over (new
#: transports, ~0.5 ms of the loop's CPU) for each call.
STAY_AFTER_HAND_BACK = 1.0


class Gate(asyncio.Protocol):
    """A socket's first events after the relay thread hands it back (its transport reads as soon as
    it exists), kept until the relay has caught up with what the thread held."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.lost: tuple[Exception | None] | None = None

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return True  # the relay's Side closes; the transport stays until then

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)

    def hand_on(self, side: Side) -> None:
        """The end of stream or loss seen meanwhile, to the relay (after the data)."""
        if self.eof:
            side.eof_received()
        if self.lost is not None:
            side.connection_lost(self.lost[0])


class RelayThread:
    """One relay's side of the relay thread, where both legs are plain sockets."""

    def __init__(self, fast: fastpath.FastPath) -> None:
        #: The relay thread; None once the session ended there (the interpreter sees the end through).
        self.fast: fastpath.FastPath | None = fast
        #: The session's id on the thread, while the thread has it.
        self.session_id: int | None = None
        self._fds: tuple[int, int] = (-1, -1)
        #: Taking the session back (the relay's resume), until it is back.
        self.resuming: asyncio.Task[None] | None = None
        self.stay_until = 0.0

    def hand_over(self, client: asyncio.Transport, server: asyncio.Transport, back: fastpath.Resume,
                  **state: object) -> None:
        """Give the thread both sockets (`back` is called when it hands them back) and drop their
        transports."""
        assert self.fast is not None
        client_sock = client.get_extra_info("socket")
        server_sock = server.get_extra_info("socket")
        fds = (os.dup(client_sock.fileno()), os.dup(server_sock.fileno()))
        for transport in (client, server):
            transport.pause_reading()
            transport.set_protocol(asyncio.Protocol())
            transport.abort()  # closes the transport's descriptor; the thread's duplicate stays open
        self._fds = fds
        self.session_id = self.fast.hand_over(fds[0], fds[1], back, **state)

    def handed_back(self, state: fastpath.FastState, now: float,
                    resume: Callable[[fastpath.FastState], Coroutine[Any, Any, None]]) -> None:
        """The thread stopped for the session: `resume` takes it on from there."""
        self.session_id = None
        self.stay_until = now + STAY_AFTER_HAND_BACK
        if state.reason in (fastpath.CLIENT_CLOSED, fastpath.SERVER_CLOSED):
            self.fast = None  # the end of the session: the interpreter sees it through
        self.resuming = asyncio.get_running_loop().create_task(resume(state))

    async def transports(self) -> tuple[list[asyncio.Transport], tuple[Gate, Gate]]:
        """The sockets back as transports (client, server), each paused behind its gate until the relay
        has framed what the thread held. Raises OSError (or CancelledError) once what was made is
        closed again."""
        loop = asyncio.get_running_loop()
        gates = (Gate(), Gate())
        sockets = [socket.socket(fileno=fd) for fd in self._fds]
        transports: list[asyncio.Transport] = []
        try:
            for gate, sock in zip(gates, sockets, strict=True):
                transport = (await loop.connect_accepted_socket(lambda gate=gate: gate, sock=sock))[0]
                transport.pause_reading()  # until the relay has framed what the thread held
                transports.append(transport)
        except (OSError, asyncio.CancelledError):
            for transport in transports:
                transport.abort()
            for sock in sockets[len(transports):]:
                sock.close()
            raise
        return transports, gates

    def take_back(self) -> fastpath.FastState | None:
        """Stop the thread for the session now (its relay is told as when the thread stops by itself)."""
        assert self.fast is not None and self.session_id is not None
        return self.fast.take_back(self.session_id)

    def activity(self) -> fastpath.Activity | None:
        """Where the thread has the session: its counts as they are now."""
        return fastpath.activity(self.session_id) if self.session_id is not None else None

    def leave(self, to_client: bytes = b"", to_server: bytes = b"") -> None:
        """Closing while the thread has the session: take it back, send the last words, close."""
        assert self.fast is not None and self.session_id is not None
        state = self.fast.take_back(self.session_id)
        self.session_id = None
        unsent = (state.down.unsent, state.up.unsent) if state is not None else (b"", b"")
        for fd, data in zip(self._fds, (unsent[0] + to_client, unsent[1] + to_server), strict=True):
            if data:
                with contextlib.suppress(OSError):  # a few bytes into an idle socket's buffer: best effort
                    os.write(fd, data)
            with contextlib.suppress(OSError):
                os.close(fd)
