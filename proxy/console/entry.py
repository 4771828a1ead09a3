"""The admin console as the listener sees it: which start-up packets it claims, the login, and what
each command does to the running proxy."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from catalog.server import ServerCatalog

from .. import messages
from .. import protocol as pg
from ..config import ConfigError
from ..intercept.functions import Backend
from ..session import Registry, Session, SessionRejected, SessionSettings
from ..stats import STATS
from ..wire import HandshakeProtocol
from . import views
from .commands import Command, ConsoleError
from .conversation import Conversation, Result
from .login import AdminAccess, authenticate

if TYPE_CHECKING:
    from ..reload import ReloadReport
    from ..server import ProxyServer

log = logging.getLogger("azure_local_ai_proxy.console")

#: How often PAUSE looks whether the queries in progress have ended.
QUIET_POLL = 0.05


class AdminConsole:
    def __init__(self, server: ProxyServer, backend: Backend, reload: Callable[[], Awaitable[ReloadReport]],
                 version: str) -> None:
        self.server = server
        self.backend = backend
        self.reload = reload
        self.version = version
        self.started = time.monotonic()

    # ------------------------------------------------------------------ the listener's side (session.Console)

    def claims(self, parameters: dict[str, str]) -> bool:
        database = self.server.config.admin_database
        return bool(database) and parameters.get("database", parameters["user"]) == database

    async def login(self, session: Session, client: HandshakeProtocol, startup: pg.StartupPacket,
                    settings: SessionSettings, registry: Registry) -> Callable[[], Awaitable[None]]:
        config = self.server.config
        access = AdminAccess.of(config)
        user = startup.parameters["user"]
        greeting, superuser = await authenticate(client, startup, settings, config.admin_auth_database,
                                                 check_superuser=access.superusers_only)
        refusal = access.refusal(user, superuser)
        if refusal is not None:
            raise SessionRejected("42501", refusal)
        session.proxy_key = registry.allocate_key(os.getpid(), 4)
        registry.by_key[session.proxy_key] = session
        conversation = Conversation(client, self.execute, session.log, settings.max_message_size)
        session.on_cancel = conversation.cancel
        client.write(b"".join(greeting) + pg.backend_key_data(*session.proxy_key) + messages.ready_for_query())
        session.log.info("admin console session", extra={"event": "admin_login", "user": user})
        return conversation.run

    # ------------------------------------------------------------------ the commands

    async def execute(self, command: Command, cancelled: asyncio.Event) -> Result:
        if command.verb == "SHOW":
            return Result(command.tag, await self._show(command.item))
        if command.verb == "RELOAD":
            try:
                report = await self.reload()
            except ConfigError as exc:
                raise ConsoleError("F0000", f"the configuration was not reloaded: {exc}",
                                   "The running configuration is kept; fix the file and reload again.") from exc
            return Result(command.tag, notices=tuple(report.notices()))
        if command.verb == "PAUSE":
            await self._pause(cancelled)
            return Result(command.tag)
        assert command.verb == "RESUME"
        registry = self.server.registry
        if not registry.paused:
            raise ConsoleError("55000", "the proxy is not paused")
        registry.resume()
        log.info("resumed", extra={"event": "resume"})
        return Result(command.tag)

    async def _show(self, item: str) -> views.Table:
        server = self.server
        if item == "STATS":
            engine = self.backend.engine
            return views.stats_table(
                STATS, engine.stats, sessions_now=len(server.registry.live), queue_depth=engine.queue_depth,
                paused=server.registry.paused, uptime_seconds=time.monotonic() - self.started,
                cache_hits=self.backend.cache.hits, cache_misses=self.backend.cache.misses,
                catalog=_catalog_state(self.backend.catalog),
                remote=views.remote_stats(pools.pools, pools.local_texts) if (pools := self.backend.remote) else None,
            )
        if item == "REMOTE":
            return views.remote_table(self.backend.remote.pools if self.backend.remote is not None else {})
        if item == "SESSIONS":
            return views.sessions_table(_session_row(s) for s in list(server.registry.live) if s.relay is not None)
        if item == "MODELS":
            records = await asyncio.to_thread(self.backend.catalog.list_models)
            loaded = frozenset(r.uri for r in records if self.backend.is_loaded(r.uri, r.model_path))
            pools = {r.uri: pool.spec.name for r in records if (pool := self.backend.runs_on(r.uri, r.model_path))}
            return views.models_table(records, loaded, pools)
        if item == "CONFIG":
            return views.config_table(server.config)
        if item == "VERSION":
            return views.version_table(self.version)
        return views.help_table()

    async def _pause(self, cancelled: asyncio.Event) -> None:
        """Stop reading from every client, then wait for the queries in progress to end (as PgBouncer's
        PAUSE); a cancel request (psql's Ctrl-C) ends the wait and resumes."""
        registry = self.server.registry
        if registry.paused:
            raise ConsoleError("55000", "the proxy is paused already")
        registry.pause()
        log.info("paused", extra={"event": "pause", "sessions": len(registry.live)})
        while any(s.relay is not None and not s.relay.quiet for s in list(registry.live)):
            try:
                await asyncio.wait_for(cancelled.wait(), QUIET_POLL)
            except TimeoutError:
                continue
            registry.resume()
            log.info("pause cancelled", extra={"event": "resume"})
            raise ConsoleError("57014", "canceling statement due to user request")


def _session_row(session: Session) -> views.SessionRow:
    relay = session.relay
    assert relay is not None
    info = relay.info
    status = relay.transaction_status
    if not relay.quiet:
        state = "active"
    else:
        state = {"T": "idle in transaction", "E": "idle in transaction (aborted)"}.get(status, "idle")
    return views.SessionRow(
        session=session.session_id, user=info.user, database=info.database,
        application_name=info.parameters.get("application_name", ""), client_addr=session.client_addr,
        connected_at=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(session.connected_at)) + "Z",
        state=state, backend_pid=session.upstream_key[0] if session.upstream_key else None,
    )


def _catalog_state(catalog: object) -> str:
    """local, server, or (a catalog in the server that cannot be read now) why, the last one read serving."""
    if not isinstance(catalog, ServerCatalog):
        return "local"
    return "server" if catalog.problem is None else f"server, last read (now: {catalog.problem})"
