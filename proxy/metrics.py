"""/metrics: the proxy's counters (stats.py), its sessions and its engine in Prometheus's text format.

A custom collector turns what the proxy counts anyway into metric families when a scrape comes, so
nothing on the relay's path touches prometheus_client (see stats.py); prometheus_client does the
exposition."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from . import fastpath
from .intercept.functions import BUILTIN_URI, Backend
from .remote.endpoint import CAUSES, ENDPOINT_STATES
from .remote.models import RemoteModels
from .stats import Histogram, ProxyStats

PREFIX = "azure_local_ai_proxy_"
#: Upper bounds of the engine's batch-size histogram (rows per model run).
BATCH_ROWS_BUCKETS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)


@dataclass(frozen=True)
class ModelState:
    uri: str
    loaded: bool


class ProxyCollector(Collector):
    """Reads the counters as they are at scrape time; `models` is refreshed by `Metrics.render`."""

    def __init__(self, stats: ProxyStats, backend: Backend, live_sessions: Callable[[], int]) -> None:
        self.stats = stats
        self.backend = backend
        self.live_sessions = live_sessions
        self.models: list[ModelState] = []

    def collect(self) -> Iterator[Metric]:
        yield from self._sessions()
        yield from self._calls()
        yield from self._engine()
        yield from self._models()
        if self.backend.remote is not None:
            yield from _remote(self.backend.remote)

    def _sessions(self) -> Iterator[Metric]:
        s = self.stats
        yield _gauge("sessions", "Client sessions established now", self.live_sessions())
        yield _counter("sessions", "Client sessions established since start", s.sessions_total)
        yield _counters("sessions_refused", "Sessions refused at start-up, by who refused them",
                        ["by"], s.sessions_refused)
        yield _counter("upstream_connect_failures", "Connections to the upstream server that failed",
                       s.upstream_connect_failures)
        relayed = CounterMetricFamily(PREFIX + "relayed_bytes", "Bytes relayed by established sessions, by direction",
                                      labels=["direction"])
        to_server, to_client = s.relayed()
        relayed.add_metric(["client_to_server"], to_server)
        relayed.add_metric(["server_to_client"], to_client)
        yield relayed
        yield _gauge("relay_thread_sessions", "Sessions whose bytes the relay thread moves now (resting sessions "
                     "on plain connections)", fastpath.sessions_on_thread())

    def _calls(self) -> Iterator[Metric]:
        s = self.stats
        yield _counters("calls", "azure_local_ai function calls answered, by function and origin "
                        "(sql: a client's statement, server: evaluated by the server, "
                        "ahead: kept ahead for the server, http: the embeddings API)",
                        ["function", "origin"], s.calls)
        yield _histograms("call_duration_seconds", "Time to answer an azure_local_ai call, by function",
                          "function", s.call_seconds)
        yield _counters("errors", "Errors the proxy answered calls with, by SQLSTATE and origin",
                        ["sqlstate", "origin"], s.errors)
        yield _counters("http_requests", "HTTP requests, by path and status code",
                        ["path", "code"], s.http_requests)
        yield _histograms("http_request_duration_seconds", "Time to answer an HTTP request, by path",
                          "path", s.http_seconds)

    def _engine(self) -> Iterator[Metric]:
        engine = self.backend.engine
        es = engine.stats
        yield _counter("embedded_texts", "Texts the engine embedded", es.sequences)
        yield _counter("embedded_tokens", "Tokens the engine embedded (before padding)", es.tokens)
        yield _counter("embedded_padded_tokens", "Tokens the engine's model runs computed, padding included",
                       es.padded_tokens)
        yield _counter("engine_dropped_inputs", "Queued inputs dropped because their caller gave up", es.dropped)
        yield _counter("engine_restarts", "Times the engine's worker thread had stopped and was restarted", es.restarts)
        yield _gauge("engine_queue_depth", "Inputs tokenised and waiting for a model run", engine.queue_depth)
        yield _gauge("engine_up", "1 while the engine's worker thread runs", int(engine.alive))
        yield _batch_rows(dict(es.run_rows))  # a copy: the engine's thread adds sizes as it runs

    def _models(self) -> Iterator[Metric]:
        loaded = GaugeMetricFamily(PREFIX + "model_loaded", "1 if the registered model is loaded in the engine",
                                   labels=["model"])
        for model in self.models:
            loaded.add_metric([model.uri], int(model.loaded))
        yield loaded
        state = GaugeMetricFamily(PREFIX + "builtin_model_state", f"State of the built-in model {BUILTIN_URI} "
                                  "(1 for the current state)", labels=["state"])
        current = _builtin_state(self.backend)
        for name in ("building", "loading", "ready", "not_loaded", "failed"):
            state.add_metric([name], int(name == current))
        yield state


def _builtin_state(backend: Backend) -> str:
    if backend.warming is not None:
        return "building" if backend.warming == "built" else "loading"
    if backend.engine.is_loaded(BUILTIN_URI):
        return "ready"
    return "failed" if backend.builtin_error is not None else "not_loaded"


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, value=value)


def _counters(name: str, documentation: str, labels: list[str], values: Mapping[tuple[str, ...], int]) -> Metric:
    family = CounterMetricFamily(PREFIX + name, documentation, labels=labels)
    for key, value in sorted(dict(values).items()):
        family.add_metric(list(key), value)
    return family


def _histograms(name: str, documentation: str, label: str, values: Mapping[str, Histogram]) -> Metric:
    family = HistogramMetricFamily(PREFIX + name, documentation, labels=[label])
    for key, histogram in sorted(dict(values).items()):
        family.add_metric([key], histogram.cumulative(), histogram.sum)
    return family


def _remote(remote: RemoteModels) -> Iterator[Metric]:
    """Each endpoint of each pool of inference servers, labelled by pool and endpoint (its URL)."""
    endpoints = [(name, e) for name, pool in sorted(remote.pools.items()) for e in pool.endpoints]
    labels = ["pool", "endpoint"]
    families = {
        "requests": CounterMetricFamily(PREFIX + "remote_requests", "Requests sent to an inference server",
                                        labels=labels),
        "texts": CounterMetricFamily(PREFIX + "remote_texts", "Texts an inference server embedded", labels=labels),
        "in_flight": GaugeMetricFamily(PREFIX + "remote_in_flight", "Requests to an inference server now",
                                       labels=labels),
    }
    errors = CounterMetricFamily(PREFIX + "remote_errors", "Failed requests to an inference server, by cause",
                                 labels=[*labels, "cause"])
    seconds = HistogramMetricFamily(PREFIX + "remote_request_duration_seconds",
                                    "Time an inference server took to answer a request", labels=labels)
    state = GaugeMetricFamily(PREFIX + "remote_endpoint_state", "State of an inference server (1 for the current: "
                              "checking, up, down, refused)", labels=[*labels, "state"])
    for name, endpoint in endpoints:
        key = [name, endpoint.label]
        families["requests"].add_metric(key, endpoint.stats.requests)
        families["texts"].add_metric(key, endpoint.stats.texts)
        families["in_flight"].add_metric(key, endpoint.in_flight)
        for cause in CAUSES:
            errors.add_metric([*key, cause], endpoint.stats.errors[cause])
        seconds.add_metric(key, endpoint.stats.seconds.cumulative(), endpoint.stats.seconds.sum)
        for each in ENDPOINT_STATES:
            state.add_metric([*key, each], int(endpoint.state == each))
    local = CounterMetricFamily(PREFIX + "remote_local_texts", "Texts for a pool that this proxy computed "
                                "itself (no e5 prefix, a cut that would not read back the same, remote_fallback)",
                                labels=["pool"])
    for name in sorted(remote.pools):
        local.add_metric([name], remote.local_texts[name])
    yield from (*families.values(), errors, seconds, state, local)


def _batch_rows(run_rows: dict[int, int]) -> Metric:
    """The engine's runs by size, as a histogram (the engine keeps exact sizes: a handful of keys)."""
    histogram = Histogram(BATCH_ROWS_BUCKETS)
    for rows, runs in run_rows.items():
        histogram.observe(rows, runs)
    family = HistogramMetricFamily(PREFIX + "engine_batch_rows", "Rows (texts) per model run of the engine")
    family.add_metric([], histogram.cumulative(), histogram.sum)
    return family


class Metrics:
    """The registry /metrics renders."""

    def __init__(self, stats: ProxyStats, backend: Backend, live_sessions: Callable[[], int]) -> None:
        self.collector = ProxyCollector(stats, backend, live_sessions)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    async def render(self) -> bytes:
        """The exposition text. The model list comes from the catalog (SQLite: off the event loop);
        the counters are read on the loop, where they are written."""
        backend = self.collector.backend
        records = await asyncio.to_thread(backend.catalog.list_models)
        self.collector.models = [ModelState(r.uri, backend.is_loaded(r.uri, r.model_path)) for r in records]
        return generate_latest(self.registry)
