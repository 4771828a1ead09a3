"""/healthz: whether the proxy can serve, and if not, why.

Unhealthy when the built-in model's pool of inference servers has no endpoint up without remote_fallback
(an endpoint down or refused, another pool down, is a warning, with a 200), when the engine cannot embed
(its worker thread stopped: the engine restarts it at the next request, but a proxy whose worker keeps
dying must show it), while the built-in model is being built or loaded at start-up or could not be, when
the upstream server does not accept connections, and when the proxy's service login (which writes the
answers of the calls the server evaluates) cannot connect. The upstream is checked with a plain connect
(no session, no authentication), at most once per `UPSTREAM_TTL` seconds whatever the scrape rate, with
concurrent checks sharing one attempt. The service login is logged in with only while it is not known to
connect (it failed, or has not been tried), at most once per `SERVICE_TTL` seconds: a scrape costs the
server no login otherwise, and a password put right on the server shows without a restart."""

from __future__ import annotations

import asyncio
import time

from .intercept.functions import BUILTIN_URI, Backend
from .service import POOLED, ServiceConnections
from .upstream import Upstream

#: How long an upstream check's result is reused.
UPSTREAM_TTL = 2.0
#: The longest an upstream check may take (less if the configured connect_timeout is shorter).
UPSTREAM_TIMEOUT = 2.0
#: How often a service login that does not connect is tried again (each try is a login on the server).
SERVICE_TTL = 10.0


async def upstream_problem(upstream: Upstream, timeout: float = UPSTREAM_TIMEOUT) -> str | None:
    """Why the upstream server cannot be reached (a plain connect, within `timeout` or its
    connect_timeout if shorter), or None: at start-up (cli.py) and for /healthz."""
    try:
        async with asyncio.timeout(min(timeout, upstream.connect_timeout)):
            if upstream.is_unix:
                _, writer = await asyncio.open_unix_connection(upstream.socket_path)
            else:
                _, writer = await asyncio.open_connection(upstream.host, upstream.port)
    except (OSError, TimeoutError) as exc:
        return (f"the upstream server at {upstream.describe()} is unreachable: it does not accept connections: "
                f"{str(exc) or 'timeout'}")
    writer.close()
    return None


class HealthCheck:
    def __init__(self, backend: Backend, upstream: Upstream, service: ServiceConnections | None = None,
                 service_database: str = "postgres") -> None:
        self.backend = backend
        self.upstream = upstream
        self.service = service
        self.service_database = service_database  # where the service login is tried (admin_auth_database)
        self._checked_at = -UPSTREAM_TTL
        self._upstream_problem: str | None = None
        self._checking: asyncio.Task[str | None] | None = None
        self._service_checked_at = -SERVICE_TTL

    async def problems(self) -> list[str]:
        """What keeps the proxy from serving; empty when it can. The service login is looked at only
        with the upstream reachable: else it could only repeat that."""
        problems = self._engine_problems()
        upstream = await self._upstream()
        service = await self._service() if upstream is None else None
        problems += [problem for problem in (upstream, service) if problem is not None]
        return problems

    def _engine_problems(self) -> list[str]:
        backend = self.backend
        engine = backend.engine
        problems = []
        if not engine.alive:
            problems.append(f"the embedding engine's worker thread is not running (it was restarted "
                            f"{engine.stats.restarts} times so far; the next request restarts it)")
        if backend.warming is not None:
            problems.append(f"the built-in model {BUILTIN_URI} is being {backend.warming} (start-up)")
        elif backend.builtin_error is not None and not engine.is_loaded(BUILTIN_URI):  # a later call may load it
            problems.append(f"the built-in model {BUILTIN_URI} could not be loaded: {backend.builtin_error}")
        catalog_problem = getattr(backend.catalog, "problem", None)  # a catalog shared in the server
        if catalog_problem is not None:
            problems.append(f"{catalog_problem} (the last one read serves meanwhile)")
        if backend.remote is not None:
            problems += backend.remote.problems()
        return problems

    def warnings(self) -> list[str]:
        """What is wrong but leaves the proxy serving (200): an inference endpoint down or refused while
        another of its pool is up, a pool down whose texts are computed here or that only a registered
        model uses. Every proxy in front of a pool sees the same endpoint fail: this must not take them
        all out of a load balancer."""
        remote = self.backend.remote
        return remote.warnings() if remote is not None else []

    async def _upstream(self) -> str | None:
        if time.monotonic() - self._checked_at < UPSTREAM_TTL:
            return self._upstream_problem
        if self._checking is None:
            self._checking = asyncio.ensure_future(upstream_problem(self.upstream))
        checking = self._checking
        try:
            problem = await asyncio.shield(checking)
        finally:
            if self._checking is checking and checking.done():
                self._checking = None
        self._upstream_problem, self._checked_at = problem, time.monotonic()
        return problem

    async def _service(self) -> str | None:
        """Why the service login cannot connect, unless it is known to; tried again (once for
        concurrent scrapes) when SERVICE_TTL has passed since the last try."""
        service = self.service
        if service is not None and service.pooled:
            return POOLED
        if service is None or (service.login_tried and service.login_problem is None):
            return None
        if time.monotonic() - self._service_checked_at >= SERVICE_TTL:
            self._service_checked_at = time.monotonic()
            await service.check(self.service_database, UPSTREAM_TIMEOUT)
        if service.login_problem is None:
            return None
        return (f"{service.login_problem}; the calls the server evaluates (generated columns, back-fills) fail "
                f"until it can (service_user, service_password)")
