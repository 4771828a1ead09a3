"""The listener: accepts clients, runs each session in a task of its own, and shuts down gently."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import replace

from .config import Config
from .hooks import HookFactory
from .session import Registry, SessionSettings, handle_client
from .upstream import Upstream
from .wire import HandshakeProtocol

log = logging.getLogger("azure_local_ai_proxy.server")


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
        self, config: Config, upstream: Upstream, hook_factory: HookFactory | None = None, *, mailboxes: bool = False
    ) -> None:
        self.config = config
        self.registry = Registry()
        self.settings = SessionSettings(
            upstream=upstream,
            tls=client_tls_context(config.tls_cert, config.tls_key),
            max_message_size=config.max_message_size,
            idle_timeout=config.idle_timeout,
            hook_factory=hook_factory,
            mailboxes=mailboxes,
            relay_thread=config.relay_thread,
        )
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

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

    def _run(self, conn: HandshakeProtocol) -> None:
        task = asyncio.get_running_loop().create_task(
            handle_client(conn, self.settings, self.registry, self.config.startup_timeout)
        )
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("session task failed", exc_info=task.exception(), extra={"event": "session_error"})

    async def shutdown(self, grace: float) -> None:
        """Stop accepting; let sessions finish for up to `grace` seconds; then end the rest."""
        if self._server is not None:
            self._server.close()
        log.info("shutting down", extra={"event": "shutdown", "sessions": len(self.registry.live), "grace": grace})
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace) if grace > 0 else (set(), self._tasks)
            for session in list(self.registry.live):
                if session.relay is not None:
                    session.relay.terminate("57P01", "terminating connection due to administrator command")
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()


class _AcceptedConnection(HandshakeProtocol):
    """A new client connection: starts its session task once the transport exists."""

    def __init__(self, server: ProxyServer) -> None:
        super().__init__()
        self._proxy = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._proxy._run(self)
