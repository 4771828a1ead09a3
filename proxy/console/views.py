"""What each SHOW answers: tables of text built from the proxy's state (pure code: the console reads
the state, these functions lay it out). Every column is `text`, as psql and any driver read it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

from catalog.store import ModelRecord
from inference.engine import EngineStats

from ..config import OPTIONS, Config
from ..remote.pool import RemotePool
from ..stats import ProxyStats
from .commands import ACTIONS, SHOW_ITEMS

#: Options whose values SHOW CONFIG hides (it shows whether they are set).
SECRETS = frozenset(option.name for option in OPTIONS if option.secret)

COLUMNS: dict[str, tuple[str, ...]] = {
    "STATS": ("stat", "value"),
    "SESSIONS": ("session", "user", "database", "application_name", "client_addr", "connected_at", "state",
                 "backend_pid"),
    "MODELS": ("model", "builtin", "loaded", "runs_on", "dimensions", "max_seq_length", "model_path", "registered_at"),
    "REMOTE": ("pool", "endpoint", "state", "requests", "texts", "errors", "in_flight", "avg_ms", "problem"),
    "CONFIG": ("option", "value", "default", "changeable"),
    "VERSION": ("version",),
    "HELP": ("command", "description"),
}


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: list[tuple[str | None, ...]]


@dataclass(frozen=True)
class SessionRow:
    """One client session as SHOW SESSIONS lists it."""

    session: str
    user: str
    database: str
    application_name: str
    client_addr: str
    connected_at: str
    state: str
    backend_pid: int | None


def stats_table(stats: ProxyStats, engine: EngineStats, *, sessions_now: int, queue_depth: int, paused: bool,
                uptime_seconds: float, cache_hits: int, cache_misses: int, catalog: str = "local",
                remote: list[tuple[str, object]] | None = None) -> Table:
    """The proxy's counters since it started: those of /metrics, as one row each; and where its catalog
    is (`catalog`: local, server, or why the server's cannot be read)."""
    rows: list[tuple[str, object]] = [
        ("uptime_seconds", round(uptime_seconds)),
        ("paused", "yes" if paused else "no"),
        ("catalog", catalog),
        ("sessions_now", sessions_now),
        ("sessions_total", stats.sessions_total),
        *((f"sessions_refused_by_{by}", count) for (by,), count in sorted(stats.sessions_refused.items())),
        ("upstream_connect_failures", stats.upstream_connect_failures),
        *zip(("bytes_from_clients", "bytes_from_server"), stats.relayed(), strict=True),
        *_labelled("calls", stats.calls),
        *((f"call_avg_ms {name}", f"{1000 * h.sum / max(sum(h.counts), 1):.1f}")
          for name, h in sorted(stats.call_seconds.items())),
        *_labelled("errors", stats.errors),
        ("embedded_texts", engine.sequences),
        ("embedded_tokens", engine.tokens),
        ("model_runs", engine.runs),
        ("engine_queue_depth", queue_depth),
        ("engine_restarts", engine.restarts),
        ("cache_hits", cache_hits),
        ("cache_misses", cache_misses),
        *(remote or ()),
    ]
    return Table(COLUMNS["STATS"], [(name, str(value)) for name, value in rows])


def _labelled(name: str, counts: Mapping[tuple[str, ...], int]) -> Iterable[tuple[str, int]]:
    """`calls create_embeddings sql`: a counter by its labels, in a stable order."""
    for labels, count in sorted(dict(counts).items()):
        yield f"{name} {' '.join(labels)}", count


def sessions_table(sessions: Iterable[SessionRow]) -> Table:
    rows = [tuple(None if value is None else str(value) for value in (getattr(row, f.name) for f in fields(row)))
            for row in sorted(sessions, key=lambda r: (r.connected_at, r.session))]
    return Table(COLUMNS["SESSIONS"], rows)


def models_table(records: Iterable[ModelRecord], loaded: frozenset[str], pools: Mapping[str, str]) -> Table:
    """The registered models; `pools`: the pool of inference servers that computes a model, by URI
    (the others run on this proxy's engine)."""
    rows = [(r.uri, _yes(r.builtin), _yes(r.uri in loaded), f"remote pool {pools[r.uri]}" if r.uri in pools
             else "local", _text(r.dimensions), _text(r.max_seq_length), r.model_path, r.created_at) for r in records]
    return Table(COLUMNS["MODELS"], rows)


def config_table(config: Config) -> Table:
    """Every option as it is in effect now, its default, and whether a reload changes it (`yes`) or
    only a restart (`no`)."""
    rows = []
    for option in OPTIONS:
        value = getattr(config, option.name)
        if option.name in SECRETS:
            shown = "(set)" if value else ""
            default = ""
        else:
            shown, default = _text(value), _text(option.default)
        rows.append((option.name, shown, default, _yes(option.live)))
    return Table(COLUMNS["CONFIG"], rows)


def remote_table(pools: Mapping[str, RemotePool]) -> Table:
    """Each inference server of each pool: its state, what it did since start, and why it is down or
    refused."""
    rows: list[tuple[str | None, ...]] = []
    for name, pool in sorted(pools.items()):
        for e in pool.endpoints:
            s = e.stats
            errors = ", ".join(f"{cause} {count}" for cause, count in sorted(s.errors.items()) if count)
            average = 1000 * s.seconds.sum / s.requests if s.requests else 0.0
            rows.append((name, e.label, e.state, str(s.requests), str(s.texts), errors or "0", str(e.in_flight),
                         f"{average:.1f}", e.problem))
    return Table(COLUMNS["REMOTE"], rows)


def remote_stats(pools: Mapping[str, RemotePool], local_texts: Mapping[str, int]) -> list[tuple[str, object]]:
    """SHOW STATS's rows of the pools: totals over their endpoints."""
    endpoints = [e for pool in pools.values() for e in pool.endpoints]
    errors: dict[str, int] = {}
    for e in endpoints:
        for cause, count in e.stats.errors.items():
            errors[cause] = errors.get(cause, 0) + count
    return [
        ("remote_requests", sum(e.stats.requests for e in endpoints)),
        ("remote_texts", sum(e.stats.texts for e in endpoints)),
        *((f"remote_errors {cause}", count) for cause, count in sorted(errors.items())),
        ("remote_endpoints_up", sum(e.state == "up" for e in endpoints)),
        ("remote_endpoints_not_up", sum(e.state != "up" for e in endpoints)),
        ("remote_local_texts", sum(local_texts.values())),
    ]


def version_table(version: str) -> Table:
    return Table(COLUMNS["VERSION"], [(f"azure-local-ai-proxy {version}",)])


def help_table() -> Table:
    shows = [(f"SHOW {item}", _SHOW_HELP[item]) for item in SHOW_ITEMS]
    return Table(COLUMNS["HELP"], [*shows, *ACTIONS.items()])


_SHOW_HELP = {
    "STATS": "counters since start: sessions, bytes, calls, errors, engine",
    "SESSIONS": "the client sessions relayed now",
    "CLIENTS": "the same as SHOW SESSIONS",
    "MODELS": "the registered models, and whether each is loaded",
    "REMOTE": "each inference server of remote_pools: state, requests, texts, errors, in flight, why it is down",
    "CONFIG": "every option in effect, its default, and whether a reload changes it",
    "VERSION": "the proxy's version",
    "HELP": "this list",
}


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
