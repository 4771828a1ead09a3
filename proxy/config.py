"""The proxy's options: one table drives the TOML file, the environment variables and the flags, so
that the three can never disagree. Precedence: flag > environment > file > default."""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .remote.spec import PoolSpecError, parse_pools

ENV_PREFIX = "AZURE_LOCAL_AI_PROXY_"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Option:
    """One setting: where it lives in the TOML file, its type, its default and what it means."""

    section: str
    name: str
    type: type
    default: Any
    help: str
    #: Whether a reload (SIGHUP, the admin console's RELOAD) applies a new value; others need a restart.
    live: bool = False
    #: A password or key: SHOW CONFIG says only whether it is set, and no log line carries it.
    secret: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


#: The data directory of a proxy run as root without XDG_DATA_HOME: a system service's place, which the
#: embedded server's OS user can enter (root's home is private to root).
ROOT_DATA_DIR = "/var/lib/azure-local-ai-proxy"


def _default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME")
    if base is None and os.geteuid() == 0:
        return ROOT_DATA_DIR
    return str(Path(base or Path.home() / ".local" / "share") / "azure-local-ai-proxy")


OPTIONS: tuple[Option, ...] = (
    Option("proxy", "listen", str, "127.0.0.1:6432", "address the proxy accepts clients on, HOST:PORT"),
    Option(
        "proxy",
        "upstream",
        str,
        "",
        "the real server, as a postgresql:// URL (host, port, sslmode, sslrootcert, connect_timeout are "
        "used; user and database come from each client); empty starts an embedded PostgreSQL in the data "
        "directory",
    ),
    Option("proxy", "data_dir", str, _default_data_dir(), "directory for the catalog, models and embedded server"),
    Option("proxy", "embedded_password", str, "",
           "the password of the embedded server's superuser postgres: set, every login to the embedded server "
           "needs its password (scram-sha-256); empty, all are trusted, which the proxy allows only on a "
           "loopback listen address or with embedded_trust. Prefer the environment variable or the file: a "
           "flag shows in ps", secret=True),
    Option("proxy", "embedded_trust", bool, False,
           "accept every connection to the embedded server without a password, even on a non-loopback listener"),
    Option(
        "proxy",
        "model_roots",
        str,
        "",
        "directories model_register may read models from, separated by ':'; empty means DATA_DIR/models",
        live=True,
    ),
    Option("proxy", "tls_cert", str, "", "PEM certificate offered to clients that ask for TLS (with tls_key)",
           live=True),
    Option("proxy", "tls_key", str, "", "PEM private key of tls_cert", live=True),
    Option("proxy", "connect_timeout", float, 10.0, "seconds to wait for the upstream server to accept",
           live=True),
    Option("proxy", "startup_timeout", float, 60.0, "seconds a client has to finish start-up and authentication",
           live=True),
    Option("proxy", "idle_timeout", float, 0.0, "close sessions idle outside a query this many seconds; 0 never",
           live=True),
    Option("proxy", "max_message_size", int, 0x3FFFFFFF, "largest client message accepted, in bytes",
           live=True),
    Option("proxy", "relay_thread", bool, True,
           "move the bytes of sessions the proxy has nothing to do for in a native thread; false: all in Python"),
    Option("proxy", "shutdown_grace", float, 30.0,
           "on SIGTERM or SIGINT, seconds sessions in a query or a transaction block get to finish before they "
           "are closed (idle ones are closed at once; a second signal closes all)", live=True),
    Option("proxy", "log_level", str, "info", "debug, info, warning or error", live=True),
    Option("proxy", "log_format", str, "text", "text (key=value) or json", live=True),
    Option("engine", "batch_wait_ms", float, 2.0,
           "how long a queued input waits for others to share its model run, in milliseconds; waited only "
           "while callers keep each other company (a lone call after a lone call runs at once)", live=True),
    Option("engine", "max_batch_tokens", int, 4096, "padded tokens per model run (bounds the memory of a run)",
           live=True),
    Option("engine", "max_batch_size", int, 128, "inputs per model run", live=True),
    Option("engine", "model_variant", str, "q4",
           "build of the built-in model: q4 (4-bit, default), q4i8, fp32, or official (after `models fetch`)"),
    Option("engine", "preload_model", bool, True,
           "build (on the first run) and load the built-in model at start-up; false: on its first use"),
    Option("engine", "cache_mb", int, 64,
           "memory for embeddings computed lately, by model and text, shared by all sessions (repeated texts "
           "and the texts a back-fill is about to ask for are found there); 0 turns the cache off"),
    Option("proxy", "server_calls", bool, True,
           "answer the calls the server evaluates (generated columns, back-fills, triggers) after CREATE "
           "EXTENSION azure_local_ai: each transaction that asks gets a mailbox the proxy writes through its "
           "service login"),
    Option("proxy", "service_user", str, "",
           "the login of the proxy's own connections to the server, which write the answers (like PgBouncer's "
           "auth_user); empty: azure_local_ai_service (a plain role the proxy makes, its password in "
           "DATA_DIR/service-password) with the embedded server, and no server calls with an external one"),
    Option("proxy", "service_password", str, "",
           "its password, if the server asks for one (or use PGPASSWORD / ~/.pgpass)", secret=True),
    Option("proxy", "catalog", str, "server",
           "where registered models and settings are kept: server (in the upstream server, schema "
           "azure_local_ai_catalog of the service login's database, shared by every proxy in front of it) or "
           "local (data_dir/catalog.sqlite3, this proxy's own; always so with the embedded server)"),
    Option("proxy", "service_upstream", str, "",
           "where the service login connects, a postgresql:// URL as upstream is; empty: upstream. Behind a "
           "connection pooler in transaction mode, the server itself (or a session-mode pool): the service "
           "connections hold advisory locks from one transaction to the next"),
    Option("remote", "remote_pools", str, "",
           "pools of OpenAI-compatible embeddings servers (POST URL/embeddings), separated by ';': NAME = "
           "urls=URL[,URL...] model=NAME [prefixes=none|e5] [max_batch=64] [max_in_flight=4] [timeout=30] "
           "[tls_verify=true] [ca_file=PATH] [api_key_env=VAR | api_key_file=PATH] [encoding=base64|float] "
           "[dimensions=N] [max_tokens=512]; a model registered with model_path 'remote:NAME' runs there"),
    Option("remote", "remote_builtin", str, "",
           "the pool (of remote_pools) that computes the built-in model instead of this proxy's CPU; its "
           "endpoints are checked against the local model before they get texts; empty: the local engine"),
    Option("remote", "remote_fallback", bool, False,
           "compute the built-in model here when no endpoint of remote_builtin can answer (off: the call "
           "fails with 58030; on, the vectors come from another build of the model than the pool's)"),
    Option("http", "http_listen", str, "",
           "address of the HTTP listener (/metrics, /healthz, /v1/embeddings, /v1/models), HOST:PORT; a bare "
           ":PORT is 127.0.0.1; empty: no HTTP listener"),
    Option("http", "http_api_key", str, "",
           "the key clients of /v1/embeddings and /v1/models must send (Authorization: Bearer KEY); empty: none. "
           "Prefer the environment variable or the file: a flag shows in ps", live=True, secret=True),
    Option("http", "http_max_body", int, 16 << 20, "largest HTTP request body accepted, in bytes; larger gets 413"),
    Option("admin", "admin_database", str, "azure_local_ai_proxy",
           "the database name that reaches the proxy's admin console (SHOW STATS, SHOW SESSIONS, RELOAD, PAUSE, "
           "...) rather than the server; empty: no console", live=True),
    Option("admin", "admin_users", str, "",
           "logins allowed in the admin console, separated by ','; the server checks each one's password as for "
           "any session. Empty: the server's superusers when the proxy listens on loopback, nobody otherwise",
           live=True),
    Option("admin", "admin_auth_database", str, "postgres",
           "the server database an admin login is authenticated against (the connection closes at once)", live=True),
)


