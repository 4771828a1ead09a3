"""Establishing a session: the start-up packet, TLS, the upstream connection and the relayed
authentication exchange, up to the server's first ReadyForQuery. Then the relay takes over."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from . import protocol as pg
from .fastpath import fast_path
from .hooks import HookFactory, SessionInfo
from .logs import ContextLogger
from .relay import Relay
from .stats import STATS
from .upstream import Upstream, UpstreamError
from .wire import ConnectionClosed, HandshakeProtocol

log = logging.getLogger("azure_local_ai_proxy.session")

_TRUE_REPLICATION = ("true", "on", "yes", "1", "database")


class SessionRejected(Exception):
    """Start-up cannot go on; the client is told `sqlstate` and `text`."""

    def __init__(self, sqlstate: str, text: str) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate


class ServerRefused(SessionRejected):
    """The server refused the session at start-up (and the client has its error already)."""


@dataclass
class Registry:
    """The live sessions, and the same sessions by the cancel key the proxy gave each client."""

    live: set[Session] = field(default_factory=set)
    by_key: dict[tuple[int, bytes], Session] = field(default_factory=dict)
    #: PAUSE (admin console): each session's client is read from no more once its request in progress is
    #: done, until RESUME; new sessions' too.
    paused: bool = False
    #: Shutting down: the FATAL error (SQLSTATE, text) each session ends with once nothing is in progress.
    draining: tuple[str, str] | None = None

    def pause(self) -> None:
        self.paused = True
        for session in self.live:
            if session.relay is not None:
                session.relay.pause()

    def resume(self) -> None:
        self.paused = False
        for session in self.live:
            if session.relay is not None:
                session.relay.resume()

    def drain(self, sqlstate: str, text: str) -> int:
        """Shutdown: end each session with this FATAL error once nothing is in progress (at once where
        nothing is), a session that comes to be meanwhile too; how many sessions go on for now (in a
        query or a transaction block)."""
        self.draining = (sqlstate, text)
        return sum(session.relay.drain(sqlstate, text) for session in list(self.live) if session.relay is not None)

    def allocate_key(self, pid: int, secret_length: int) -> tuple[int, bytes]:
        """A cancel key for a client: the server's real process id, so that pg_backend_pid(), NOTIFY
        senders and pg_cancel_backend agree with what the driver reports, and a secret of the proxy's
        own, as long as the server's, so that a cancel request must come through the proxy."""
        while True:
            key = (pid, secrets.token_bytes(secret_length))
            if key not in self.by_key:
                return key


@dataclass(eq=False)
class Session:
    """One client's session, from start-up to close."""

    session_id: str
    log: logging.LoggerAdapter
    proxy_key: tuple[int, bytes] | None = None
    upstream_key: tuple[int, bytes] | None = None
    relay: Relay | None = None
    connected_at: float = field(default_factory=time.time)
    client_addr: str = ""
    #: What a CancelRequest naming this session does when it has no upstream backend (the admin console).
    on_cancel: Callable[[], None] | None = None


class Console(Protocol):
    """The admin console, as the listener sees it (console/entry.py)."""

    def claims(self, parameters: dict[str, str]) -> bool:
        """Whether a start-up packet asks for the console rather than the server."""
        ...

    async def login(self, session: Session, client: HandshakeProtocol, startup: pg.StartupPacket,
                    settings: SessionSettings, registry: Registry) -> Callable[[], Awaitable[None]]:
        """Authenticate and admit an admin (raising SessionRejected otherwise); return what runs the
        console session after start-up."""
        ...


@dataclass(frozen=True)
class SessionSettings:
    """What `establish` needs from the proxy's configuration."""

    upstream: Upstream
    tls: ssl.SSLContext | None
    max_message_size: int
    idle_timeout: float
    hook_factory: HookFactory | None
    #: Hand resting sessions to the relay thread (fastpath.py).
    relay_thread: bool = True
    console: Console | None = None


async def read_startup(client: HandshakeProtocol, tls: ssl.SSLContext | None) -> pg.StartupPacket:
    """Read start-up packets, answering SSL and GSSAPI encryption requests, until a
    StartupMessage or a CancelRequest arrives."""
    encrypted = False
    while True:
        length = pg.startup_length(await client.read_exactly(4))
        packet = pg.parse_startup(length.to_bytes(4, "big") + await client.read_exactly(length - 4))
        if packet.kind is pg.StartupKind.SSL:
            if encrypted:
                raise pg.ProtocolViolation("SSL request received on an encrypted connection")
            if tls is None:
                client.write(b"N")
                continue
            client.write(b"S")
            await client.start_tls(tls, server_side=True, server_hostname=None)
            encrypted = True
        elif packet.kind is pg.StartupKind.GSSENC:
            client.write(b"N")
        else:
            return packet


