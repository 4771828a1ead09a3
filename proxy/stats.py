"""The proxy's own counters, read by the metrics collector (metrics.py) when /metrics is scraped.

Plain integers on one object rather than prometheus_client's metrics: the relay adds to them for
every chunk of bytes it moves, where Counter.inc would take a lock each time, and the relay's CPU per
transaction is held to PgBouncer's. Everything here is written on the event loop's thread only, so
`+=` needs no lock; a scrape reads them as they are at that moment."""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field

from . import fastpath

#: Upper bounds (seconds) of the latency histograms: a cached single embedding takes about a
#: millisecond, a back-fill of thousands of rows tens of seconds.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)


class Histogram:
    """Observations counted by bucket (the last bucket is +Inf), with their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += times  # a value equal to a bound belongs to it (le)
        self.sum += value * times

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus's buckets: (le, observations at most le), ending with +Inf."""
        out: list[tuple[str, int]] = []
        total = 0
        for bound, count in zip((*(repr(b) for b in self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


def _histograms() -> defaultdict[str, Histogram]:
    return defaultdict(Histogram)


def _counts() -> defaultdict[tuple[str, ...], int]:
    return defaultdict(int)


@dataclass(slots=True)
class ProxyStats:
    """Counters since the process started (the current sessions are counted by the listener's registry)."""

    sessions_total: int = 0
    #: Sessions refused at start-up, by who refused them ("proxy" or "server").
    sessions_refused: defaultdict[tuple[str, ...], int] = field(default_factory=_counts)
    upstream_connect_failures: int = 0
    #: Bytes read from clients and from the server by established sessions in the event loop (start-up
    #: not counted); relayed() adds the relay thread's.
    bytes_from_clients: int = 0
    bytes_from_server: int = 0
    #: azure_local_ai function calls by (function, origin): origin "sql" (a statement the proxy read),
    #: "server" (a call the server evaluated), "ahead" (an answer written into a statement's mailbox
    #: before the server asked, servercalls.py), "http" (the embeddings API).
    calls: defaultdict[tuple[str, ...], int] = field(default_factory=_counts)
    call_seconds: defaultdict[str, Histogram] = field(default_factory=_histograms)
    #: Errors the proxy answered a call with, by (SQLSTATE, origin).
    errors: defaultdict[tuple[str, ...], int] = field(default_factory=_counts)
    #: HTTP requests by (path, status code), and their latency by path.
    http_requests: defaultdict[tuple[str, ...], int] = field(default_factory=_counts)
    http_seconds: defaultdict[str, Histogram] = field(default_factory=_histograms)

    def call_done(self, function: str, origin: str, seconds: float) -> None:
        self.calls[(function, origin)] += 1
        self.call_seconds[function].observe(seconds)

    def error(self, sqlstate: str, origin: str) -> None:
        self.errors[(sqlstate, origin)] += 1


#: The one instance the proxy's modules count into.

    def relayed(self) -> tuple[int, int]:
        """(client to server, server to client) bytes of established sessions, the relay thread's included."""
        by_thread = fastpath.bytes_relayed()
        return self.bytes_from_clients + by_thread[0], self.bytes_from_server + by_thread[1]

STATS = ProxyStats()
