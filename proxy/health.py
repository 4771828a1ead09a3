"""/healthz: whether the proxy can serve, and if not, why.

Unhealthy when the engine cannot embed (its worker thread stopped: the engine restarts it at the next
request, but a proxy whose worker keeps dying must show it), while the built-in model is being built
or loaded at start-up or could not be, and when the upstream server does not accept connections. The
upstream is checked with a plain connect (no session, no authentication), at most once per
`UPSTREAM_TTL` seconds whatever the scrape rate, with concurrent checks sharing one attempt."""

from __future__ import annotations

import asyncio
import time

from .intercept.functions import BUILTIN_URI, Backend
from .upstream import Upstream

#: How long an upstream check's result is reused.
UPSTREAM_TTL = 2.0
#: The longest an upstream check may take (less if the configured connect_timeout is shorter).
UPSTREAM_TIMEOUT = 2.0


class HealthCheck:
    def __init__(self, backend: Backend, upstream: Upstream) -> None:
        self.backend = backend
        self.upstream = upstream
        self._checked_at = -UPSTREAM_TTL
        self._upstream_problem: str | None = None
        self._checking: asyncio.Task[str | None] | None = None

    async def problems(self) -> list[str]:
        """What keeps the proxy from serving; empty when it can."""
        problems = self._engine_problems()
        upstream = await self._upstream()
        if upstream is not None:
            problems.append(upstream)
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
        return problems

    async def _upstream(self) -> str | None:
        if time.monotonic() - self._checked_at < UPSTREAM_TTL:
            return self._upstream_problem
        if self._checking is None:
            self._checking = asyncio.ensure_future(self._connect())
        checking = self._checking
        try:
            problem = await asyncio.shield(checking)
        finally:
            if self._checking is checking and checking.done():
                self._checking = None
        self._upstream_problem, self._checked_at = problem, time.monotonic()
        return problem

    async def _connect(self) -> str | None:
        upstream = self.upstream
        try:
            async with asyncio.timeout(min(UPSTREAM_TIMEOUT, upstream.connect_timeout)):
                if upstream.is_unix:
                    _, writer = await asyncio.open_unix_connection(upstream.socket_path)
                else:
                    _, writer = await asyncio.open_connection(upstream.host, upstream.port)
        except (OSError, TimeoutError) as exc:
            return f"the upstream server at {upstream.describe()} does not accept connections: {exc or 'timeout'}"
        writer.close()
        return None