def check_parameters(params: dict[str, str]) -> None:
    """Refuse what a proxy cannot carry."""
    if params.get("replication", "false").lower() in _TRUE_REPLICATION:
        raise SessionRejected(
            "0A000",
            "replication connections are not supported by azure-local-ai-proxy; connect to the server directly",
        )


async def establish(
    session: Session, client: HandshakeProtocol, startup: pg.StartupPacket, settings: SessionSettings,
    registry: Registry,
) -> Relay:
    """Connect upstream, relay authentication, and return the running relay."""
    check_parameters(startup.parameters)
    try:
        server = await settings.upstream.connect()
    except UpstreamError as exc:
        STATS.upstream_connect_failures += 1
        raise SessionRejected(exc.sqlstate, str(exc)) from exc
    try:
        _to_server(server, startup.raw)  # as the client sent it: a pooler may refuse any parameter added
        server_parameters = await _relay_authentication(session, client, server, settings.max_message_size, registry)
    except BaseException:
        server.close()
        raise
    params = startup.parameters
    info = SessionInfo(
        session_id=session.session_id,
        user=params["user"],
        database=params.get("database", params["user"]),
        parameters=dict(params),
        upstream=settings.upstream,
        server_key=session.upstream_key,
    )
    hook = settings.hook_factory(info) if settings.hook_factory else None
    assert client.transport is not None and server.transport is not None
    relay = Relay(
        info, client.transport, server.transport, hook=hook, max_message_size=settings.max_message_size,
        idle_timeout=settings.idle_timeout, log=session.log, server_parameters=server_parameters,
        fast=fast_path() if settings.relay_thread else None,
    )
    relay.start(client.detach(), server.detach())
    return relay


async def _relay_authentication(
    session: Session, client: HandshakeProtocol, server: HandshakeProtocol, max_size: int, registry: Registry
) -> dict[str, str]:
    """Pass the authentication exchange through, up to and including ReadyForQuery; return the
    parameters the server reported (ParameterStatus).

    The proxy changes two things only: SCRAM-SHA-256-PLUS leaves the mechanism list (channel
    binding cannot span two TLS sessions), and the client's cancel key carries a secret of the
    proxy's own (with the server's real pid), so that cancel requests come to the proxy, which knows
    the session they belong to."""
    parameters: dict[str, str] = {}

    def after_authentication(msg: pg.Message) -> None:
        if msg.type == pg.BACKEND_KEY_DATA:
            session.upstream_key = pg.parse_backend_key_data(msg.body)
            session.proxy_key = registry.allocate_key(session.upstream_key[0], len(session.upstream_key[1]))
            registry.by_key[session.proxy_key] = session
            client.write(pg.backend_key_data(*session.proxy_key))
            return
        client.write(msg.encode())
        if msg.type == pg.PARAMETER_STATUS:
            name, value = pg.parse_parameter_status(msg.body)
            parameters[name] = value

    await relay_authentication(client, server, max_size, after_authentication)
    return parameters


async def relay_authentication(
    client: HandshakeProtocol, server: HandshakeProtocol, max_size: int, rest: Callable[[pg.Message], None]
) -> None:
    """Relay the server's authentication requests and the client's answers; hand every other message
    the server sends, up to and including its ReadyForQuery, to `rest`. An ErrorResponse goes to the
    client and raises ServerRefused."""
    while True:
        try:
            msg = await server.read_message()
        except ConnectionClosed as exc:
            raise _server_gone() from exc
        if msg.type == pg.AUTHENTICATION:
            code = pg.auth_code(msg.body)
            body = pg.strip_channel_binding(msg.body) if code == pg.AUTH_SASL else msg.body
            client.write(pg.message(pg.AUTHENTICATION, body))
            if code in pg.AUTH_NEEDS_RESPONSE:
                reply = await client.read_message(max_size)
                if reply.type != pg.PASSWORD:
                    raise pg.ProtocolViolation(f"expected password response, got message type {reply.type}")
                _to_server(server, reply.encode())
        elif msg.type == pg.ERROR_RESPONSE:
            client.write(_explain_startup_error(msg))
            fields = pg.parse_fields(msg.body)
            raise ServerRefused(fields.get("C", "08006"), fields.get("M", "the server refused the session"))
        else:
            rest(msg)
            if msg.type == pg.READY_FOR_QUERY:
                return


def _to_server(server: HandshakeProtocol, data: bytes) -> None:
    """Write to the server during start-up. Its connection lost is the server's failure, told to the
    client as such (08006), not the client's leaving, which a ConnectionClosed means in handle_client."""
    try:
        server.write(data)
    except ConnectionClosed as exc:
        raise _server_gone() from exc


def _server_gone() -> SessionRejected:
    """One error for the server's leaving however it shows (a read or a write), so the client hears it alike."""
    return SessionRejected("08006", "the upstream server closed the connection during start-up")


