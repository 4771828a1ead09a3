"""The `azure-local-ai-proxy` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from collections.abc import Coroutine
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from psycopg.conninfo import make_conninfo

from catalog import Catalog, CatalogError
from catalog.server import SCHEMA as CATALOG_SCHEMA
from catalog.server import ServerCatalog
from inference import BatchingConfig, EmbeddingEngine
from inference import cli as inference_cli
from inference.progress import ProgressPrinter

from . import config as cfg
from . import logs
from .console.entry import AdminConsole
from .console.login import is_loopback
from .health import HealthCheck, upstream_problem
from .hooks import SessionInfo
from .http import HttpApi, HttpListener
from .intercept.embeddingtables import EmbeddingTables
from .intercept.functions import BUILTIN_URI, Backend
from .intercept.hook import InterceptHook
from .intercept.modelpaths import parse_model_roots
from .intercept.servercalls import ServerCalls
from .metrics import Metrics
from .reload import Reloader
from .remote.models import RemoteModels
from .remote.spec import parse_pools
from .server import ProxyServer
from .service import ServiceConnections
from .stats import STATS
from .upstream import Upstream

if TYPE_CHECKING:
    from .embedded import EmbeddedServer

log = logging.getLogger("azure_local_ai_proxy")


def _version() -> str:
    try:
        return version("azure-local-ai-proxy")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=None, help="TOML configuration file (see config.example.toml)")
    parser = argparse.ArgumentParser(
        prog="azure-local-ai-proxy",
        description="A PostgreSQL wire-protocol proxy that answers azure_local_ai.* calls with local "
        "embeddings and passes everything else to the real server.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve", parents=[common], help="run the proxy",
        description="Run the proxy. With no upstream, an embedded PostgreSQL with pgvector is started in the "
        "data directory. Every option can also be set in the config file or the environment. SIGHUP re-reads "
        "them and applies the options marked 'a reload applies it'; the others need a restart.",
    )
    cfg.add_flags(serve)
    serve.set_defaults(func=_serve)
    data_dir_parent = argparse.ArgumentParser(add_help=False, parents=[common])
    data_dir_parent.add_argument("--data-dir", dest="data_dir", default=None, metavar="DATA_DIR",
                                 help=f"data directory (env {cfg.ENV_PREFIX}DATA_DIR)")
    inference_cli.register(sub, data_dir_parent)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = cfg.load(args.config, args)
    except cfg.ConfigError as exc:
        print(f"azure-local-ai-proxy: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level, config.log_format)
    if args.command == "serve":  # its flags stay as given: a reload reads them again
        return int(args.func(args, config))
    args.data_dir = config.data_path
    return int(args.func(args))


#: How long a thread holding the GIL (engine, parsing a long statement) may keep the event loop waiting
#: for it; CPython's default is 5 ms, most of the 10 ms a session's SELECT 1 may take under load.
GIL_SWITCH_INTERVAL = 0.001


def _serve(args: argparse.Namespace, config: cfg.Config) -> int:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        return asyncio.run(_serve_async(config, args))
    return uvloop.run(_serve_async(config, args))


async def _serve_async(config: cfg.Config, args: argparse.Namespace) -> int:
    embedded = None
    if config.upstream:
        try:
            upstream = Upstream.from_url(config.upstream, config.connect_timeout)
            if config.service_upstream:
                Upstream.from_url(config.service_upstream, config.connect_timeout)
        except ValueError as exc:
            print(f"azure-local-ai-proxy: {exc}", file=sys.stderr)
            return 2
    else:
        refusal = _exposed_embedded(config)
        if refusal is not None:
            print(refusal, file=sys.stderr)
            return 2
        from .embedded import EmbeddedError, start_embedded

        config.data_path.mkdir(parents=True, exist_ok=True)
        try:
            embedded = await asyncio.to_thread(start_embedded, config.data_path, config.connect_timeout,
                                               config.embedded_password)
        except EmbeddedError as exc:
            print(f"azure-local-ai-proxy: {exc}", file=sys.stderr)
            return 1
        upstream = embedded.upstream
    batching = BatchingConfig(config.batch_wait_ms, config.max_batch_tokens, config.max_batch_size)
    service = _service_connections(config, upstream, embedded)
    shared = await asyncio.to_thread(_server_catalog, config, service) if (
        embedded is None and config.catalog == "server") else None
    backend = await asyncio.to_thread(
        Backend.open, config.data_path, parse_model_roots(config.model_roots, config.data_path),
        EmbeddingEngine(batching=batching, builds=config.data_path / "builds"), config.model_variant,
        config.cache_mb << 20, shared,
        RemoteModels(parse_pools(config.remote_pools), config.remote_builtin, config.remote_fallback)
        if config.remote_pools else None,
    )
    backend.start_remote()
    if shared is not None:
        backend.follow_catalog(asyncio.get_running_loop())
        _in_background(shared.listen())
    _in_background(_check_at_start(upstream, service, _service_database(config)))
    tables = EmbeddingTables(service) if service is not None else None
    server = ProxyServer(config, upstream, lambda info: _hook(info, backend, service, tables))
    reloader = Reloader(args.config, args, server, backend, service=service)
    server.settings = replace(server.settings, console=AdminConsole(server, backend, reloader.reload, _version()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_stop_signal, stop, server)
    loop.add_signal_handler(signal.SIGHUP, reloader.on_signal)
    try:
        await server.start()
    except OSError as exc:
        print(f"azure-local-ai-proxy: cannot listen on {config.listen}: {exc}", file=sys.stderr)
        return 1
    code = 0
    try:
        http = await _start_http(config, server, backend, upstream, service)
    except OSError as exc:
        print(f"azure-local-ai-proxy: cannot listen on {config.http_listen}: {exc}", file=sys.stderr)
        http, code = None, 1
        stop.set()  # shut down as on SIGTERM: the embedded server and the engine are stopped too
    if http is not None:
        reloader.http, reloader.health = http.api, http.api.health
    ready = asyncio.create_task(_announce(config, server, backend, embedded is not None))
    await stop.wait()
    ready.cancel()
    if http is not None:
        await http.close()
    await server.shutdown(server.config.shutdown_grace)  # as the last reload left it
    if embedded is not None:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(embedded.stop)
    if backend.remote is not None:
        await backend.remote.close()
    await backend.engine.close()
    if shared is not None:
        await asyncio.to_thread(shared.close)
    if service is not None:
        await service.close()
    log.info("stopped", extra={"event": "stopped"})
    return code


def _on_stop_signal(stop: asyncio.Event, server: ProxyServer) -> None:
    """The first SIGTERM or SIGINT starts the shutdown; another one hurries it (PostgreSQL's fast
    shutdown after its smart one): the sessions still given the grace end now."""
    if stop.is_set():
        server.hurry()
    else:
        stop.set()


async def _start_http(
    config: cfg.Config, server: ProxyServer, backend: Backend, upstream: Upstream, service: ServiceConnections | None
) -> HttpListener | None:
    """The HTTP listener (metrics, health, embeddings API), if one is configured."""
    address = config.http_address
    if address is None:
        return None
    metrics = Metrics(STATS, backend, lambda: len(server.registry.live))
    health = HealthCheck(backend, upstream, service, _service_database(config))
    api = HttpApi(backend, metrics, health, api_key=config.http_api_key, max_body=config.http_max_body)
    listener = HttpListener(api, *address)
    await listener.start()
    return listener


def _exposed_embedded(config: cfg.Config) -> str | None:
    """Why the proxy must not start: the embedded server trusts every login, and a listener beyond
    loopback would hand its superuser to anyone who reaches the port. None: it may start (with
    embedded_trust, the log says that anyone may log in)."""
    if config.embedded_password or is_loopback(config.listen_host):
        return None
    if config.embedded_trust:
        log.warning("embedded_trust: the embedded server accepts every login without a password, and the proxy "
                    "listens beyond loopback", extra={"event": "embedded_trust", "listen": config.listen})
        return None
    return (
        f"azure-local-ai-proxy: refusing to start: listen = {config.listen} is not a loopback address, and the "
        f"embedded PostgreSQL has no password, so anyone who can reach that port would log in as its superuser "
        f"postgres. Set embedded_password (preferably as the environment variable "
        f"{cfg.ENV_PREFIX}EMBEDDED_PASSWORD; the flag --embedded-password shows in ps) to require a password for "
        f"every login, or embedded_trust = true (--embedded-trust true) to accept every connection without one "
        f"anyway; or listen on 127.0.0.1, or set upstream to your own server."
    )


def _service_connections(config: cfg.Config, upstream: Upstream,
                         embedded: EmbeddedServer | None) -> ServiceConnections | None:
    """The proxy's own login to the server, for the calls the server evaluates; None: those are off.
    The embedded server's is its plain service role, unless service_user says otherwise."""
    if not config.server_calls:
        return None
    if config.service_user:
        target = Upstream.from_url(config.service_upstream, config.connect_timeout) if (
            config.service_upstream) else upstream
        return ServiceConnections(target, config.service_user, config.service_password)
    if embedded is None:
        return None
    return ServiceConnections(upstream, embedded.service_user, embedded.service_password)


