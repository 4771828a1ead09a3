"""The relay thread's Python side: sessions handed over to it, and back when it stops for them.

The thread (proxy/_fastrelay.c) moves the bytes of sessions that rest, where the interpreter's
callbacks would cost several times PgBouncer's whole relay per transaction. It owns the two sockets
while it has a session; the event loop learns of every session it hands back through one eventfd."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from . import _fastrelay

CLIENT_CLOSED = _fastrelay.CLIENT_CLOSED
SERVER_CLOSED = _fastrelay.SERVER_CLOSED


@dataclass(frozen=True, slots=True)
class StreamState:
    """One direction as the thread left it."""

    #: Framed bytes not yet written to the other side: they go first, as they are.
    unsent: bytes
    #: Bytes read but not framed: they start with the message the thread stopped for.
    unframed: bytes
    #: Bytes of a streamed message's body still to come after `unframed`.
    skip: int
    last_type: int


@dataclass(frozen=True, slots=True)
class FastState:
    """A session as the thread hands it back (the tuple of _fastrelay's state_of, in order)."""

    id: int
    reason: int
    up: StreamState  # client to server
    down: StreamState
    syncs_sent: int
    batch_open: bool
    uncertain: bool
    ready_count: int
    tx_status: int
    in_query: bool
    last_activity: float
    #: The last Query or Parse the thread forwarded (type byte, length word, body), or None.
    unread: bytes | None

    @classmethod
    def decode(cls, raw: tuple) -> FastState:
        (id_, reason, up_unsent, up_unframed, up_skip, up_last, down_unsent, down_unframed, down_skip, down_last,
         syncs, batch_open, uncertain, ready, tx_status, in_query, last_activity, unread) = raw
        return cls(id_, reason, StreamState(up_unsent, up_unframed, up_skip, up_last),
                   StreamState(down_unsent, down_unframed, down_skip, down_last), syncs, bool(batch_open),
                   bool(uncertain), ready, tx_status, bool(in_query), last_activity, unread)


Resume = Callable[[FastState], None]


class FastPath:
    """The process's relay thread, seen from one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._waiting: dict[int, Resume] = {}
        loop.add_reader(_fastrelay.notify_fd(), self._on_handed_back)

    @property
    def sessions(self) -> int:
        """Sessions the thread relays now."""
        return len(self._waiting)

    def hand_over(self, client_fd: int, server_fd: int, resume: Resume, **state: object) -> int:
        """Give the thread a session's two sockets (it closes neither); `resume` gets the session back."""
        session_id: int = _fastrelay.attach(client_fd, server_fd, **state)
        self._waiting[session_id] = resume
        return session_id

    def take_back(self, session_id: int) -> FastState | None:
        """The session back from the thread now, or None if it is on its way back already."""
        raw = _fastrelay.detach(session_id)
        self._waiting.pop(session_id, None)
        return None if raw is None else FastState.decode(raw)

    def _on_handed_back(self) -> None:
        for raw in _fastrelay.take():
            resume = self._waiting.pop(raw[0], None)
            if resume is not None:
                resume(FastState.decode(raw))


_paths: dict[asyncio.AbstractEventLoop, FastPath] = {}


def fast_path() -> FastPath:
    """The running loop's FastPath (one thread serves the process)."""
    loop = asyncio.get_running_loop()
    path = _paths.get(loop)
    if path is None:
        path = _paths[loop] = FastPath(loop)
    return path


def sessions_on_thread() -> int:
    """Sessions the thread relays now, for every loop."""
    return sum(path.sessions for path in _paths.values())


@dataclass(frozen=True, slots=True)
class Activity:
    """A session the thread has, as it is now."""

    last_activity: float  # on the event loop's clock (CLOCK_MONOTONIC)
    in_query: bool
    syncs_sent: int
    ready_count: int
    tx_status: int
    client_at_boundary: bool


def activity(session_id: int) -> Activity | None:
    """A session the thread has, as it is now; None if it is on its way back."""
    raw = _fastrelay.activity(session_id)
    return None if raw is None else Activity(raw[0], bool(raw[1]), raw[2], raw[3], raw[4], bool(raw[5]))


def bytes_relayed() -> tuple[int, int]:
    """(client to server, server to client) bytes the thread has moved."""
    return _fastrelay.bytes_relayed()