def _explain_startup_error(msg: pg.Message) -> bytes:
    """The server's start-up error, with a hint where the proxy itself is the cause."""
    fields = pg.parse_fields(msg.body)
    if "channel binding" in fields.get("M", "") and "H" not in fields:
        return pg.error_response(
            fields.get("C", "08P01"), fields["M"], severity=fields.get("S", "FATAL"), detail=fields.get("D"),
            hint="SCRAM channel binding cannot cross a proxy. With TLS on both the client's and the server's side "
            "of azure-local-ai-proxy, connect with channel_binding=disable.",
        )
    return msg.encode()


async def deliver_cancel(packet: pg.StartupPacket, upstream: Upstream, registry: Registry) -> None:
    """Forward a CancelRequest to the upstream backend of the session it names; ignore unknown keys."""
    session = registry.by_key.get((packet.cancel_pid, packet.cancel_secret))
    if session is not None and session.on_cancel is not None:
        session.log.info("cancel request", extra={"event": "cancel"})
        session.on_cancel()
        return
    if session is None or session.upstream_key is None:
        log.info("cancel request with unknown key ignored", extra={"event": "cancel_unknown"})
        return
    session.log.info("cancel request", extra={"event": "cancel"})
    if session.relay is not None:
        session.relay.cancel()
    try:
        await upstream.send_cancel(*session.upstream_key)
    except OSError as exc:
        session.log.warning("cancel could not reach upstream", extra={"event": "cancel_failed", "reason": str(exc)})


def new_session() -> Session:
    session_id = secrets.token_hex(4)
    return Session(session_id, ContextLogger(log, {"session": session_id}))


async def handle_client(
    client: HandshakeProtocol, settings: SessionSettings, registry: Registry, startup_timeout: float
) -> None:
    """Drive one accepted connection through start-up, then wait for its relay to end."""
    session = new_session()
    peer = client.transport.get_extra_info("peername") if client.transport is not None else None
    session.client_addr = _address(peer)
    started = False
    console = None
    try:
        async with asyncio.timeout(startup_timeout):
            startup = await read_startup(client, settings.tls)
            if startup.kind is pg.StartupKind.CANCEL:
                client.close()
                await deliver_cancel(startup, settings.upstream, registry)
                return
            started = True
            session.log.info(
                "session start",
                extra={"event": "connect", "user": startup.parameters.get("user"),
                       "database": startup.parameters.get("database", startup.parameters.get("user")),
                       "application_name": startup.parameters.get("application_name", "")},
            )
            if settings.console is not None and settings.console.claims(startup.parameters):
                console = await settings.console.login(session, client, startup, settings, registry)
            else:
                relay = await establish(session, client, startup, settings, registry)
    except pg.ProtocolViolation as exc:
        _refuse(client, session, "08P01", str(exc))
    except ServerRefused as exc:
        _log_refusal(session, exc.sqlstate, str(exc), by="server")
        client.close()
    except SessionRejected as exc:
        _refuse(client, session, exc.sqlstate, str(exc))
    except TimeoutError:
        _refuse(client, session, "08P01", f"start-up did not complete within {startup_timeout:g} seconds")
    except ConnectionClosed as exc:
        if started:
            session.log.info("session end", extra={"event": "disconnect", "reason": f"during start-up: {exc}"})
        client.close()
    except ssl.SSLError as exc:
        session.log.info("TLS handshake failed", extra={"event": "tls_failed", "reason": str(exc)})
        client.close()
    else:
        if console is not None:
            try:
                with contextlib.suppress(ConnectionClosed):  # the admin left while being answered
                    await console()
            finally:
                client.close()
                session.log.info("session end", extra={"event": "disconnect"})
            return
        session.relay = relay
        registry.live.add(session)
        STATS.sessions_total += 1
        if registry.paused:
            relay.pause()
        if registry.draining is not None:
            relay.drain(*registry.draining)
        try:
            await asyncio.shield(relay.closed)
        finally:
            relay.close()
            registry.live.discard(session)
            session.log.info("session end", extra={"event": "disconnect"})
    finally:
        if session.proxy_key is not None:
            registry.by_key.pop(session.proxy_key, None)


def _address(peer: object) -> str:
    """host:port of a TCP peer; a Unix socket's peer has no address."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "")


def _refuse(client: HandshakeProtocol, session: Session, sqlstate: str, text: str) -> None:
    _log_refusal(session, sqlstate, text, by="proxy")
    with contextlib.suppress(ConnectionClosed):  # a client that has left is refused all the same
        client.write(pg.error_response(sqlstate, text))
    client.close()


def _log_refusal(session: Session, sqlstate: str, text: str, by: str) -> None:
    """The end of a session refused at start-up: every "session start" has an end in the log."""
    STATS.sessions_refused[(by,)] += 1
    session.log.info("session refused", extra={"event": "refused", "sqlstate": sqlstate, "reason": text, "by": by})
