"""Who may use the admin console, and how an admin logs in: the server checks the password, on a
connection of its own to `admin_auth_database` that closes once the login is known, and the login
must be one that admin_users lists (or, with admin_users empty and a loopback listener, a superuser)."""

from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass

from .. import messages
from .. import protocol as pg
from ..config import Config
from ..session import SessionRejected, SessionSettings, relay_authentication
from ..stats import STATS
from ..upstream import UpstreamError
from ..wire import ConnectionClosed, HandshakeProtocol

_IS_SUPERUSER = "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = session_user"


@dataclass(frozen=True)
class AdminAccess:
    logins: frozenset[str]
    loopback: bool

    @classmethod
    def of(cls, config: Config) -> AdminAccess:
        return cls(config.admin_logins, is_loopback(config.listen_host))

    @property
    def superusers_only(self) -> bool:
        """Empty admin_users on a loopback listener: the server's superusers are the admins."""
        return not self.logins and self.loopback

    def refusal(self, login: str, superuser: bool) -> str | None:
        """Why `login` may not use the console, or None if it may."""
        if login in self.logins or (self.superusers_only and superuser):
            return None
        if self.superusers_only:
            return f'permission denied for the admin console: "{login}" is not a superuser, and admin_users is empty'
        if not self.logins:
            return "permission denied for the admin console: admin_users is empty and the proxy listens beyond loopback"
        return f'permission denied for the admin console: "{login}" is not in admin_users'


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def authenticate(client: HandshakeProtocol, startup: pg.StartupPacket, settings: SessionSettings,
                       auth_database: str, check_superuser: bool) -> tuple[list[bytes], bool]:
    """Relay the server's authentication of the client's login to `auth_database`; return the start-up
    messages (ParameterStatus, ...) the client should see, and whether the login is a superuser (only
    asked for when `check_superuser`)."""
    try:
        server = await settings.upstream.connect()
    except UpstreamError as exc:
        STATS.upstream_connect_failures += 1
        raise SessionRejected(exc.sqlstate, str(exc)) from exc
    kept: list[bytes] = []

    def keep(msg: pg.Message) -> None:
        if msg.type not in (pg.BACKEND_KEY_DATA, pg.READY_FOR_QUERY):  # the console gives its own
            kept.append(msg.encode())

    try:
        server.write(pg.startup_message({**startup.parameters, "database": auth_database}, startup.version))
        await relay_authentication(client, server, settings.max_message_size, keep)
        superuser = await _is_superuser(server) if check_superuser else False
    finally:
        with contextlib.suppress(Exception):
            server.write(pg.message(pg.TERMINATE))
        server.close()
    return kept, superuser


async def _is_superuser(server: HandshakeProtocol) -> bool:
    server.write(pg.message(pg.QUERY, _IS_SUPERUSER.encode() + b"\0"))
    answer = None
    try:
        while True:
            msg = await server.read_message()
            if msg.type == ord("D"):
                answer = messages.parse_data_row(msg.body)
            elif msg.type == pg.READY_FOR_QUERY:
                return answer == ("t",)
    except ConnectionClosed as exc:
        raise SessionRejected("08006", "the upstream server closed the connection during the admin login") from exc
