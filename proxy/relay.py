"""The established session: bytes in both directions between a client and its upstream connection.

Client-to-server traffic is framed (type and length) so that bad input is caught and hooked
messages can be held; everything else is forwarded in the runs the framer returns. Server-to-client
traffic is framed only to know where messages begin, and decoded only while a hook watches it.
Backpressure: when one side's write buffer fills, reading from the other side pauses.

A session that rests (its hook has nothing under way, nothing is held, neither side is TLS) is handed
over to the relay thread (fastpath.py), which moves its bytes without the interpreter and hands it
back, at the first byte of whatever the hook must see, with the counts this relay keeps.

Why one class of this length: the client-to-server path, the server-to-client path and the
SessionControl a hook drives all read and write one set of counts on every message (the requests
the server owes an answer to, whether a batch is open, the framers' positions, the pauses), which
the relay thread takes over and hands back as one. In one class, the way from a read to a write has
no indirection, and those counts' invariants read in one place. What has state of its own lives
beside it: the answers to the proxy's own queries (capture.py), the transports' adapters and the
cork (transports.py), and the sockets' way to the relay thread and back (relaythread.py)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from . import fastpath
from . import protocol as pg
from .capture import Capture, QueryFailed
from .hooks import ServerWatcher, SessionHook, SessionInfo
from .relaythread import RelayThread
from .stats import STATS
from .transports import Corked, Side

ALL_TYPES = frozenset(range(256))
#: Client messages the server answers with a ReadyForQuery (a FunctionCall too).
SYNC_POINTS = frozenset({pg.QUERY, pg.SYNC, pg.FUNCTION_CALL})
#: The client's COPY FROM STDIN data: part of the request that started the COPY, in either protocol, so
#: neither opening nor closing an extended-protocol batch (a COPY by a simple Query opens none).
COPY_IN = frozenset({pg.COPY_DATA, pg.COPY_DONE, pg.COPY_FAIL})
#: Server messages that belong to no request: they reach the client even while the proxy runs its own query.
ASYNCHRONOUS = frozenset(b"ANS")
WRITE_HIGH_WATER = 1 << 20
#: Bodies at least this long are written after their header rather than copied into one buffer with it.
LONG_BODY = 1 << 16
#: Client messages the hook observes (observe_client) are shown to it up to this long (psycopg's COPY
#: sends up to 128 kB a message).
OBSERVE_MAX = 1 << 18
#: How much a client may send while a hook holds its session before reading from it pauses.
HELD_LIMIT = 1 << 20


class Relay:
    """One client connection joined to one upstream connection."""

    def __init__(
        self,
        info: SessionInfo,
        client: asyncio.Transport,
        server: asyncio.Transport,
        *,
        hook: SessionHook | None,
        max_message_size: int,
        idle_timeout: float,
        log: logging.LoggerAdapter,
        server_parameters: dict[str, str] | None = None,
        fast: fastpath.FastPath | None = None,
    ) -> None:
        self.info = info
        #: The server's run-time parameters as it last reported them (ParameterStatus).
        self.server_parameters = dict(server_parameters or {})
        self.client = client
        self.server = server
        self.hook = hook
        self.log = log
        self.closed = asyncio.get_running_loop().create_future()
        self._client_framer = pg.Framer(valid_types=pg.FRONTEND_TYPES, max_length=max_message_size)
        self._server_framer = pg.Framer()
        self._in_query = False  # start-up ended with the server's first ReadyForQuery
        #: Server messages always framed whole: a hook reads SQL as the server's parameters say.
        #: And NoticeResponses: the extension's SQL functions send their requests to the proxy as notices.
        self._server_always = frozenset({pg.PARAMETER_STATUS, pg.NOTICE_RESPONSE}) if hook is not None else frozenset()
        self._server_framer.inspect = self._server_always
        if hook is not None:
            # Query and Sync are framed too, so that the relay can count the requests the server owes answers to.
            self._client_framer.inspect = hook.message_types | SYNC_POINTS | COPY_IN
            # A long Bind is held whole only if the hook wants it, so large values to other statements stream.
            self._client_framer.peek_types = frozenset({pg.BIND})
            self._client_framer.marker = hook.marker
            self._client_framer.marker_types = hook.message_types
            self._client_framer.long_parts = LONG_BODY
        #: Client message types the hook observes as they go upstream (observe_client).
        self._observed: frozenset[int] = frozenset()
        self._syncs_sent = 0
        self._batch_open = False
        #: A Query or FunctionCall went upstream inside an unsynchronised extended-protocol batch: the
        #: server answers it only if nothing in the batch failed before it, so from then on the proxy
        #: cannot tell when the server has answered everything (see settled()).
        self._uncertain = False
        self._answered: asyncio.Future[None] | None = None
        self._capture: Capture | None = None
        self._watcher: ServerWatcher | None = None
        self._held: deque[pg.Piece] | None = None
        self._held_bytes = 0
        self._hook_task: asyncio.Task[None] | None = None
        self._client_pauses: set[str] = set()
        self._server_paused = False
        self._closing = False
        self._pause_wanted = False  # PAUSE (admin console): stop reading from the client once it is quiet
        #: Shutting down (drain): the FATAL error the session ends with once nothing is in progress.
        self._draining: tuple[str, str] | None = None
        #: terminate() was asked while the session came back from the relay thread: done once it is back.
        self._ending: tuple[str, str] | None = None
        self._idle_timeout = idle_timeout
        self._now = asyncio.get_running_loop().time
        self._last_activity = self._now()
        self._idle_handle: asyncio.TimerHandle | None = None
        #: The relay thread's side of the session, where both legs are plain sockets.
        plain = all(t.get_extra_info("sslcontext") is None and t.get_extra_info("socket") is not None
                    for t in (client, server))
        self._thread = RelayThread(fast) if fast is not None and plain else None

    # ------------------------------------------------------------------ wiring

    def start(self, client_leftover: bytes, server_leftover: bytes) -> None:
        """Take over both transports, then process bytes read before the hand-over."""
        for transport in (self.client, self.server):
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.client.set_protocol(Side(self._from_client, self._client_eof, self._client_lost, self._client_paused))
        self.server.set_protocol(Side(self._from_server, self._server_eof, self._server_lost, self._server_paused_cb))
        if self._idle_timeout > 0:
            self._schedule_idle_check(self._idle_timeout)
        if server_leftover:
            self._from_server(server_leftover)
        if client_leftover:
            self._from_client(client_leftover)
        self._rest()

    # ------------------------------------------------------------------ client -> server

    def _from_client(self, data: bytes) -> None:
        STATS.bytes_from_clients += len(data)
        self._last_activity = self._now()
        self._in_query = True
        framer = self._client_framer
        whole = framer.at_boundary
        try:
            pieces = framer.feed(data)
        except pg.ProtocolViolation as exc:
            self.log.warning("client protocol violation", extra={"event": "protocol_violation", "reason": str(exc)})
            self.fail("08P01", str(exc))
            return
        if framer.gathering and "turn" not in self._client_pauses:
            # A long message read as fast as the client sends it would keep the loop from the other
            # sessions (libuv reads up to 32 times per wake-up): one read per turn of the loop.
            self._pause_client("turn")
            asyncio.get_running_loop().call_soon(self._resume_client, "turn")
        if self._held is not None:
            self._held.extend(pieces)
            self._held_bytes += len(data)
            if self._held_bytes > HELD_LIMIT or framer.undecided:
                self._pause_client("hook")
            return
        hook = self.hook
        if hook is None:
            write = self.server.write
            for piece in pieces:
                write(piece)  # type: ignore[arg-type]
        elif whole and pieces and framer.at_boundary:
            self._forward_whole(data, pieces, hook)
        else:
            self._dispatch_client(deque(pieces))
        if self._thread is not None:
            self._rest()

    def _forward_whole(self, data: bytes, pieces: list[pg.Piece], hook: SessionHook) -> None:
        """The usual case: `data` is whole messages. Unless the hook wants one of them, `data` goes
        upstream as it came, in one write, and is accounted for as `_dispatch_client` would."""
        syncs = 0
        batch_open = self._batch_open
        types = hook.message_types
        observed = self._observed
        for index, piece in enumerate(pieces):
            if type(piece) is not pg.Message:
                batch_open = True  # raw runs hold only message types that are not sync points
                continue
            assert isinstance(piece, pg.Message)
            msg_type = piece.type
            if msg_type in types and hook.wants(msg_type, piece.body, piece.marked):
                # Send what precedes the wanted message, piece by piece; the rest waits for the hook.
                write = self.server.write
                for before in pieces[:index]:
                    if type(before) is pg.Message:
                        assert isinstance(before, pg.Message)
                        self._count(before.type)
                        self._write_upstream(before.type, before.body)
                    else:
                        self._batch_open = True
                        write(before)  # type: ignore[arg-type]
                self._hold(piece, deque(pieces[index + 1 :]))
                return
            if msg_type in observed:
                hook.observe(msg_type, piece.body)
            if msg_type == pg.SYNC:
                syncs += 1
                batch_open = False
            elif msg_type in SYNC_POINTS:
                syncs += 1
                self._uncertain = self._uncertain or batch_open
            elif msg_type not in COPY_IN:
                batch_open = True
        self._syncs_sent += syncs
        self._batch_open = batch_open
        self.server.write(data)

    def _dispatch_client(self, pieces: deque[pg.Piece] | list[pg.Piece]) -> None:
        hook = self.hook
        write = self.server.write
        if hook is None:
            for piece in pieces:
                write(piece)  # type: ignore[arg-type]
            return
        assert isinstance(pieces, deque)
        while pieces:
            piece = pieces.popleft()
            if type(piece) is pg.Partial:
                # Decided here, in stream order, so that a Parse just before it has been handled.
                assert isinstance(piece, pg.Partial)
                hold = piece.type in hook.message_types and hook.wants(piece.type, piece.body_start)
                self._client_framer.decide(hold)
                if not hold:
                    self._batch_open = self._batch_open or piece.type not in COPY_IN
                    write(piece.data)
                continue
            if type(piece) is pg.LongMessage:
                assert isinstance(piece, pg.LongMessage)
                if piece.type in hook.message_types and hook.wants(piece.type, piece.parts[0], piece.marked):
                    self._hold(piece, pieces)
                    return
                if piece.type in self._observed:  # a longer one is neither joined nor read on the event loop
                    hook.observe(piece.type, b"".join(piece.parts) if piece.size <= OBSERVE_MAX else None)
                self._count(piece.type)
                write(pg.header(piece.type, piece.size))
                for part in piece.parts:  # as they came: nothing of a long message is copied
                    write(part)
                continue
            if type(piece) is not pg.Message:
                self._batch_open = True  # raw runs hold only message types that are not sync points
                write(piece)  # type: ignore[arg-type]
                continue
            assert isinstance(piece, pg.Message)
            if piece.type not in hook.message_types or not hook.wants(piece.type, piece.body, piece.marked):
                if piece.type in self._observed:
                    hook.observe(piece.type, piece.body)
                self._count(piece.type)
                self._write_upstream(piece.type, piece.body)
                continue
            self._hold(piece, pieces)
            return

    def _hold(self, msg: pg.Message | pg.LongMessage, rest: deque[pg.Piece]) -> None:
        """Hand `msg` to the hook; `rest`, and whatever the client sends meanwhile, waits for it.
        Reading goes on (up to HELD_LIMIT bytes) so that a client who leaves is noticed at once and
        the hook's work is dropped; a Partial still awaiting its decision stops reading too."""
        self._held = rest
        self._held_bytes = 0
        if self._client_framer.undecided:
            self._pause_client("hook")
        self._hook_task = asyncio.get_running_loop().create_task(self._run_hook(msg))

    async def _run_hook(self, msg: pg.Message | pg.LongMessage) -> None:
        assert self.hook is not None
        try:
            # Joining a long message's pieces in a thread: bytes.join lets go of the GIL meanwhile.
            body = await asyncio.to_thread(msg.body) if isinstance(msg, pg.LongMessage) else msg.body
            await self.hook.handle(msg.type, body, self)
        except asyncio.CancelledError:
            self._uncork()
            return
        except Exception:
            self._uncork()
            self.log.exception("hook failed", extra={"event": "hook_error"})
            self.fail("XX000", "internal error in azure-local-ai-proxy while handling this statement")
            return
        if self._closing:
            self._uncork()
            return
        held, self._held = self._held, None
        self._hook_task = None
        self._resume_client("hook")
        if held:
            self._dispatch_client(held)
        self._uncork()
        self._pause_if_quiet()
        self._end_if_due()
        self._rest()

    def _client_eof(self) -> None:
        if self._client_framer.at_boundary and not self._closing:
            self.server.write(pg.message(pg.TERMINATE))
        self.close()

    def _client_lost(self, exc: Exception | None) -> None:
        self.close()

    def _client_paused(self, paused: bool) -> None:
        """The client's write buffer is full (or drained): stop (resume) reading the server."""
        if self._closing:
            return
        self._server_paused = paused
        if paused:
            self.server.pause_reading()
        else:
            self.server.resume_reading()

    def _pause_client(self, reason: str) -> None:
        if not self._client_pauses and not self._closing:
            self.client.pause_reading()
        self._client_pauses.add(reason)

    def _resume_client(self, reason: str) -> None:
        self._client_pauses.discard(reason)
        if not self._client_pauses and not self._closing:
            self.client.resume_reading()

    # ------------------------------------------------------------------ the relay thread

    def _rest(self) -> None:
        """If nothing of the session needs the interpreter now, hand it over to the relay thread."""
        thread = self._thread
        if thread is None or thread.fast is None or thread.session_id is not None or self._closing:
            return
        if (self._held is not None or self._hook_task is not None or thread.resuming is not None
                or self._capture is not None or self._watcher is not None or self._client_pauses
                or self._server_paused or self._pause_wanted or self._draining is not None):
            return
        if self._now() < thread.stay_until:
            return
        up_skip, down_skip = self._client_framer.skipping, self._server_framer.skipping
        if up_skip is None or down_skip is None:
            return  # a message is partly held
        if self.client.get_write_buffer_size() or self.server.get_write_buffer_size():
            return
        watched = self.hook.resting() if self.hook is not None else ()
        if watched is None:
            return
        thread.hand_over(
            self.client, self.server, self._back_from_thread,
            hooked=self.hook is not None, marker=b"\0".join(self.hook.markers()) if self.hook is not None else b"",
            watched=b"".join(name + b"\0" for name in watched),
            max_message=self._client_framer.max_length, up_skip=up_skip, up_last=self._client_framer.last_type,
            down_skip=down_skip, down_last=self._server_framer.last_type, syncs_sent=self._syncs_sent,
            batch_open=self._batch_open, uncertain=self._uncertain, ready_count=self._server_framer.ready_count,
            tx_status=self._server_framer.tx_status, in_query=self._in_query, last_activity=self._last_activity,
        )

    def _back_from_thread(self, state: fastpath.FastState) -> None:
        assert self._thread is not None
        self._thread.handed_back(state, self._now(), self._resume)

    async def _resume(self, state: fastpath.FastState) -> None:
        """Take the sockets back as transports and go on exactly where the thread stopped."""
        thread = self._thread
        assert thread is not None
        try:
            transports, gates = await thread.transports()
        except asyncio.CancelledError:
            return
        except OSError as exc:
            self.log.warning("taking a session back from the relay thread failed",
                             extra={"event": "relay_thread_error", "reason": str(exc)})
            self.close()
            return
        self.client, self.server = transports
        sides = (Side(self._from_client, self._client_eof, self._client_lost, self._client_paused),
                 Side(self._from_server, self._server_eof, self._server_lost, self._server_paused_cb))
        for transport, side in zip(transports, sides, strict=True):
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
            transport.set_protocol(side)
        self._adopt(state)
        if self.hook is not None and state.unread is not None:
            self.hook.passed(state.unread[0], state.unread[5:])
        if state.up.unsent:
            self.server.write(state.up.unsent)
        if state.down.unsent:
            self.client.write(state.down.unsent)
        # What the thread read but did not frame, then what the transports read meanwhile: one stream.
        from_server = state.down.unframed + gates[1].data
        from_client = state.up.unframed + gates[0].data
        if from_server:
            self._from_server(from_server)
        if from_client:
            self._from_client(from_client)
        for gate, side in zip(gates, sides, strict=True):
            gate.hand_on(side)
        thread.resuming = None
        self._end_if_due()
        if self._closing:
            return
        self._pause_if_quiet()
        if not self._client_pauses:
            self.client.resume_reading()
        if not self._server_paused:
            self.server.resume_reading()
        self._rest()

    def _adopt(self, state: fastpath.FastState) -> None:
        """The counts the thread kept while it had the session."""
        self._client_framer.resume(state.up.skip, state.up.last_type)
        self._server_framer.resume(state.down.skip, state.down.last_type, state.ready_count, state.tx_status)
        self._syncs_sent = state.syncs_sent
        self._batch_open = state.batch_open
        self._uncertain = state.uncertain
        self._in_query = state.in_query
        self._last_activity = state.last_activity

    def _on_thread(self) -> bool:
        """Whether the relay thread has the session now."""
        return self._thread is not None and self._thread.session_id is not None

    def _coming_back(self) -> bool:
        """Whether the session is on its way back from the relay thread."""
        return self._thread is not None and self._thread.resuming is not None

    def _take_back(self) -> None:
        """Stop the relay thread for the session now (it is handed back as when the thread stops)."""
        assert self._thread is not None
        state = self._thread.take_back()
        if state is not None:
            self._back_from_thread(state)

    def _leave_thread(self, to_client: bytes = b"", to_server: bytes = b"") -> None:
        """Closing while the thread has the session (RelayThread.leave)."""
        assert self._thread is not None
        self._thread.leave(to_client, to_server)

    # ------------------------------------------------------------------ server -> client

    def _from_server(self, data: bytes) -> None:
        STATS.bytes_from_server += len(data)
        self._last_activity = self._now()
        framer = self._server_framer
        pieces = framer.feed(data)
        if framer.last_type == pg.READY_FOR_QUERY:
            self._in_query = False
            if self._answered is not None and not self._answered.done() and self.outstanding <= 0:
                self._answered.set_result(None)
            if self._pause_wanted:
                self._pause_if_quiet()
            if self._draining is not None:  # once this answer has gone to the client
                asyncio.get_running_loop().call_soon(self._end_if_due)
        # What this read brings goes to the client in one write: a write is a system call, and one-row
        # statements come as several small messages in one read.
        if not framer.inspect:  # nothing is inspected: every piece is a raw run
            if pieces:
                self.client.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))  # type: ignore[arg-type]
            if self._thread is not None:
                self._rest()
            return
        out: list[bytes] = []
        write = out.append
        for piece in pieces:
            if type(piece) is not pg.Message:
                write(piece)  # type: ignore[arg-type]
                continue
            assert isinstance(piece, pg.Message)
            if piece.type == pg.PARAMETER_STATUS:
                name, value = pg.parse_parameter_status(piece.body)
                self.server_parameters[name] = value
            elif piece.type == pg.NOTICE_RESPONSE and self.hook is not None and self.hook.notice(piece.body, self):
                continue  # a request for the proxy, never the client's
            capture = self._capture
            if capture is not None and piece.type not in ASYNCHRONOUS:
                if capture.feed(piece.type, piece.body):
                    self._capture = None
                    self._update_server_inspection()
                continue
            watcher = self._watcher
            replacement = watcher(piece.type, piece.body) if watcher is not None else None
            write(piece.encode() if replacement is None else replacement)
        if out:
            self.client.write(out[0] if len(out) == 1 else b"".join(out))
        if self._thread is not None:
            self._rest()

    def _server_eof(self) -> None:
        self._server_gone()

    def _server_lost(self, exc: Exception | None) -> None:
        self._server_gone()

    def _server_gone(self) -> None:
        if self._closing:
            return
        if self._server_framer.last_type != pg.ERROR_RESPONSE and self._client_framer.last_type != pg.TERMINATE:
            self.log.warning("upstream connection lost", extra={"event": "upstream_lost"})
            self.fail("08006", "connection to the upstream server was lost")
        else:
            self.close()

    def _server_paused_cb(self, paused: bool) -> None:
        """The server's write buffer is full (or drained): stop (resume) reading the client."""
        if paused:
            self._pause_client("backpressure")
        else:
            self._resume_client("backpressure")

    # ------------------------------------------------------------------ SessionControl

    def send_upstream(self, data: bytes) -> None:
        if not self._closing:
            self.server.write(data)

    def send_client(self, data: bytes) -> None:
        if not self._closing:
            self.client.write(data)

    def forward(self, msg_type: int, body: bytes) -> None:
        """Send a client message (as it came, or rewritten) upstream, counting it if it asks for an answer."""
        self._count(msg_type)
        if not self._closing:
            self._write_upstream(msg_type, body)

    def cork(self) -> None:
        """Gather what goes upstream from now until the hook's message, and those held behind it, have
        gone, and send it all in one write: on a small machine each system call that wakes the server
        costs a good part of a millisecond. Only where the hook awaits nothing more of the server."""
        if not isinstance(self.server, Corked):
            self.server = Corked(self.server)  # type: ignore[assignment]

    def _uncork(self) -> None:
        corked = self.server
        if isinstance(corked, Corked):
            self.server = corked.transport
            if corked.parts and not self._closing:
                self.server.write(b"".join(corked.parts))

    def forward_parts(self, msg_type: int, parts: list[bytes | memoryview]) -> None:
        """`forward` of a body given in parts, written as they are (the transport keeps references)."""
        self._count(msg_type)
        if not self._closing:
            self.server.write(pg.header(msg_type, sum(len(part) for part in parts)))
            for part in parts:
                self.server.write(part)

    def _write_upstream(self, msg_type: int, body: bytes) -> None:
        if len(body) < LONG_BODY:
            self.server.write(pg.message(msg_type, body))
        else:  # a long body goes as it is: copying it behind its header would stall every session
            self.server.write(pg.header(msg_type, len(body)))
            self.server.write(body)

    def _count(self, msg_type: int) -> None:
        if msg_type == pg.SYNC:
            self._syncs_sent += 1
            self._batch_open = False
        elif msg_type in SYNC_POINTS:
            self._syncs_sent += 1  # counted as answered: the count may run high, never low
            self._uncertain = self._uncertain or self._batch_open
        elif msg_type not in COPY_IN:
            self._batch_open = True

    @property
    def requests_sent(self) -> int:
        """Queries and Syncs sent upstream so far: each will be answered by one ReadyForQuery."""
        return self._syncs_sent

    @property
    def in_batch(self) -> bool:
        """Whether extended-query messages were sent since the last Sync (or Query)."""
        return self._batch_open

    def watch_server(self, watcher: ServerWatcher) -> None:
        self._watcher = watcher
        self._update_server_inspection()

    def observe_client(self, types: frozenset[int]) -> None:
        assert self.hook is not None
        self._observed = types
        self._client_framer.inspect = self.hook.message_types | SYNC_POINTS | COPY_IN | types

    def stop_watching(self) -> None:
        self._watcher = None
        self._update_server_inspection()

    def _update_server_inspection(self) -> None:
        busy = self._watcher is not None or self._capture is not None
        self._server_framer.inspect = ALL_TYPES if busy else self._server_always

    @property
    def outstanding(self) -> int:
        """Requests (Query or Sync) sent upstream that the server has not yet answered with ReadyForQuery."""
        return self._syncs_sent - self._server_framer.ready_count

    @property
    def transaction_status(self) -> str:
        """The server's transaction status as of its last ReadyForQuery: I (idle), T (in a block), E (failed)."""
        self._look_at_thread()
        return chr(self._server_framer.tx_status)

    async def settled(self) -> None:
        """Wait until the server has answered every request sent so far (all Queries and Syncs).
        Raises QueryFailed (55000) where that cannot be known: inside an unsynchronised batch (the
        server may be skipping to its Sync), or after a Query was sent inside one."""
        if self._batch_open or self._uncertain:
            raise QueryFailed({
                "C": "55000",
                "M": "the proxy cannot wait for the server here: the session sent a Query in the middle of an "
                "extended-protocol batch, or has not sent its Sync yet",
                "H": "Send Sync before statements that need it, and no Query inside a batch.",
            })
        loop = asyncio.get_running_loop()
        while self.outstanding > 0 and not self._closing:
            self._answered = loop.create_future()
            await self._answered

    async def query(self, sql: str) -> list[tuple[str | None, ...]]:
        """Run a query of the proxy's own on this session's connection, once the server has answered
        everything before it, and return its rows as text; the client sees nothing of it."""
        loop = asyncio.get_running_loop()
        await self.settled()
        if self._closing:
            raise QueryFailed({"C": "08006", "M": "the session is closing"})
        done: asyncio.Future[list[tuple[str | None, ...]]] = loop.create_future()
        self._capture = Capture(done)
        self._update_server_inspection()
        self._syncs_sent += 1
        self.server.write(pg.message(pg.QUERY, sql.encode() + b"\0"))
        return await done

    # ------------------------------------------------------------------ the admin console's controls

    def pause(self) -> None:
        """PAUSE: read nothing more from the client once the request in progress, if any, is done (the
        server's answers still reach it), so that its next queries wait. A request in progress is let
        finish, the rest of a message or an extended-protocol batch's Sync included: cutting the client
        off in the middle would keep it in progress for ever."""
        self._pause_wanted = True
        if self._on_thread():  # the thread reads on regardless: the session comes back to pause
            self._take_back()
            return
        self._pause_if_quiet()

    def resume(self) -> None:
        self._pause_wanted = False
        self._resume_client("paused")

    def _pause_if_quiet(self) -> None:
        if self._pause_wanted and self.quiet:
            self._pause_client("paused")

    @property
    def quiet(self) -> bool:
        """Nothing of the client's is in progress: the server's last word was ReadyForQuery and the
        client has sent nothing since (so no extended-protocol batch is waiting for its Sync, and no
        message is partly read), no request is left unanswered (a pipelined Query after it), and
        the hook holds nothing."""
        at_boundary = self._look_at_thread()
        return self.idle and self.outstanding <= 0 and at_boundary

    def set_idle_timeout(self, seconds: float) -> None:
        """A reload changed idle_timeout: from now on, this session is closed after `seconds` idle."""
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        self._idle_timeout = seconds
        if seconds > 0 and not self._closing:
            self._schedule_idle_check(seconds)

    # ------------------------------------------------------------------ life cycle

    def cancel(self) -> None:
        """A CancelRequest named this session: tell the hook (the upstream gets its own request)."""
        if self.hook is not None:
            self.hook.cancel()

    @property
    def idle(self) -> bool:
        """No query in progress: the server's last word was ReadyForQuery and the client has sent
        nothing since."""
        self._look_at_thread()
        return not self._in_query and self._held is None and not self._coming_back()

    def _look_at_thread(self) -> bool:
        """Where the thread has the session: its counts as they are now (the thread hands them back
        the same way when it stops); and whether the client is between messages."""
        activity = self._thread.activity() if self._thread is not None else None
        if activity is None:
            return self._client_framer.at_boundary
        self._last_activity, self._in_query = activity.last_activity, activity.in_query
        self._syncs_sent = activity.syncs_sent
        self._server_framer.ready_count, self._server_framer.tx_status = activity.ready_count, activity.tx_status
        return activity.client_at_boundary

    def _schedule_idle_check(self, delay: float) -> None:
        self._idle_handle = asyncio.get_running_loop().call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        if self._closing:
            return
        idle = self.idle
        quiet = self._now() - self._last_activity
        if quiet >= self._idle_timeout and idle:
            self.log.info("idle timeout", extra={"event": "idle_timeout"})
            self.terminate("57P05", "terminating connection due to idle-session timeout")
            return
        self._schedule_idle_check(max(self._idle_timeout - quiet, 0.05) if idle else self._idle_timeout)

    def drain(self, sqlstate: str, text: str) -> bool:
        """Shutting down: end the session with this FATAL error at once if nothing is in progress (no
        query, no transaction block), else as soon as that is so; whether it goes on for now. The relay
        thread gives the session back: it would not say when the session comes to rest."""
        self._draining = (sqlstate, text)
        self._end_if_due()
        if self._on_thread():
            self._take_back()
        return not self._closing

    def _end_if_due(self) -> None:
        """End the session if terminate() waited for it to come back from the relay thread, or if the
        proxy is shutting down and the session is idle outside a transaction block."""
        if self._ending is not None:
            self.terminate(*self._ending)
        elif self._draining is not None and self.quiet and self.transaction_status == "I":
            self.terminate(*self._draining)

    def terminate(self, sqlstate: str, text: str) -> None:
        """End the session from the proxy's side: tell the client why, say goodbye to the server.
        Wherever the session is: on the relay thread (its sockets), on its way back from there (the
        transports it had are closed and the new ones not made yet: it ends once they are), or with a
        connection already closed."""
        if self._closing:
            return
        if self._on_thread():
            self._leave_thread(pg.error_response(sqlstate, text), pg.message(pg.TERMINATE))
            self.close()
            return
        if self._coming_back() and self.client.is_closing():
            self._ending = (sqlstate, text)
            return
        if self._client_framer.at_boundary and not self.server.is_closing():
            self.server.write(pg.message(pg.TERMINATE))
        self.fail(sqlstate, text)

    def fail(self, sqlstate: str, text: str) -> None:
        """Send the client a FATAL error (unless its connection is closed already) and close both
        connections."""
        if self._closing:
            return
        if self._on_thread():
            self._leave_thread(pg.error_response(sqlstate, text))
        elif not self.client.is_closing():
            self.client.write(pg.error_response(sqlstate, text))
        self.close()

    def close(self) -> None:
        if self._closing:
            return
        if self._on_thread():
            self._leave_thread()
        self._closing = True
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        for task in (self._hook_task, self._thread.resuming if self._thread is not None else None):
            if task is not None and not task.done():
                task.cancel()
        for future in (self._answered, self._capture.done if self._capture else None):
            if future is not None and not future.done():
                future.cancel()
        if self.hook is not None and not self.idle:
            try:
                self.hook.close()
            except Exception:
                self.log.exception("hook close failed", extra={"event": "hook_error"})
        if self._server_paused:
            self.server.resume_reading()
        self.client.close()
        self.server.close()
        if not self.closed.done():
            self.closed.set_result(None)