@dataclass(frozen=True)
class Config:
    listen: str
    upstream: str
    data_dir: str
    embedded_password: str
    embedded_trust: bool
    model_roots: str
    tls_cert: str
    tls_key: str
    connect_timeout: float
    startup_timeout: float
    idle_timeout: float
    max_message_size: int
    relay_thread: bool
    shutdown_grace: float
    log_level: str
    log_format: str
    batch_wait_ms: float
    max_batch_tokens: int
    max_batch_size: int
    model_variant: str
    preload_model: bool
    cache_mb: int
    server_calls: bool
    service_user: str
    service_password: str
    catalog: str
    service_upstream: str
    remote_pools: str
    remote_builtin: str
    remote_fallback: bool
    http_listen: str
    http_api_key: str
    http_max_body: int
    admin_database: str
    admin_users: str
    admin_auth_database: str

    @property
    def listen_host(self) -> str:
        return split_host_port(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return split_host_port(self.listen)[1]

    @property
    def http_address(self) -> tuple[str, int] | None:
        """(host, port) of the HTTP listener, or None when it is off."""
        return split_host_port(self.http_listen) if self.http_listen else None

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def admin_logins(self) -> frozenset[str]:
        return frozenset(name.strip() for name in self.admin_users.split(",") if name.strip())


assert [f.name for f in fields(Config)] == [o.name for o in OPTIONS], "Config and OPTIONS must match"


class ConfigError(Exception):
    """A setting is missing, unknown or of the wrong type."""


def split_host_port(value: str) -> tuple[str, int]:
    """'127.0.0.1:6432' or '[::1]:6432' -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"listen address {value!r} must be HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option; unset flags stay None so that lower layers show through."""
    for option in OPTIONS:
        live = "; a reload applies it" if option.live else ""
        kwargs: dict[str, Any] = {"default": None, "help": f"{option.help} (env {option.env}{live})"}
        kwargs["type"] = option.type if option.type is not bool else _parse_bool
        parser.add_argument(option.flag, dest=option.name, metavar=option.name.upper(), **kwargs)


def load(config_file: Path | None, flags: argparse.Namespace | None = None) -> Config:
    """Merge defaults, the TOML file, the environment and the flags."""
    values = {o.name: o.default for o in OPTIONS}
    if config_file is not None:
        values.update(_read_file(config_file))
    for option in OPTIONS:
        if option.env in os.environ:
            values[option.name] = _convert(option, os.environ[option.env], option.env)
        flag_value = getattr(flags, option.name, None) if flags is not None else None
        if flag_value is not None:
            values[option.name] = flag_value
    config = Config(**values)
    split_host_port(config.listen)
    if config.http_listen:
        split_host_port(config.http_listen)
    if config.http_max_body < 1:
        raise ConfigError("http_max_body must be positive")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("tls_cert and tls_key must be given together")
    try:
        pools = parse_pools(config.remote_pools)
    except PoolSpecError as exc:
        raise ConfigError(str(exc)) from None
    if config.remote_builtin and config.remote_builtin not in pools:
        raise ConfigError(f"remote_builtin names pool {config.remote_builtin!r}, which remote_pools does not have")
    if config.catalog not in ("server", "local"):
        raise ConfigError("catalog must be 'server' or 'local'")
    if config.log_format not in ("text", "json"):
        raise ConfigError("log_format must be 'text' or 'json'")
    if config.cache_mb < 0:
        raise ConfigError("cache_mb must be 0 (off) or more")
    if config.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
    if config.batch_wait_ms < 0 or config.max_batch_tokens < 1 or config.max_batch_size < 1:
        raise ConfigError("batch_wait_ms must not be negative; max_batch_tokens and max_batch_size must be positive")
    return config


def _read_file(path: Path) -> dict[str, Any]:
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    known = {(o.section, o.name): o for o in OPTIONS}
    sections = {o.section for o in OPTIONS}
    out: dict[str, Any] = {}
    for section, table in document.items():
        if section not in sections or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown section [{section}]")
        for name, value in table.items():
            option = known.get((section, name))
            if option is None:
                raise ConfigError(f"{path}: unknown option {name!r} in [{section}]")
            out[name] = _convert(option, value, f"{path}: {section}.{name}")
    return out


def _convert(option: Option, value: Any, where: str) -> Any:
    try:
        if option.type is bool:
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if option.type is float and isinstance(value, int | float | str):
            return float(value)
        if option.type is int and isinstance(value, int | str) and not isinstance(value, bool):
            return int(value)
        if option.type is str and isinstance(value, str):
            return value
    except ValueError:
        pass
    raise ConfigError(f"{where}: expected {option.type.__name__}, got {value!r}")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")
