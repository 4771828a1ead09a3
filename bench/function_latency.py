"""azure_local_ai call latency: one short text embedded by the engine in-process, and the same call through the
proxy from asyncpg (prepared: one round trip; literal: prepared anew, two), psycopg (simple protocol) and psql
(timed by its `\\timing`), in one run on one machine.

Every call embeds a text new to the proxy (13 tokens); `SELECT length(text)` from each client, through the proxy
and direct, gives the hop. The series run in interleaved rounds, in a rotating order alternately reversed; the
CPU of the proxy's event loop (main thread) per call from /proc. Overhead = proxy p50 - engine p50; target:
<= 1 ms with psql and asyncpg."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import numpy as np
import psycopg

from bench.common import Cli, load_average, pct, rotated, table
from bench.harness import MODEL, Rig, check
from inference import EmbeddingEngine
from tests.proxyproc import PSQL

SECTION = "## azure_local_ai call latency"
BASE_TEXT = "query: how do I reset my password?"
CALL = f"SELECT azure_local_ai.create_embeddings('{MODEL}', {{}})"
HOP = "SELECT length({})"  # the same shape, relayed only
TARGET_MS = 1.0
CLIENTS = ("asyncpg prepared", "asyncpg literal", "psycopg simple", "psql")
TARGET_CLIENTS = ("asyncpg prepared", "asyncpg literal", "psql")
PSQL_TIME = re.compile(r"^Time: ([\d.]+) ms", re.M)
PSQL_SKIP = 2  # statements timed but dropped at the start of each psql process (its connection warming up)

Run = Callable[[int], Awaitable[list[float]]]


@dataclass
class Series:
    """One measured thing: `run(n)` times n calls (ms); the CPU of the event loop (main thread) of the proxy `pid`,
    if any, is accounted to it (schedstat: not the time it waited for a CPU, which other load inflates)."""

    name: str
    run: Run
    pid: int | None = None
    samples: list[float] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)  # median of each round
    cpu_ns: int = 0
    calls: int = 0  # calls accounted in cpu_ns (psql's dropped ones included)

    def loop_cpu_ns(self) -> int:
        return int(Path(f"/proc/{self.pid}/schedstat").read_text().split()[0]) if self.pid else 0

    async def block(self, n: int, record: bool = True) -> None:
        before = self.loop_cpu_ns()
        got = await self.run(n)
        if record:
            self.cpu_ns += self.loop_cpu_ns() - before
            self.calls += n + (PSQL_SKIP if self.name.startswith("psql") else 0)
            self.samples += got
            self.rounds.append(float(np.median(got)))


def timed(op: Callable[[str], object], texts: Iterator[str]) -> Run:
    """Calls of `op` (awaited if it returns an awaitable), each on a new text and timed."""

    async def run(n: int) -> list[float]:
        out = []
        for _ in range(n):
            text = next(texts)
            start = time.perf_counter_ns()
            if inspect.isawaitable(result := op(text)):
                await result
            out.append((time.perf_counter_ns() - start) / 1e6)
        return out

    return run


def psql_run(dsn: str, make_sql: Callable[[str], str], texts: Iterator[str]) -> Run:
    """One psql process per block running the statements, timed by psql's own `\\timing`."""

    async def run(n: int) -> list[float]:
        script = "\\timing on\n" + "".join(make_sql(next(texts)) + ";\n" for _ in range(n + PSQL_SKIP))
        out = subprocess.run([PSQL, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-o", "/dev/null", dsn],
                             input=script, capture_output=True, text=True, check=True, timeout=300)
        times = [float(t) for t in PSQL_TIME.findall(out.stdout)]
        if len(times) != n + PSQL_SKIP:
            raise RuntimeError(f"psql printed {len(times)} timings for {n + PSQL_SKIP} statements:\n{out.stderr}")
        return times[PSQL_SKIP:]

    return run


async def client_series(where: str, url: str, pid: int | None, template: str, texts: Iterator[str],
                        stack: contextlib.AsyncExitStack) -> list[Series]:
    """A series per client on `url`, each call `template` on a new text: a parameter (asyncpg prepared, psycopg) or
    a literal (asyncpg literal: a new statement each time; psql)."""
    conn = await asyncpg.connect(url)
    stack.push_async_callback(conn.close)
    cur = stack.enter_context(psycopg.connect(url, cursor_factory=psycopg.ClientCursor, autocommit=True)).cursor()
    statement = await conn.prepare(template.format("$1"))

    def sql(text: str) -> str:
        return template.format("'" + text.replace("'", "''") + "'")

    runs = [timed(statement.fetchval, texts), timed(lambda t: conn.fetchval(sql(t)), texts),
            timed(lambda t: cur.execute(template.format("%s"), (t,)).fetchone(), texts), psql_run(url, sql, texts)]
    return [Series(f"{client} {where}", run, pid) for client, run in zip(CLIENTS, runs, strict=True)]


async def measure(series: list[Series], iterations: int, warmup: int, rounds: int) -> None:
    """Warm-ups, then `rounds` blocks of every series in a rotating order, alternately reversed."""
    for item in series:
        await item.block(warmup, record=False)
    for r in range(rounds):
        order = rotated(series, r * 7)
        for item in reversed(order) if r % 2 else order:
            await item.block(max(1, iterations // rounds + (r < iterations % rounds)))
        print(f"  round {r + 1}/{rounds} done ({load_average()})", file=sys.stderr, flush=True)


def report(rig: Rig, series: list[Series]) -> None:
    args, by = rig.args, {s.name: s for s in series}
    p50 = {s.name: pct(s.samples, 50) for s in series}
    engine = by["engine"]
    rows = []
    for client in CLIENTS:
        call = by[f"{client} call"]
        overhead = p50[call.name] - p50["engine"]
        per_round = np.median([c - e for c, e in zip(call.rounds, engine.rounds, strict=True)])
        verdict = "yes" if overhead <= TARGET_MS else "**no**"
        rows.append((client, f"{p50[call.name]:.2f}", f"{pct(call.samples, 99):.2f}", f"{p50['engine']:.2f}",
                     f"**{overhead:.2f}**",
                     f"{per_round:.2f}", f"{p50[f'{client} hop proxy'] - p50[f'{client} hop direct']:.3f}",
                     f"{call.cpu_ns / call.calls / 1e6:.2f}", verdict if client in TARGET_CLIENTS else f"({verdict})"))
    rig.publish(
        [f"`{BASE_TEXT} N` (N new at every call; 13 tokens): {args.iterations} timed calls per series after "
         f"{args.warmup} warm-ups, in {args.rounds} interleaved rounds; client-side ms (psql: its `\\timing`).",
         "The proxy and the engine (an EmbeddingEngine in this process) with default settings."],
        f"### Overhead = proxy p50 - engine p50 (target: ≤ {TARGET_MS:g} ms with psql and asyncpg)", "",
        table(["client", "proxy p50", "proxy p99", "engine p50", "overhead", "median of per-round overheads", "hop",
               "proxy event-loop CPU ms/call", f"≤ {TARGET_MS:g} ms"], rows), "",
    )


def main(argv: list[str] | None = None) -> int:
    cli = Cli("function_latency", __doc__, SECTION)
    cli.add_argument("--iterations", type=int, default=300, help="timed calls per series")
    cli.add_argument("--warmup", type=int, default=20, help="untimed calls per series first")
    cli.add_argument("--rounds", type=int, default=15, help="interleaved blocks each series is cut into")
    cli.data_dir(None)
    args = cli.parse(argv)
    with Rig(args) as rig:
        print("building the model (if needed), starting PostgreSQL and the proxy...", file=sys.stderr, flush=True)
        files = rig.model()
        cluster = rig.cluster()
        proxy = rig.proxy(cluster.url())
        engine = EmbeddingEngine()
        rig.callback(engine.close_sync)
        texts = (f"{BASE_TEXT} {n}" for n in itertools.count(1))  # a new input at every call: no cache helps

        async def run() -> list[Series]:
            async with contextlib.AsyncExitStack() as stack:
                series = [Series("engine", timed(lambda t: engine.embed(files, [t]), texts))]
                series += await client_series("call", proxy.dsn(), proxy.proc.pid, CALL, texts, stack)
                series += await client_series("hop proxy", proxy.dsn(), proxy.proc.pid, HOP, texts, stack)
                series += await client_series("hop direct", cluster.dsn(), None, HOP, texts, stack)
                await measure(series, args.iterations, args.warmup, args.rounds)
            return series

        report(rig, asyncio.run(run()))
        check(proxy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