#: Work started at start-up that nobody awaits, held here until it ends (the loop keeps only weak references).
_BACKGROUND: set[asyncio.Task[None]] = set()


def _in_background(work: Coroutine[object, object, None]) -> None:
    """Run `work` beside the proxy, without holding up what follows (its outcome goes to the log)."""
    task = asyncio.get_running_loop().create_task(work)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def _server_catalog(config: cfg.Config, service: ServiceConnections | None) -> ServerCatalog | None:
    """The catalog of models and settings in the server, shared by every proxy in front of it (through
    the service login); None, with a warning saying why, where the data directory's own is used."""
    if service is None:
        return None
    target = service.upstream
    conninfo = make_conninfo(host=target.host, port=target.port, user=service.user,
                             password=service.password or None, dbname=_service_database(config),
                             sslmode=target.sslmode, sslrootcert=target.sslrootcert or None,
                             connect_timeout=max(1, round(target.connect_timeout)),
                             # A connection gone quiet (a server or a network lost) is noticed within a minute.
                             keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3)
    local = Catalog(config.data_path)
    try:
        return ServerCatalog(conninfo, local)
    except CatalogError as exc:
        log.warning("the catalog of models and settings stays in the data directory: the service login cannot keep "
                    f"it in the server (schema {CATALOG_SCHEMA} of database {_service_database(config)!r}); let it "
                    "create that schema, or create it and give it to the service login",
                    extra={"event": "catalog_local", "reason": str(exc)})
        return None
    finally:
        local.close()


