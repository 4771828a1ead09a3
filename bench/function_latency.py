"""azure_local_ai call latency: one short text embedded by the engine in-process, and the same call
through the proxy from asyncpg, psycopg (simple protocol) and psql, in one run on one machine.

    .venv/bin/python -m bench.function_latency [--iterations 300] [--warmup 20] [--rounds 15]
        [--wait-load 2.5] [--data-dir DIR] [--write-results]

Starts a PostgreSQL and two `azure-local-ai-proxy serve` (one default, one with spin_control false),
each matched by an in-process EmbeddingEngine, and times `create_embeddings` of a short text (13 tokens) new
at every call: engine `embed()`; asyncpg prepared (one round trip) and literal (prepared anew: two);
psycopg ClientCursor (simple protocol); a psql script timed by `\\timing`. References: `SELECT 1`
direct and via the proxy, and the statement the proxy forwards in place of the call, direct. Rotating
interleaved rounds; the proxy's CPU per call from /proc schedstat. Overhead = proxy p50 - engine p50;
target: <= 1 ms for psql and asyncpg."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
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

from bench.common import Cli, load_average, pct, rotated, table, wait_for_quiet
from bench.harness import MODEL, Proxy, Rig
from inference import EmbeddingEngine, EngineSettings
from inference.model_dir import ModelFiles
from inference.settings import available_cpus
from proxy.intercept.render import real_array_text
from tests.proxyproc import PSQL

SECTION = "## azure_local_ai call latency"
BASE_TEXT = "query: how do I reset my password?"
CALL = f"SELECT azure_local_ai.create_embeddings('{MODEL}', {{}})"
TARGET_MS = 1.0
VARIANTS = {"default": True, "spin off": False}  # the proxies and engines compared, by their spin_control
CLIENTS = ("asyncpg prepared", "asyncpg literal", "psycopg simple", "psql")
TARGET_CLIENTS = ("asyncpg prepared", "asyncpg literal", "psql")
FORWARDED = "SELECT $1::real[] AS create_embeddings"
PSQL_TIME = re.compile(r"^Time: ([\d.]+) ms", re.M)
PSQL_SKIP = 2  # statements timed but dropped at the start of each psql process (its connection warming up)

Run = Callable[[int], Awaitable[list[float]]]


def thread_cpu_ns(pid: int, tid: int) -> int:
    """CPU time a thread has run, in ns (schedstat: not the time it waited for a CPU, which other load inflates)."""
    try:
        return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    except (OSError, ValueError):
        return 0


@dataclass
class Series:
    """One measured thing: `run(n)` times n calls (ms); the CPU of process `pid` (the proxy's, or this one's
    for the engine) is accounted to it: main thread (event loop), other threads."""

    name: str
    run: Run
    pid: int | None = None
    samples: list[float] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)  # median of each round
    cpu_ns: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))  # main thread, other threads
    calls: int = 0  # calls accounted in the CPU figures (psql's dropped ones included)

    def cpu(self) -> np.ndarray:
        if self.pid is None:
            return np.zeros(2, np.int64)
        main = thread_cpu_ns(self.pid, self.pid)
        every = sum(thread_cpu_ns(self.pid, int(tid)) for tid in os.listdir(f"/proc/{self.pid}/task"))
        return np.array([main, every - main])


def timed(op: Callable[[str], object], texts: Iterator[str], sync: bool = False) -> Run:
    """Calls of `op` (awaited unless `sync`), each on a new text and timed."""

    async def run(n: int) -> list[float]:
        out = []
        for _ in range(n):
            text = next(texts)
            start = time.perf_counter_ns()
            if sync:
                op(text)
            else:
                await op(text)  # type: ignore[misc]
            out.append((time.perf_counter_ns() - start) / 1e6)
        return out

    return run


def psql_series(dsn: str, make_sql: Callable[[str], str], texts: Iterator[str]) -> Run:
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


def call_sql(text: str) -> str:
    return CALL.format("'" + text.replace("'", "''") + "'")


async def build_series(files: ModelFiles, engines: dict[str, EmbeddingEngine], proxies: dict[str, Proxy],
                       direct: str, vector: np.ndarray, stack: contextlib.AsyncExitStack) -> list[Series]:
    """Every series, connected and ready (closed with `stack`), in the first round's order."""
    texts = (f"{BASE_TEXT} {n}" for n in itertools.count(1))  # a new input at every call: no cache helps

    async def clients(name: str, pid: int | None, url: str, prepared: str, param: Callable[[str], tuple],
                      literal: Callable[[str], tuple], simple: Callable[[str], tuple],
                      script: Callable[[str], str]) -> list[Series]:
        """The series `name` of each of CLIENTS on `url`: asyncpg's `prepared` statement with `param(text)`,
        asyncpg's fetchval of `literal(text)`, psycopg's ClientCursor executing `simple(text)`, psql `script(text)`."""
        conn = await asyncpg.connect(url)
        stack.push_async_callback(conn.close)
        statement = await conn.prepare(prepared)
        cur = stack.enter_context(psycopg.connect(url, cursor_factory=psycopg.ClientCursor, autocommit=True)).cursor()

        def simple_call(text: str) -> object:
            cur.execute(*simple(text))
            return cur.fetchone()

        runs = [timed(lambda t: statement.fetchval(*param(t)), texts),
                timed(lambda t: conn.fetchval(*literal(t)), texts), timed(simple_call, texts, sync=True),
                psql_series(url, script, texts)]
        return [Series(name.format(client), run, pid) for client, run in zip(CLIENTS, runs, strict=True)]

    series: list[Series] = []
    for variant, proxy in proxies.items():
        engine = engines[variant]
        series.append(Series(f"call engine [{variant}]", timed(lambda t, e=engine: e.embed(files, [t]), texts),
                             os.getpid()))
        series += await clients(f"call {{}} [{variant}]", proxy.pid, proxy.dsn, CALL.format("$1"), lambda t: (t,),
                                lambda t: (call_sql(t),),
                                lambda t: ("SELECT azure_local_ai.create_embeddings(%s, %s)", (MODEL, t)), call_sql)
    default = proxies["default"]
    for where, url, pid in (("proxy", default.dsn, default.pid), ("direct", direct, None)):
        counter = itertools.count()  # asyncpg literal: a new statement each time, as the calls' are
        series += await clients(f"SELECT 1 {{}} {where}", pid, url, "SELECT 1", lambda _t: (),
                                lambda _t, n=counter: (f"SELECT 1 AS n{next(n)}",), lambda _t: ("SELECT 1",),
                                lambda _t: "SELECT 1")
    # What the proxy forwards in place of the call, direct: a binary real[] parameter (extended), a literal (simple).
    floats = vector.tolist()
    forwarded = f"SELECT '{real_array_text(vector)}'::real[] AS create_embeddings"
    series += await clients("forwarded {} direct", None, direct, FORWARDED, lambda _t: (floats,),
                            lambda t: (f"{FORWARDED} /* {t} */", floats), lambda _t: (forwarded,), lambda _t: forwarded)
    return series


