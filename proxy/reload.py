"""SIGHUP and the admin console's RELOAD: the configuration is read again (file, environment and the
flags the proxy was started with, in the usual precedence) and what can change live is applied
without touching a session; an option that needs a restart keeps its running value, and the log (and
RELOAD's notices) say so. Nothing is applied when the new configuration is wrong."""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
from dataclasses import dataclass, replace
from pathlib import Path

from inference import BatchingConfig

from . import config as cfg
from . import logs
from .health import HealthCheck
from .http import HttpApi
from .intercept.functions import Backend
from .intercept.modelpaths import parse_model_roots
from .server import ProxyServer, client_tls_context
from .service import ServiceConnections
from .upstream import Upstream

log = logging.getLogger("azure_local_ai_proxy.reload")


@dataclass(frozen=True)
class ReloadReport:
    changed: tuple[str, ...]  # options whose new values are in effect
    restart: tuple[str, ...]  # options changed in the configuration that keep their running values

    def notices(self) -> list[str]:
        """What RELOAD tells the admin."""
        out = [f"changed: {', '.join(self.changed)}" if self.changed else "no option that can change live changed"]
        out += [f"{name} changed, but takes effect only at a restart: the running value is kept"
                for name in self.restart]
        return out


def plan(running: cfg.Config, loaded: cfg.Config) -> tuple[cfg.Config, ReloadReport]:
    """The configuration to run with after a reload (`loaded`, but for the options that need a
    restart, which keep their `running` values), and what changed."""
    changed: list[str] = []
    restart: list[str] = []
    kept: dict[str, object] = {}
    for option in cfg.OPTIONS:
        old, new = getattr(running, option.name), getattr(loaded, option.name)
        if old == new:
            continue
        if option.live:
            changed.append(option.name)
        else:
            restart.append(option.name)
            kept[option.name] = old
    return replace(loaded, **kept), ReloadReport(tuple(changed), tuple(restart))  # type: ignore[arg-type]


class Reloader:
    """Applies a re-read configuration to the running proxy's parts."""

    def __init__(self, config_file: Path | None, flags: argparse.Namespace | None, server: ProxyServer,
                 backend: Backend, *, service: ServiceConnections | None = None) -> None:
        self.config_file = config_file
        self.flags = flags
        self.server = server
        self.backend = backend
        self.service = service
        self.http: HttpApi | None = None
        self.health: HealthCheck | None = None
        self._lock = asyncio.Lock()

    def on_signal(self) -> None:
        """SIGHUP: reload in the background (failures are logged)."""
        task = asyncio.get_running_loop().create_task(self.reload())
        task.add_done_callback(_logged)

    async def reload(self) -> ReloadReport:
        """Re-read and apply; raises ConfigError (and changes nothing) when the new configuration is wrong."""
        async with self._lock:
            try:
                loaded = await asyncio.to_thread(cfg.load, self.config_file, self.flags)
                config, report = plan(self.server.config, loaded)
                tls = _tls_context(config)
                upstream = self._upstream(config)
                batching = BatchingConfig(config.batch_wait_ms, config.max_batch_tokens, config.max_batch_size)
            except cfg.ConfigError as exc:
                log.error("configuration not reloaded; the running one is kept",
                          extra={"event": "reload_failed", "reason": str(exc)})
                raise
            self.server.reconfigure(config, tls, upstream)
            self.backend.model_roots = parse_model_roots(config.model_roots, config.data_path)
            self.backend.engine.batching = batching
            for part in (self.service, self.health):
                if part is not None:
                    part.upstream = upstream
            if self.http is not None:
                self.http.api_key = config.http_api_key
            for name in report.restart:
                log.warning("option changed, but takes effect only at a restart: the running value is kept",
                            extra={"event": "reload_needs_restart", "option": name})
            # Said at the level in force until now, then the new level and format apply.
            log.info("configuration reloaded", extra={"event": "reload", "changed": ",".join(report.changed) or "-",
                                                      "tls": "re-read" if tls is not None else "off"})
            if "log_level" in report.changed or "log_format" in report.changed:
                logs.configure(config.log_level, config.log_format)
        return report

    def _upstream(self, config: cfg.Config) -> Upstream:
        """The upstream with the new connect_timeout (a connect_timeout in the upstream URL still wins)."""
        running = self.server.settings.upstream
        if config.upstream:
            try:
                return Upstream.from_url(config.upstream, config.connect_timeout)
            except ValueError as exc:
                raise cfg.ConfigError(str(exc)) from exc
        return replace(running, connect_timeout=config.connect_timeout)


def _tls_context(config: cfg.Config) -> ssl.SSLContext | None:
    """The clients' TLS context, with the certificate and key read again (rotated files, same paths)."""
    try:
        return client_tls_context(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise cfg.ConfigError(f"tls_cert / tls_key cannot be loaded: {exc}") from exc


def _logged(task: asyncio.Task[ReloadReport]) -> None:
    if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), cfg.ConfigError):
        log.error("reload failed", exc_info=task.exception(), extra={"event": "reload_failed"})