def _service_database(config: cfg.Config) -> str:
    """Where the service login is tried, at start-up and by /healthz: the database admin logins are
    authenticated against, which every login may reach as a rule."""
    return config.admin_auth_database or "postgres"


async def _check_at_start(upstream: Upstream, service: ServiceConnections | None, database: str) -> None:
    """Say in the log at once what would otherwise show only in each client's error: an upstream server
    out of reach (the proxy starts anyway: the server may come later), or a service login the server
    refuses (the calls the server evaluates would fail). Runs beside start-up, never holding it up."""
    unreachable = await upstream_problem(upstream, upstream.connect_timeout)
    if unreachable is not None:
        log.warning("the upstream server is unreachable; the proxy starts anyway, and sessions fail until it "
                    "is reachable", extra={"event": "upstream_unreachable", "upstream": upstream.describe(),
                                           "reason": unreachable})
        return
    if service is None:
        return
    problem = await service.check(database)
    if problem is not None:
        log.warning("the service login cannot connect; the calls the server evaluates (generated columns, "
                    "back-fills) fail until it can: set service_user and service_password (or ~/.pgpass)",
                    extra={"event": "service_login_failed", "user": service.user, "reason": problem})
    else:
        log.info("the service login connects", extra={"event": "service_login_ok", "user": service.user,
                                                      "database": database})


def _hook(info: SessionInfo, backend: Backend, service: ServiceConnections | None,
          tables: EmbeddingTables | None) -> InterceptHook:
    server_calls = None
    if service is not None and info.server_key is not None:
        key = info.server_key
        server_calls = ServerCalls(info.user, info.database, key[0], backend, service,
                                   lambda: info.upstream.send_cancel(*key), tables)
    return InterceptHook(info, backend, server_calls)


async def _announce(config: cfg.Config, server: ProxyServer, backend: Backend, embedded: bool) -> None:
    """Once the built-in model is ready (see _prepare_builtin), say how to connect."""
    if config.preload_model:
        await _prepare_builtin(backend)
    # What start-up made (modules, the parser, the model's tokenizer) lives as long as the process: keep it
    # out of the cyclic collector's full passes, which otherwise walk all of it while every session waits.
    gc.freeze()
    if embedded:
        password = "\n  (it asks for postgres's password: embedded_password)" if config.embedded_password else ""
        print(
            f"Embedded PostgreSQL is running. Connect through the proxy with:\n"
            f"  psql 'postgresql://postgres@{_url_host(config.listen_host)}:{server.port}/postgres'{password}",
            file=sys.stderr,
            flush=True,
        )


async def _prepare_builtin(backend: Backend) -> None:
    """Make the built-in model ready before announcing the proxy (a first run builds it: seconds),
    with progress on a terminal. Sessions are served meanwhile; their calls wait for the model."""
    started = time.monotonic()
    building = backend.warming_needs_build()
    if building:
        log.info("building the built-in model (first run only)", extra={"event": "model_build", "model": BUILTIN_URI})
    progress = ProgressPrinter(f"building {BUILTIN_URI}") if building and sys.stderr.isatty() else None
    try:
        await backend.prepare_builtin(progress)
    except Exception:
        log.exception("the built-in model could not be prepared; its calls will fail",
                      extra={"event": "model_error", "model": BUILTIN_URI})
        return
    log.info("model ready", extra={"event": "model_ready", "model": BUILTIN_URI,
                                   "seconds": round(time.monotonic() - started, 2), "built": building})


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":
    sys.exit(main())
