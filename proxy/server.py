"""The listener: accepts clients, runs each session in a task of its own, and shuts down gently."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import replace

from . import protocol as pg
from .config import Config
from .hooks import HookFactory
from .session import Registry, SessionSettings, handle_client
from .upstream import Upstream
from .wire import HandshakeProtocol

log = logging.getLogger("azure_local_ai_proxy.server")

#: The FATAL error sessions end with at shutdown, as PostgreSQL's own at a fast shutdown.
ADMIN_SHUTDOWN = ("57P01", "terminating connection due to administrator command")
#: At the end of the grace, how long the sessions' tasks get to see their relays closed before they are
#: cancelled (a session coming back from the relay thread ends once it is back).
CLOSE_WAIT = 2.0


def client_tls_context(cert: str, key: str) -> ssl.SSLContext | None:
    """The TLS context offered to clients that send SSLRequest, or None to answer 'N'."""
    if not cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


class ProxyServer:
    """Accepts clients on one address and relays each to the upstream server."""

    def __init__(
        self, config: Config, upstream: Upstream, hook_factory: HookFactory | None = None) -> None:
        self.config = config
        self.registry = Registry()
        self.settings = SessionSettings(
            upstream=upstream,
            tls=client_tls_context(config.tls_cert, config.tls_key),
            max_message_size=config.max_message_size,
            idle_timeout=config.idle_timeout,
            hook_factory=hook_factory,
            relay_thread=config.relay_thread,
        )
        self._server: asyncio.Server | None = None
        self._tasks: dict[asyncio.Task[None], _AcceptedConnection] = {}
        #: Set by hurry(): the sessions the shutdown grace waits for end now.
        self._hurry = asyncio.Event()

    def reconfigure(self, config: Config, tls: ssl.SSLContext | None, upstream: Upstream) -> None:
        """A reload: new sessions get the new settings; live sessions keep theirs, but for idle_timeout."""
        idle_changed = config.idle_timeout != self.config.idle_timeout
        self.config = config
        self.settings = replace(self.settings, upstream=upstream, tls=tls, max_message_size=config.max_message_size,
                                idle_timeout=config.idle_timeout)
        if idle_changed:
            for session in list(self.registry.live):
                if session.relay is not None:
                    session.relay.set_idle_timeout(config.idle_timeout)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._accept, self.config.listen_host, self.config.listen_port, reuse_address=True
        )
        log.info("listening", extra={"event": "listening", "address": f"{self.config.listen_host}:{self.port}",
                                      "upstream": self.settings.upstream.describe()})

    def _accept(self) -> HandshakeProtocol:
        conn = _AcceptedConnection(self)
        return conn

    def _run(self, conn: _AcceptedConnection) -> None:
        task = asyncio.get_running_loop().create_task(
            handle_client(conn, self.settings, self.registry, self.config.startup_timeout)
        )
        self._tasks[task] = conn
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("session task failed", exc_info=task.exception(), extra={"event": "session_error"})

    async def shutdown(self, grace: float) -> None:
        """PostgreSQL's shutdown, as PgBouncer does it: stop accepting; end at once the sessions with
        nothing in progress, and the connections still starting up or at the admin console; give the
        sessions in a query or a transaction block up to `grace` seconds, ending each as soon as it is
        idle outside a block; then, or at hurry(), end the rest."""
        if self._server is not None:
            self._server.close()
        log.info("shutting down", extra={"event": "shutdown", "sessions": len(self.registry.live), "grace": grace})
        self._end_handshakes()
        busy = self.registry.drain(*ADMIN_SHUTDOWN)
        if busy and grace > 0:
            log.warning("waiting up to %g s for %s in a query or transaction block; send SIGTERM or SIGINT again "
                        "to close them now", grace, _sessions(busy),
                        extra={"event": "shutdown_wait", "sessions": busy, "grace": grace})
            await self._grace(grace)
        await self._end_all()
        if self._server is not None:
            await self._server.wait_closed()

    def hurry(self) -> None:
        """Another SIGTERM or SIGINT during the shutdown: the sessions it waits for end now."""
        if not self._hurry.is_set():
            log.warning("closing the sessions now",
                        extra={"event": "shutdown_now", "sessions": len(self.registry.live)})
        self._hurry.set()

    def _end_handshakes(self) -> None:
        """Connections still in start-up, and admin console sessions, have no query or transaction of
        the server's to finish: they are told so and end now."""
        for task, conn in list(self._tasks.items()):
            transport = conn.transport
            if transport is None or transport.get_protocol() is not conn:
                continue  # a relay has it: the registry drains it
            if not transport.is_closing():
                transport.write(pg.error_response(*ADMIN_SHUTDOWN))
            transport.close()
            task.cancel()

    async def _grace(self, seconds: float) -> None:
        """Wait until every session has ended, `seconds` have passed, or hurry() was called."""
        ended = asyncio.gather(*self._tasks, return_exceptions=True)
        hurried = asyncio.ensure_future(self._hurry.wait())
        await asyncio.wait({ended, hurried}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        hurried.cancel()

    async def _end_all(self) -> None:
        """End the sessions left (57P01), and wait for their tasks."""
        for session in list(self.registry.live):
            if session.relay is not None:
                session.relay.terminate(*ADMIN_SHUTDOWN)
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=CLOSE_WAIT)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_WAIT)


class _AcceptedConnection(HandshakeProtocol):
    """A new client connection: starts its session task once the transport exists."""

    def __init__(self, server: ProxyServer) -> None:
        super().__init__()
        self._proxy = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._proxy._run(self)


def _sessions(count: int) -> str:
    return f"{count} session" if count == 1 else f"{count} sessions"