async def run_block(item: Series, n: int, record: bool) -> None:
    before = item.cpu()
    got = await item.run(n)
    if record:
        item.cpu_ns += item.cpu() - before
        item.calls += n + (PSQL_SKIP if "psql" in item.name else 0)
        item.samples += got
        item.rounds.append(float(np.median(got)))


async def measure(series: list[Series], iterations: int, warmup: int, rounds: int) -> None:
    """Warm-ups, then `rounds` blocks of every series in a rotating order, alternately reversed."""
    for item in series:
        await run_block(item, warmup, record=False)
    for r in range(rounds):
        order = rotated(series, r * 7)
        for item in reversed(order) if r % 2 else order:
            await run_block(item, max(1, iterations // rounds + (r < iterations % rounds)), record=True)
        print(f"  round {r + 1}/{rounds} done ({load_average()})", file=sys.stderr, flush=True)


def report(rig: Rig, series: list[Series]) -> None:
    args, by = rig.args, {s.name: s for s in series}
    p50 = {s.name: pct(s.samples, 50) for s in series}
    rows = []
    for variant in VARIANTS:
        engine = by[f"call engine [{variant}]"]
        for client in CLIENTS:
            call = by[f"call {client} [{variant}]"]
            overhead = p50[call.name] - p50[engine.name]
            per_round = np.median([c - e for c, e in zip(call.rounds, engine.rounds, strict=True)])
            verdict = "yes" if overhead <= TARGET_MS else "**no**"
            rows.append((f"{client} [{variant}]", f"{p50[call.name]:.2f}", f"{p50[engine.name]:.2f}",
                         f"**{overhead:.2f}**", f"{per_round:.2f}", f"{min(call.samples) - min(engine.samples):.2f}",
                         verdict if client in TARGET_CLIENTS and variant == "default" else f"({verdict})"))
    parts = []
    engine = by["call engine [default]"]
    for client in CLIENTS:
        call, one = by[f"call {client} [default]"], by[f"SELECT 1 {client} proxy"]
        overhead = p50[call.name] - p50[engine.name]
        floor = p50[f"SELECT 1 {client} direct"]
        hop, result = p50[one.name] - floor, p50[f"forwarded {client} direct"] - floor
        # The proxy's loop work beyond relaying a SELECT 1 and beyond awaiting embed() (in the engine's p50 already).
        loop = (call.cpu_ns[0] / call.calls - one.cpu_ns[0] / one.calls - engine.cpu_ns[0] / engine.calls) / 1e6
        parts.append((client, f"{overhead:.2f}", f"{floor:.3f}", f"{hop:.3f}", f"{result:.3f}", f"{loop:.3f}",
                      f"{overhead - floor - hop - result - loop:.2f}"))
    every = [(item.name, len(item.samples), *(f"{q:.3f}" for q in np.percentile(item.samples, [0, 50, 90, 99])),
              *([f"{ns / item.calls / 1000:.0f}" for ns in item.cpu_ns] if item.pid else ["", ""])) for item in series]
    facts = [f"`{BASE_TEXT} N` (N new at every call; 13 tokens): {args.iterations} timed calls per series after "
             f"{args.warmup} warm-ups, in {args.rounds} interleaved rounds; client-side ms (psql: its `\\timing`).",
             "`[default]`: default settings; `[spin off]`: `spin_control` false; the engine: an EmbeddingEngine in "
             f"this process with its proxy's settings ({available_cpus()} CPUs)."]
    rig.publish(
        facts,
        f"### Overhead = proxy p50 - engine p50 (target: ≤ {TARGET_MS:g} ms with psql and asyncpg)", "",
        table(["client", "proxy p50", "engine p50", "overhead", "median of per-round overheads", "min - min",
               f"≤ {TARGET_MS:g} ms"], rows), "",
        "### Where the overhead goes (default settings, p50s, ms)", "",
        table(["client", "overhead", "= round trip direct (SELECT 1)", "+ proxy hop (SELECT 1)",
               "+ 384-float result (server + client)", "+ proxy event-loop CPU for the call",
               "+ unexplained (waiting: scheduling, thread hand-offs)"], parts), "",
        "*proxy hop* = SELECT 1 via proxy - direct; *384-float result* = the forwarded statement direct - SELECT 1 "
        "direct; *event-loop CPU* = the proxy's event-loop thread's CPU per call (schedstat) beyond relaying a "
        "SELECT 1 and beyond awaiting `embed()` in-process. p50 differences: they add up only roughly.", "",
        "### Every series (ms; CPU in µs per call)", "",
        table(["series", "n", "min", "p50", "p90", "p99", "CPU main thread", "CPU other threads"], every), "",
        "`forwarded`: straight to PostgreSQL, the statement the proxy sends in place of the call. CPU: the proxy's, "
        "or this process's for the engine (main thread: the event loop; others: tokenizer, dispatcher, ONNX Runtime).",
        "",
    )


def main(argv: list[str] | None = None) -> int:
    cli = Cli("function_latency", __doc__)
    cli.add_argument("--iterations", type=int, default=300, help="timed calls per series")
    cli.add_argument("--warmup", type=int, default=20, help="untimed calls per series first")
    cli.add_argument("--rounds", type=int, default=15, help="interleaved blocks each series is cut into")
    cli.wait_load()
    cli.data_dir(None)
    cli.record(SECTION, "--write-results")
    args = cli.parse(argv)
    with Rig(args, SECTION, "azure_local_ai call latency", "alp-fnlat-") as rig:
        print("building the model (if needed), starting PostgreSQL and the proxies...", file=sys.stderr, flush=True)
        files = rig.model(args.data_dir or rig.workdir / "model-home")
        cluster = rig.cluster()
        proxies: dict[str, Proxy] = {}
        for variant, spin in VARIANTS.items():
            name = f"proxy-{variant.replace(' ', '-')}"
            proxies[variant] = proxy = rig.proxy(cluster.port, rig.data_dir(name), name)
            with psycopg.connect(proxy.dsn, autocommit=True) as conn:
                conn.execute(f"SELECT azure_local_ai.set_setting('spin_control', '{str(spin).lower()}')")
                got = conn.execute("SELECT azure_local_ai.get_setting('spin_control')").fetchone()
                assert got == (str(spin).lower(),), got
        engines = {v: EmbeddingEngine(EngineSettings(available_cpus(), 1, spin)) for v, spin in VARIANTS.items()}
        for engine in engines.values():
            rig.callback(engine.close_sync)
        vector = engines["default"].embed_sync(files, [BASE_TEXT])[0]
        if args.wait_load:
            wait_for_quiet(args.wait_load)

        async def run() -> list[Series]:
            async with contextlib.AsyncExitStack() as stack:
                series = await build_series(files, engines, proxies, cluster.dsn(), vector, stack)
                await measure(series, args.iterations, args.warmup, args.rounds)
            return series

        report(rig, asyncio.run(run()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
